"""Vision vocabulary of the unified MLLM: the added image tokens, their ids, and embedding resizing.

Follows ILLUME+ (arXiv 2504.01934; ``illume-unified-mllm/ILLUME_plus``,
``ILLUME/scripts/prepare_llm_with_extended_vision_tokenizer.py`` and ``illume_arch.initialize_vision_tokenizer``):
the same token strings, in the same order, added as plain (non-special) tokens, so that with the Qwen2.5 tokenizer
the ids equal the reference's hard-coded ones (``<start_of_image>`` = 151665, level-0 codes from 151704, level-1
codes from 184472). Differences: ids are never hard-coded here, they are read once from the tokenizer and checked to
be contiguous, after which every id <-> (level, code) mapping is arithmetic; new embedding rows are initialised
explicitly with N(0, ``initializer_range``) (what transformers 4.44 did implicitly) instead of relying on the
installed transformers' default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

NUM_MARKERS = 7  # soi, eoi, eol, sol0, eol0, sol1, eol1 (the reference's ``special_tokens_ids`` order)
SEMANTIC_LEVEL, PIXEL_LEVEL = 0, 1


def resolution_values(base: int = 64, max_resolution: int = 1024) -> list[int]:
    """Pixel sizes that have a ``<height_*>`` / ``<width_*>`` tag: ``base, 2*base, ..., max_resolution``."""
    if base <= 0 or max_resolution % base:
        raise ValueError(f"max_resolution ({max_resolution}) must be a positive multiple of base ({base})")
    return [base * (i + 1) for i in range(max_resolution // base)]


def vision_token_strings(semantic_codebook_size: int, pixel_codebook_size: int, resolution_base: int = 64,
                         max_resolution: int = 1024) -> list[str]:
    """All added tokens, in the reference's order (3 + 4 + 2 * n_res + semantic + pixel strings).

    With the released sizes (32768, 98304, 64, 1024) this is 131,111 tokens.
    """
    tokens = ["<start_of_image>", "<end_of_image>", "<end_of_line>"]
    for level in (SEMANTIC_LEVEL, PIXEL_LEVEL):
        tokens += [f"<start_of_level{level}>", f"<end_of_level{level}>"]
    values = resolution_values(resolution_base, max_resolution)
    tokens += [f"<height_{v}>" for v in values]
    tokens += [f"<width_{v}>" for v in values]
    tokens += [f"<|image_level0_{k}|>" for k in range(semantic_codebook_size)]
    tokens += [f"<|image_level1_{k}|>" for k in range(pixel_codebook_size)]
    return tokens


@dataclass(frozen=True)
class VisionVocabulary:
    """Ids of the vision tokens; every mapping is arithmetic on ``first_id`` (the id of ``<start_of_image>``).

    Args:
        first_id: id of the first added token (``len(tokenizer)`` before extension; 151665 for Qwen2.5).
        semantic_codebook_size: level-0 codes (32768 released).
        pixel_codebook_size: level-1 codes (98304 released).
        resolution_base, max_resolution: resolution tags ``<height_v>`` for ``v = base, 2 base, ..., max``.
    """

    first_id: int
    semantic_codebook_size: int
    pixel_codebook_size: int
    resolution_base: int = 64
    max_resolution: int = 1024

    # ------------------------------------------------------------------ markers
    @property
    def start_of_image(self) -> int:
        return self.first_id

    @property
    def end_of_image(self) -> int:
        return self.first_id + 1

    @property
    def end_of_line(self) -> int:
        return self.first_id + 2

    def start_of_level(self, level: int) -> int:
        """``<start_of_level{level}>``."""
        self._check_level(level)
        return self.first_id + 3 + 2 * level

    def end_of_level(self, level: int) -> int:
        """``<end_of_level{level}>``."""
        self._check_level(level)
        return self.first_id + 4 + 2 * level

    @property
    def marker_ids(self) -> list[int]:
        """The reference's ``special_tokens_ids``: soi, eoi, eol, sol0, eol0, sol1, eol1."""
        return list(range(self.first_id, self.first_id + NUM_MARKERS))

    # ------------------------------------------------------------------ resolution tags
    @property
    def num_resolutions(self) -> int:
        return self.max_resolution // self.resolution_base

    def height_id(self, height: int) -> int:
        """Id of ``<height_{height}>`` (pixels, a multiple of ``resolution_base``)."""
        return self.first_id + NUM_MARKERS + self._resolution_index(height, "height")

    def width_id(self, width: int) -> int:
        """Id of ``<width_{width}>``."""
        return self.first_id + NUM_MARKERS + self.num_resolutions + self._resolution_index(width, "width")

    def resolution_tag_ids(self, height: int, width: int) -> list[int]:
        """``[<height_H>, <width_W>]`` (height first, as the reference)."""
        return [self.height_id(height), self.width_id(width)]

    def _resolution_index(self, value: int, name: str) -> int:
        if value % self.resolution_base or not self.resolution_base <= value <= self.max_resolution:
            raise ValueError(f"{name} {value} has no resolution tag: use a multiple of {self.resolution_base} between "
                             f"{self.resolution_base} and {self.max_resolution}")
        return value // self.resolution_base - 1

    # ------------------------------------------------------------------ codes
    def code_offset(self, level: int) -> int:
        """Id of code 0 of ``level`` (0: semantic, 1: pixel)."""
        self._check_level(level)
        start = self.first_id + NUM_MARKERS + 2 * self.num_resolutions
        return start if level == SEMANTIC_LEVEL else start + self.semantic_codebook_size

    def code_range(self, level: int) -> tuple[int, int]:
        """``[start, end)`` ids of ``level``'s codes."""
        start = self.code_offset(level)
        size = self.semantic_codebook_size if level == SEMANTIC_LEVEL else self.pixel_codebook_size
        return start, start + size

    def codes_to_ids(self, codes: Tensor, level: int) -> Tensor:
        """Code indices of ``level`` (any shape) -> token ids (same shape)."""
        start, end = self.code_range(level)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= end - start):
            raise ValueError(f"level-{level} codes must be in [0, {end - start}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return codes.long() + start

    def ids_to_codes(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (any shape) -> ``(level, code)`` tensors of the same shape; both are -1 for non-code ids."""
        ids = ids.long()
        level = torch.full_like(ids, -1)
        code = torch.full_like(ids, -1)
        for lv in (SEMANTIC_LEVEL, PIXEL_LEVEL):
            start, end = self.code_range(lv)
            inside = (ids >= start) & (ids < end)
            level[inside] = lv
            code[inside] = ids[inside] - start
        return level, code

    @property
    def end_id(self) -> int:
        """One past the last vision token id (``len(tokenizer)`` after extension; 282776 for Qwen2.5)."""
        return self.code_range(PIXEL_LEVEL)[1]

    @property
    def num_tokens(self) -> int:
        """Number of added tokens."""
        return self.end_id - self.first_id

    def token_strings(self) -> list[str]:
        """The added token strings, in id order."""
        return vision_token_strings(self.semantic_codebook_size, self.pixel_codebook_size, self.resolution_base,
                                    self.max_resolution)

    def _check_level(self, level: int) -> None:
        if level not in (SEMANTIC_LEVEL, PIXEL_LEVEL):
            raise ValueError(f"level must be 0 (semantic) or 1 (pixel), got {level}")

    # ------------------------------------------------------------------ tokenizer
    @classmethod
    def from_tokenizer(cls, tokenizer, semantic_codebook_size: int, pixel_codebook_size: int,
                       resolution_base: int = 64, max_resolution: int = 1024) -> VisionVocabulary:
        """Read the ids from a tokenizer that already has the vision tokens (checks they are contiguous, in order).

        Raises:
            ValueError: if a token is missing or the ids are not ``first_id, first_id + 1, ...``.
        """
        strings = vision_token_strings(semantic_codebook_size, pixel_codebook_size, resolution_base, max_resolution)
        ids = tokenizer.convert_tokens_to_ids(strings)
        first = ids[0]
        unk = getattr(tokenizer, "unk_token_id", None)
        if first is None or first == unk:
            raise ValueError("the tokenizer has no vision tokens (<start_of_image> is unknown); call "
                             "dualvitok.unified.extend_tokenizer(tokenizer, ...) first")
        bad = [(s, i) for k, (s, i) in enumerate(zip(strings, ids, strict=True)) if i != first + k]
        if bad:
            raise ValueError(f"the tokenizer's vision tokens are not contiguous in the reference order (first "
                             f"mismatches: {bad[:3]}); check the codebook sizes ({semantic_codebook_size}, "
                             f"{pixel_codebook_size}) and resolution tags ({resolution_base}..{max_resolution})")
        return cls(first, semantic_codebook_size, pixel_codebook_size, resolution_base, max_resolution)


def extend_tokenizer(tokenizer, semantic_codebook_size: int, pixel_codebook_size: int, resolution_base: int = 64,
                     max_resolution: int = 1024) -> VisionVocabulary:
    """Add the vision tokens to a Hugging Face tokenizer as plain (non-special) tokens, in the reference's order.

    A tokenizer that already has them is left unchanged. Returns the :class:`VisionVocabulary`.
    """
    strings = vision_token_strings(semantic_codebook_size, pixel_codebook_size, resolution_base, max_resolution)
    vocab = tokenizer.get_vocab()
    if strings[0] in vocab:
        return VisionVocabulary.from_tokenizer(tokenizer, semantic_codebook_size, pixel_codebook_size,
                                               resolution_base, max_resolution)
    clashes = [s for s in strings[:50] if s in vocab]
    if clashes:
        raise ValueError(f"the tokenizer already has some vision tokens ({clashes[:3]}) but not <start_of_image>; "
                         "use a clean base tokenizer")
    first = len(tokenizer)
    added = tokenizer.add_tokens(strings)  # plain tokens: kept by decode(skip_special_tokens=True), as the reference
    if added != len(strings):
        raise RuntimeError(f"the tokenizer added {added} of {len(strings)} vision tokens")
    vocabulary = VisionVocabulary(first, semantic_codebook_size, pixel_codebook_size, resolution_base, max_resolution)
    logger.info("added %d vision tokens (ids %d..%d)", added, first, vocabulary.end_id - 1)
    return vocabulary


# ---------------------------------------------------------------------------------------- embeddings
def resize_embeddings(language_model: nn.Module, vocabulary: VisionVocabulary, init: str = "normal") -> int:
    """Resize a causal LM's input embedding and LM head for the vision tokens, as the reference.

    The new size is ``original rows + vocabulary.num_tokens`` (the reference uses the embedding's row count, not
    ``len(tokenizer)``, so padding rows stay). New rows: ``init="normal"`` draws N(0, ``initializer_range``) (the
    reference under transformers 4.44), ``"mean"`` uses the mean of the old rows. A tied LM head follows the
    embedding. Returns the new number of rows.
    """
    if init not in ("normal", "mean"):
        raise ValueError(f"init must be 'normal' or 'mean', got {init!r}")
    embedding = language_model.get_input_embeddings()
    old_rows = embedding.weight.shape[0]
    if old_rows < vocabulary.first_id:
        raise ValueError(f"the embedding has {old_rows} rows but the tokenizer's text vocabulary has "
                         f"{vocabulary.first_id} tokens; the model and tokenizer do not match")
    new_rows = old_rows + vocabulary.num_tokens
    language_model.resize_token_embeddings(new_rows, mean_resizing=False)
    std = float(getattr(language_model.config, "initializer_range", 0.02))
    heads = [language_model.get_input_embeddings().weight]
    output = language_model.get_output_embeddings()
    if output is not None and output.weight is not heads[0]:
        heads.append(output.weight)
    with torch.no_grad():
        for weight in heads:
            new = weight[old_rows:]
            if init == "normal":
                new.normal_(0.0, std)
            else:
                new.copy_(weight[:old_rows].float().mean(0, keepdim=True).to(weight.dtype).expand_as(new))
        if output is not None and getattr(output, "bias", None) is not None:
            output.bias[old_rows:].zero_()
    return new_rows


@dataclass
class GradientMask:
    """Handles of the hooks set by :func:`train_only_vision_rows`; call :meth:`remove` to train all rows again."""

    handles: list

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def train_only_vision_rows(language_model: nn.Module, text_token_num: int) -> GradientMask:
    """Stage-1 training of the reference: only the embedding / LM-head rows ``>= text_token_num`` learn.

    Sets ``requires_grad`` on the input embedding and LM head and registers gradient hooks that zero the gradient
    rows below ``text_token_num`` (``unfreeze_vision_embedding=True, unfreeze_text_embedding=False``). Freezing the
    rest of the model is up to the caller.
    """
    weights = [language_model.get_input_embeddings().weight]
    output = language_model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)

    def zero_text_rows(grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[:text_token_num] = 0
        return grad

    handles = []
    for weight in weights:
        weight.requires_grad_(True)
        handles.append(weight.register_hook(zero_text_rows))
    return GradientMask(handles)
