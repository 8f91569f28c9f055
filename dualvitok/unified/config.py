"""Configuration of the unified MLLM wrapper (JSON round trip, strict keys).

Collects what the ILLUME+ reference keeps in its ``illume_qwen2`` config (``special_tokens_ids``, ``mm_hidden_size``,
``mm_vision_tower`` pixel bounds) and its hard-coded constants (first vision id 151665, codebook sizes); written for
this library.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .._utils import atomic_write
from .._utils.decoding import from_dict
from .templates import SYSTEM_PROMPT


@dataclass
class UnifiedConfig:
    """Settings of :class:`dualvitok.unified.UnifiedMLLM` that are not in the LLM's or DualViTok's config.

    Attributes:
        first_vision_token_id: id of ``<start_of_image>`` (the text vocabulary size; 151665 for Qwen2.5).
        semantic_codebook_size, pixel_codebook_size: vision vocabulary sizes (32768 / 98304 released).
        resolution_base, max_resolution: resolution tags ``<height_v>``, ``v = base .. max`` (64 .. 1024).
        semantic_feature: continuous semantic input: ``"tower"`` (reference) or ``"target"``.
        semantic_dim, pixel_dim: adapter input widths (3584 / 32 released, the reference's ``mm_hidden_size``).
        understanding_min_pixels, understanding_max_pixels: native-resolution bounds for understanding
            (stage-3 config: 32x32 .. 768x768).
        system_prompt: ChatML system message.
        eos_token: end of an assistant turn.
    """

    first_vision_token_id: int
    semantic_codebook_size: int
    pixel_codebook_size: int
    semantic_dim: int
    pixel_dim: int
    resolution_base: int = 64
    max_resolution: int = 1024
    semantic_feature: str = "tower"
    understanding_min_pixels: int = 32 * 32
    understanding_max_pixels: int = 768 * 768
    system_prompt: str = SYSTEM_PROMPT
    eos_token: str = "<|im_end|>"
    model_type: str = "dualvitok_unified"
    config_version: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UnifiedConfig:
        """Build from a dict; unknown keys raise ``ValueError``."""
        return from_dict(cls, data, keep_lists=tuple(f.name for f in dataclasses.fields(cls)))

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write JSON atomically."""
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> UnifiedConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
