"""Codebook usage of both DualViTok codebooks (utilisation, perplexity, histograms), merged across processes.

Built on :class:`dualvitok.quantizers.CodebookUsage`. Unlike the reference evaluation (which all-gathers only the pixel
codebook's usage, so its semantic utilisation counts rank 0 alone), both codebooks are summed over all processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._utils import atomic_write
from ..quantizers import CodebookUsage


@dataclass
class DualCodebookUsage:
    """Usage counters of the semantic and the pixel codebook."""

    semantic: CodebookUsage
    pixel: CodebookUsage

    @classmethod
    def for_model(cls, model) -> DualCodebookUsage:
        """Empty counters sized for ``model``'s two quantizers."""
        return cls(CodebookUsage(model.semantic_quantizer.codebook_size),
                   CodebookUsage(model.pixel_quantizer.codebook_size))

    def update(self, encoding) -> None:
        """Count the ``semantic_indices`` and ``pixel_indices`` of a :class:`dualvitok.outputs.DualViTokEncoding`."""
        self.semantic.update(encoding.semantic_indices)
        self.pixel.update(encoding.pixel_indices)

    def all_reduce(self, group=None) -> DualCodebookUsage:
        """Sum both histograms over all processes (no-op outside torch.distributed); returns ``self``."""
        self.semantic.all_reduce(group)
        self.pixel.all_reduce(group)
        return self

    def to_dict(self) -> dict:
        """``{"semantic": {...}, "pixel": {...}}`` with codebook_size, tokens, used_codes, utilisation, perplexity."""
        return {"semantic": self.semantic.to_dict(), "pixel": self.pixel.to_dict()}

    def save_histograms(self, path: str | os.PathLike) -> Path:
        """Write both histograms (int64 counts) to ``.npz`` with keys ``semantic`` and ``pixel`` (atomically)."""
        path = Path(path)
        with atomic_write(path, suffix=".npz") as tmp:  # numpy appends .npz to other names
            np.savez_compressed(tmp, semantic=self.semantic.histogram().numpy(), pixel=self.pixel.histogram().numpy())
        return path
