"""The image-structure constraint: a per-row state machine that makes every generated image block well formed.

Follows the ILLUME+ ``InterleavedLogitsProcessor`` / ``DualVQImageTokenProcessor``
(``ILLUME/generation_eval/models/inference_utils.py``, ``ILLUME/app.py`` in ``illume-unified-mllm/ILLUME_plus``):
markers and ``<end_of_line>`` are forced, code positions are restricted to their level's id range, text positions
may not produce codes or level markers. Differences: the state is kept per batch row (the reference follows row 0
only), it is driven by a precomputed block skeleton (a position counter, no string handling), and
``force_image_start`` makes the first generated token ``<start_of_image>`` (as ``app.py``) so that a block always
appears; after the block ``<|im_end|>`` is forced by default (as ``DualVQImageTokenProcessor``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sequence import PIXEL_SLOT, SEMANTIC_SLOT, ImageGrids, block_skeleton
from .vocabulary import PIXEL_LEVEL, SEMANTIC_LEVEL, VisionVocabulary

TEXT, SEMANTIC, PIXEL, FORCED, DONE = "text", "semantic", "pixel", "forced", "done"
"""Kinds of the next token of a row (:meth:`ImageBlockConstraint.kinds`)."""


class ImageBlockConstraint:
    """Masks next-token scores so that image blocks are well formed.

    Args:
        vocabulary: the vision vocabulary.
        grids: grid sizes of the blocks to generate.
        batch_size: rows.
        eos_token_id: end of the answer (``<|im_end|>``).
        force_image_start: the first token of every row is ``<start_of_image>`` (image generation / editing).
        allow_images: text rows may start an image (``False`` for understanding: no vision token at all).
        end_after_image: force ``eos_token_id`` right after ``<end_of_image>`` (else continue in text mode).
    """

    def __init__(self, vocabulary: VisionVocabulary, grids: ImageGrids | None, batch_size: int, eos_token_id: int,
                 force_image_start: bool = True, allow_images: bool = True, end_after_image: bool = True):
        if (force_image_start or allow_images) and grids is None:
            raise ValueError("grids are needed when images may be generated")
        self.vocabulary, self.grids, self.eos_token_id = vocabulary, grids, eos_token_id
        self.force_image_start, self.allow_images = force_image_start, allow_images
        self.end_after_image = end_after_image
        self.skeleton = block_skeleton(vocabulary, grids).tolist() if grids is not None else []
        self.block_length = len(self.skeleton)
        self.position = [-1] * batch_size  # -1: text before any image; 0..L-1: block tokens emitted; L: after image
        self.finished = [False] * batch_size
        self._masks: dict[tuple[str, int, str], Tensor] = {}

    # ------------------------------------------------------------------ state
    def kinds(self) -> list[str | int]:
        """Next-token kind per row: ``"text"``, ``"semantic"``, ``"pixel"``, ``"done"`` or a forced token id."""
        out: list[str | int] = []
        for pos, done in zip(self.position, self.finished, strict=True):
            if done:
                out.append(DONE)
            elif pos == -1:
                out.append(self.vocabulary.start_of_image if self.force_image_start else TEXT)
            elif pos >= self.block_length:
                out.append(self.eos_token_id if self.end_after_image else TEXT)
            else:
                slot = self.skeleton[pos]
                out.append(SEMANTIC if slot == SEMANTIC_SLOT else PIXEL if slot == PIXEL_SLOT else slot)
        return out

    def in_image(self) -> list[bool]:
        """Rows whose next token lies inside an image block (after ``<start_of_image>``): guidance applies there."""
        rows = zip(self.position, self.finished, strict=True)
        return [not done and 0 <= pos < self.block_length for pos, done in rows]

    def update(self, tokens: Tensor | list[int]) -> None:
        """Advance with the tokens just appended, ``[B]``."""
        tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        for row, tok in enumerate(tokens):
            if self.finished[row]:
                continue
            pos = self.position[row]
            if 0 <= pos < self.block_length:
                self.position[row] = pos + 1
            elif tok == self.vocabulary.start_of_image and self.grids is not None:
                self.position[row] = 1
            if tok == self.eos_token_id and not 0 <= pos < self.block_length:
                self.finished[row] = True

    # ------------------------------------------------------------------ masks
    def _allowed(self, kind: str, size: int, device: torch.device) -> Tensor:
        """Bool mask ``[V]`` of the allowed ids for a text / semantic / pixel position."""
        key = (kind, size, str(device))
        if key not in self._masks:
            vocab = self.vocabulary
            if kind in (SEMANTIC, PIXEL):
                allowed = torch.zeros(size, dtype=torch.bool, device=device)
                start, end = vocab.code_range(SEMANTIC_LEVEL if kind == SEMANTIC else PIXEL_LEVEL)
                allowed[start:end] = True
            else:  # text: no codes, no level / line / end-of-image markers
                allowed = torch.ones(size, dtype=torch.bool, device=device)
                allowed[vocab.first_id + 1:vocab.first_id + 7] = False
                allowed[vocab.code_offset(SEMANTIC_LEVEL):vocab.end_id] = False
                allowed[vocab.end_id:] = False  # padding rows of the resized embedding
                if not self.allow_images:  # text only: no vision token at all (also no resolution tags)
                    allowed[vocab.first_id:vocab.end_id] = False
                allowed[self.eos_token_id] = True
            self._masks[key] = allowed
        return self._masks[key]

    def __call__(self, scores: Tensor) -> Tensor:
        """Mask ``scores [B, V]`` (logits or log-probs): disallowed ids get ``-inf``. Returns a new tensor."""
        out = scores.clone()
        size = scores.shape[-1]
        for row, kind in enumerate(self.kinds()):
            if kind == DONE:
                kind = self.eos_token_id
            if isinstance(kind, int):
                keep = out[row, kind].clone()
                out[row] = float("-inf")
                out[row, kind] = keep if torch.isfinite(keep) else 0.0
            else:
                out[row].masked_fill_(~self._allowed(kind, size, scores.device), float("-inf"))
        return out
