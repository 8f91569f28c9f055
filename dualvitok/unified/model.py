"""``UnifiedMLLM``: a Hugging Face causal LM + its tokenizer + DualViTok for understanding, generation and editing.

Follows ILLUME+ (arXiv 2504.01934; ``illume-unified-mllm/ILLUME_plus``: ``IllumeQwen2ForCausalLM``,
``illume_arch.py``, ``generation_eval/models/illume.py``, ``app.py``): continuous image input (dual tower + MLP
adapters, laid out in the marker / end-of-line skeleton), discrete coarse-to-fine image output, ChatML prompts with
resolution tags, constrained decoding with classifier-free guidance, decoding through DualViTok or a diffusion
refiner. Differences: any causal LM / tokenizer pair works (ids come from the tokenizer, not hard-coded), batch rows
are independent, and the checkpoint layouts are documented in ``docs/unified.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..model import DualViTok
from ..processor import ImageInput, ImageProcessor, load_image
from .adapters import DualVisionTower, MixedProjector
from .anchors import PaddingBox, nearest_anchor, pad_to_size
from .checkpoints import UnifiedCheckpointMixin
from .config import UnifiedConfig
from .constraints import ImageBlockConstraint
from .generation import generate_tokens, left_pad
from .sampling import TASK_DEFAULTS, GenerationSettings
from .sequence import (
    PIXEL_SLOT,
    SEMANTIC_SLOT,
    ImageGrids,
    block_skeleton,
    image_grids,
    parse_image_block,
    resolution_tag,
)
from .templates import (
    IMAGE_PLACEHOLDER,
    TEXT_TO_IMAGE,
    chat_prompt,
    editing_prompts,
    text_to_image_prompts,
    understanding_message,
)
from .vocabulary import VisionVocabulary, extend_tokenizer, resize_embeddings

logger = logging.getLogger(__name__)


@dataclass
class ImageGenerationOutput:
    """Result of :meth:`UnifiedMLLM.generate_image` / :meth:`UnifiedMLLM.edit_image`.

    Attributes:
        images: decoded images ``[B, 3, H, W]`` in [-1, 1] (or the refiner's output), ``None`` if not decoded.
        semantic_indices: ``[B, hs, ws]``; pixel_indices: ``[B, H/16, W/16]``.
        sequences: generated token ids ``[B, N]`` (``<start_of_image>`` ... ``<|im_end|>``).
        padding: for editing, where the source image sits in the padded canvas (see :func:`unpad_and_resize`).
    """

    images: Any
    semantic_indices: Tensor
    pixel_indices: Tensor
    sequences: Tensor
    padding: list[PaddingBox] | None = None

    def to_pil(self, restore_size: bool = True) -> list:
        """Decoded images as PIL; for edits with ``restore_size`` the padding is removed, the source size restored."""
        from .anchors import unpad_and_resize

        if not torch.is_tensor(self.images):
            raise ValueError("images are not a tensor (not decoded, or a refiner returned another type)")
        pils = ImageProcessor().postprocess(self.images)
        if restore_size and self.padding is not None:
            pils = [unpad_and_resize(p, box) for p, box in zip(pils, self.padding, strict=True)]
        return pils


class UnifiedMLLM(UnifiedCheckpointMixin, nn.Module):
    """Unified understanding / generation / editing model.

    Args:
        language_model: a Hugging Face causal LM whose embedding covers the vision vocabulary.
        tokenizer: its tokenizer, with the vision tokens (see :func:`extend_tokenizer`).
        vision_tokenizer: the :class:`dualvitok.DualViTok` that decodes generated codes.
        config: :class:`UnifiedConfig`.
        vision_tower, mm_projector: continuous-input modules (built from the configs if omitted).
        refiner: optional diffusion decoder, ``refiner(semantic_indices, pixel_indices, num_inference_steps=...,
            guidance_scale=..., generator=...) -> images``; used by :meth:`decode_images` with ``use_refiner=True``.

    Build from parts with :meth:`from_components`, load with :meth:`from_pretrained`.
    """

    def __init__(self, language_model: nn.Module, tokenizer, vision_tokenizer: DualViTok, config: UnifiedConfig,
                 vision_tower: DualVisionTower | None = None, mm_projector: MixedProjector | None = None,
                 refiner: Callable | None = None):
        super().__init__()
        self.config = config
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.vision_tokenizer = vision_tokenizer
        self.vision_tower = vision_tower or DualVisionTower(vision_tokenizer.config, config.semantic_feature)
        hidden = language_model.get_input_embeddings().weight.shape[1]
        self.mm_projector = mm_projector or MixedProjector(config.semantic_dim, config.pixel_dim, hidden)
        self.refiner = refiner
        self.vocabulary = VisionVocabulary(config.first_vision_token_id, config.semantic_codebook_size,
                                           config.pixel_codebook_size, config.resolution_base, config.max_resolution)
        self._check_parts()
        self.eos_token_id = int(tokenizer.convert_tokens_to_ids(config.eos_token))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.understanding_processor = ImageProcessor(min_pixels=config.understanding_min_pixels,
                                                      max_pixels=config.understanding_max_pixels)

    def _check_parts(self) -> None:
        vocab, tok = self.vocabulary, self.tokenizer
        strings = vocab.token_strings()
        probes = [0, 6, len(strings) - 1]
        got = tok.convert_tokens_to_ids([strings[i] for i in probes])
        if got != [vocab.first_id + i for i in probes]:
            raise ValueError(f"the tokenizer's vision token ids {got} do not match the config (expected "
                             f"{[vocab.first_id + i for i in probes]}); extend the tokenizer with extend_tokenizer")
        rows = self.language_model.get_input_embeddings().weight.shape[0]
        if rows < vocab.end_id:
            raise ValueError(f"the language model's embedding has {rows} rows but the vision vocabulary ends at id "
                             f"{vocab.end_id}; call dualvitok.unified.resize_embeddings(model, vocabulary)")
        vq = self.vision_tokenizer.config
        if (vq.semantic_quantizer.codebook_size, vq.pixel_quantizer.codebook_size) != \
                (vocab.semantic_codebook_size, vocab.pixel_codebook_size):
            raise ValueError("the vision tokenizer's codebook sizes do not match the vocabulary's")

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_components(cls, language_model: nn.Module, tokenizer, vision_tokenizer: DualViTok, init: str = "normal",
                        semantic_feature: str = "tower", refiner: Callable | None = None) -> UnifiedMLLM:
        """Extend a text LLM and tokenizer with the vision vocabulary and wrap them (the reference's preparation).

        The tokenizer gets the vision tokens, the embedding / LM head are resized (new rows ``init``: ``"normal"``
        as the reference, or ``"mean"``), the vision tower is initialised from ``vision_tokenizer``'s encoders, and
        the adapters are freshly initialised.
        """
        vq = vision_tokenizer.config
        vocab = extend_tokenizer(tokenizer, vq.semantic_quantizer.codebook_size, vq.pixel_quantizer.codebook_size)
        tokenizer.padding_side = "left"
        if language_model.get_input_embeddings().weight.shape[0] < vocab.end_id:
            resize_embeddings(language_model, vocab, init=init)
        tower = DualVisionTower.from_dualvitok(vision_tokenizer, semantic_feature)
        config = UnifiedConfig(first_vision_token_id=vocab.first_id,
                               semantic_codebook_size=vocab.semantic_codebook_size,
                               pixel_codebook_size=vocab.pixel_codebook_size, semantic_dim=tower.semantic_dim,
                               pixel_dim=tower.pixel_dim, semantic_feature=semantic_feature)
        model = cls(language_model, tokenizer, vision_tokenizer, config, vision_tower=tower, refiner=refiner)
        return model.to(language_model.get_input_embeddings().weight.device)

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------------------------ inputs
    def _to_tensor(self, image: ImageInput | Tensor, processor: ImageProcessor | None) -> Tensor:
        """One image -> ``[3, H, W]`` in [-1, 1]; tensors are taken as model input already (``[3, H, W]``, [-1, 1])."""
        if torch.is_tensor(image):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image tensors must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
            return image.float()
        return (processor or self.understanding_processor).to_tensor(image)

    def encode_images(self, images: Tensor) -> Tensor:
        """Continuous image blocks: ``images [B, 3, H, W]`` in [-1, 1] -> embeddings ``[B, block_length, D]``.

        Marker and ``<end_of_line>`` embeddings come from the LLM's embedding table; code positions hold the
        projected semantic / pixel features (semantic grid first), exactly the skeleton of a discrete block.
        """
        self.vision_tokenizer.check_images(images)
        embed = self.language_model.get_input_embeddings()
        features = self.vision_tower(images.to(self.device))
        semantic, pixel = self.mm_projector(features)  # [B, hs*ws, D], [B, h*w, D]
        grids = ImageGrids(tuple(features.semantic.shape[-2:]), tuple(features.pixel.shape[-2:]))
        skeleton = block_skeleton(self.vocabulary, grids).to(self.device)
        blocks = embed(skeleton.clamp(min=0))[None].repeat(images.shape[0], 1, 1)  # [B, L, D]
        blocks[:, skeleton == SEMANTIC_SLOT] = semantic.to(blocks.dtype)
        blocks[:, skeleton == PIXEL_SLOT] = pixel.to(blocks.dtype)
        return blocks

    def embed_prompt(self, text: str, images: Sequence[Tensor] = ()) -> Tensor:
        """Prompt text with ``<image>`` placeholders + images ``[3, H, W]`` -> input embeddings ``[T, D]``."""
        chunks = text.split(IMAGE_PLACEHOLDER)
        if len(chunks) - 1 != len(images):
            raise ValueError(f"the prompt has {len(chunks) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} "
                             "images were given")
        embed = self.language_model.get_input_embeddings()
        parts: list[Tensor] = []
        for i, chunk in enumerate(chunks):
            ids = self.tokenizer(chunk, add_special_tokens=False).input_ids if chunk else []
            if ids:
                parts.append(embed(torch.tensor(ids, device=self.device)))
            if i < len(images):
                parts.append(self.encode_images(images[i][None])[0])
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------ understanding
    @torch.no_grad()
    def answer(self, question: str, images: ImageInput | Sequence[ImageInput] = (), *,
               max_new_tokens: int | None = None,
               do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
               history: Sequence[tuple[str, str]] = ()) -> str:
        """Answer a question about images (native resolution, continuous input); greedy by default.

        Args:
            question: the question; ``<image>`` placeholders are prepended if missing.
            images: paths / PIL / arrays, or ``[3, H, W]`` tensors in [-1, 1].
            history: earlier ``(role, message)`` turns; ``images`` are all images of the conversation, in order
                (placeholders already in ``history`` count, missing ones are prepended to ``question``).
        """
        if isinstance(images, (str, os.PathLike)) or torch.is_tensor(images) or not isinstance(images, Sequence):
            images = [images]
        tensors = [self._to_tensor(im, None) for im in images]
        message = self.user_message(question, len(tensors), history)
        prompt = chat_prompt([*history, ("user", message)], self.config.system_prompt)
        embeds, mask = left_pad([self.embed_prompt(prompt, tensors)])
        settings = TASK_DEFAULTS["understanding"].replace(
            do_sample=do_sample, text_temperature=temperature, text_top_k=top_k, text_top_p=top_p)
        constraint = ImageBlockConstraint(self.vocabulary, None, 1, self.eos_token_id, force_image_start=False,
                                          allow_images=False, end_after_image=True)
        out = generate_tokens(self.language_model, embeds, mask, constraint, settings,
                              max_new_tokens or settings.max_new_tokens, self.pad_token_id, generator=generator,
                              use_cache=use_cache)
        ids = [t for t in out.sequences[0].tolist() if t not in (self.eos_token_id, self.pad_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @staticmethod
    def user_message(question: str, num_images: int, history: Sequence[tuple[str, str]] = ()) -> str:
        """The user turn for ``question`` when the conversation has ``num_images`` images in total."""
        in_history = sum(message.count(IMAGE_PLACEHOLDER) for _, message in history)
        return understanding_message(question, num_images - in_history)

    # ------------------------------------------------------------------------------------ generation
    def _generate_blocks(self, prompts: list[str], uncond_prompts: list[str], prompt_images: list[list[Tensor]],
                         grids: ImageGrids, settings: GenerationSettings, generator, use_cache: bool,
                         progress: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Shared driver: -> (sequences [B, N], semantic [B, hs, ws], pixel [B, h, w])."""
        embeds, mask = left_pad([self.embed_prompt(p, ims) for p, ims in zip(prompts, prompt_images, strict=True)])
        u_embeds = u_mask = None
        if settings.guidance_scale != 1.0:
            pairs = zip(uncond_prompts, prompt_images, strict=True)
            u_embeds, u_mask = left_pad([self.embed_prompt(p, ims) for p, ims in pairs])
        constraint = ImageBlockConstraint(self.vocabulary, grids, len(prompts), self.eos_token_id,
                                          force_image_start=True, end_after_image=True)
        budget = settings.max_new_tokens or grids.block_length + 1
        if budget < grids.block_length:
            raise ValueError(f"max_new_tokens={budget} is shorter than the image block ({grids.block_length} tokens)")
        out = generate_tokens(self.language_model, embeds, mask, constraint, settings, budget, self.pad_token_id,
                              u_embeds, u_mask, generator=generator, use_cache=use_cache, progress=progress)
        parsed = [parse_image_block(self.vocabulary, row, grids) for row in out.sequences]
        semantic = torch.stack([p.semantic_indices for p in parsed]).to(self.device)
        pixel = torch.stack([p.pixel_indices for p in parsed]).to(self.device)
        return out.sequences, semantic, pixel

    @torch.no_grad()
    def generate_image(self, prompt: str | Sequence[str], height: int = 512, width: int = 512, *,
                       guidance_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                       top_p: float | None = None, do_sample: bool | None = None,
                       generator: torch.Generator | None = None, decode: bool = True, use_refiner: bool = False,
                       refiner_kwargs: dict | None = None, use_cache: bool = True, progress: bool = False,
                       template: str = TEXT_TO_IMAGE) -> ImageGenerationOutput:
        """Text-to-image at ``height x width`` (multiples of 64 up to 1024; the 11 anchors or 256x256 as trained).

        Defaults (``TASK_DEFAULTS["text_to_image"]``): guidance 2.0, temperature 1, top-k 2048 (pixel 6144), top-p 1.
        ``top_k`` sets the semantic top-k and 3x it for pixels.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tag = resolution_tag(height, width)
        self.vocabulary.resolution_tag_ids(height, width)  # validates the size
        pairs = [text_to_image_prompts(p, tag, template) for p in prompts]
        settings = TASK_DEFAULTS["text_to_image"].replace(guidance_scale=guidance_scale, temperature=temperature,
                                                          top_k=top_k, top_p=top_p, do_sample=do_sample)
        grids = image_grids(height, width)
        seqs, semantic, pixel = self._generate_blocks([c for c, _ in pairs], [u for _, u in pairs],
                                                      [[] for _ in prompts], grids, settings, generator, use_cache,
                                                      progress)
        images = self.decode_images(semantic, pixel, use_refiner, **(refiner_kwargs or {})) if decode else None
        return ImageGenerationOutput(images, semantic, pixel, seqs)

    @torch.no_grad()
    def edit_image(self, image: ImageInput | Sequence[ImageInput], instruction: str | Sequence[str], *,
                   resolution: tuple[int, int] | None = None, guidance_scale: float | None = None,
                   temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   do_sample: bool | None = None, generator: torch.Generator | None = None, decode: bool = True,
                   use_refiner: bool = False, refiner_kwargs: dict | None = None, use_cache: bool = True,
                   progress: bool = False) -> ImageGenerationOutput:
        """Edit images by instructions; output at the source's nearest anchor (or ``resolution=(H, W)``).

        The source is resized to fit the target size and padded with white (the reference's inference mode); the
        result keeps the padded canvas (``output.to_pil()`` removes the padding and restores the source size).
        Defaults (``TASK_DEFAULTS["editing"]``): guidance 1.25, temperature 0.7, top-k 512 (pixel 1536), top-p 0.8.
        """
        sources = [image] if not isinstance(image, (list, tuple)) else list(image)
        instructions = [instruction] * len(sources) if isinstance(instruction, str) else list(instruction)
        if len(instructions) != len(sources):
            raise ValueError(f"{len(sources)} images but {len(instructions)} instructions")
        pils = [load_image(s) for s in sources]
        sizes = {resolution or nearest_anchor(p.height, p.width) for p in pils}
        if len(sizes) > 1:
            raise ValueError(f"the images match different anchors {sorted(sizes)}; edit them separately or pass "
                             "resolution=(H, W)")
        height, width = sizes.pop()
        tag = resolution_tag(height, width)
        self.vocabulary.resolution_tag_ids(height, width)
        padded = [pad_to_size(p, height, width) for p in pils]
        to_tensor = ImageProcessor(size=(height, width)).to_tensor
        tensors = [[to_tensor(canvas)] for canvas, _ in padded]
        pairs = [editing_prompts(i, tag) for i in instructions]
        settings = TASK_DEFAULTS["editing"].replace(guidance_scale=guidance_scale, temperature=temperature,
                                                    top_k=top_k, top_p=top_p, do_sample=do_sample)
        seqs, semantic, pixel = self._generate_blocks([c for c, _ in pairs], [u for _, u in pairs], tensors,
                                                      image_grids(height, width), settings, generator, use_cache,
                                                      progress)
        images = self.decode_images(semantic, pixel, use_refiner, **(refiner_kwargs or {})) if decode else None
        return ImageGenerationOutput(images, semantic, pixel, seqs, padding=[box for _, box in padded])

    # ------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_images(self, semantic_indices: Tensor, pixel_indices: Tensor, use_refiner: bool = False,
                      num_inference_steps: int = 50, guidance_scale: float = 2.0,
                      generator: torch.Generator | None = None):
        """Codes -> images.

        Args:
            semantic_indices: ``[B, hs, ws]``; pixel_indices: ``[B, h, w]``.
            use_refiner: decode with ``self.refiner`` (the diffusion decoder, 2x super-resolution in the reference)
                instead of DualViTok's pixel decoder; ``num_inference_steps`` / ``guidance_scale`` / ``generator``
                go to it (reference defaults 50 steps, scale 2.0).

        Returns:
            DualViTok: ``[B, 3, 16h, 16w]`` in [-1, 1] (clamped); refiner: whatever it returns.
        """
        if use_refiner:
            if self.refiner is None:
                raise ValueError("use_refiner=True but no refiner is set; assign model.refiner (e.g. a "
                                 "dualvitok.refiner pipeline) or pass refiner= when building the model")
            return self.refiner(semantic_indices, pixel_indices, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, generator=generator)
        device = next(self.vision_tokenizer.parameters()).device
        images = self.vision_tokenizer.decode_indices(semantic_indices.to(device), pixel_indices.to(device))
        return images.clamp(-1, 1)
