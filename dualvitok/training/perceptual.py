"""LPIPS perceptual loss for training, usable offline: local backbone weights or a random (untrained) backbone.

A thin subclass of the package's one LPIPS wrapper, :class:`dualvitok.metrics.lpips.LPIPS` (the ``lpips`` package,
Zhang et al. 2018), whose VGG16 variant with the shipped v0.1 linear weights is the perceptual loss ILLUME+ uses
(taming-transformers' ``LPIPS``, ``illume-unified-mllm/ILLUME_plus``: the same input scaling, channel normalisation,
1x1 ``lin`` layers and spatial mean summed over 5 VGG stages). Differences from the reference: the ImageNet VGG16
trunk cannot be downloaded here, so it is loaded from a local torchvision state dict (``backbone_weights``, or the
torch hub cache when present) and otherwise left randomly initialised, with a warning; the module always runs in
eval mode (no LPIPS dropout; the reference leaves dropout active during training), so the loss is deterministic and
identical under data parallelism.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import Tensor

from ..metrics.lpips import LPIPS, LPIPS_VGG

logger = logging.getLogger(__name__)

__all__ = ["LPIPSLoss", "TORCHVISION_VGG16_FILE"]

TORCHVISION_VGG16_FILE = LPIPS_VGG.filename
"""File name torchvision uses for the ImageNet VGG16 weights in the torch hub cache."""


class LPIPSLoss(LPIPS):
    """Frozen LPIPS distance: ``(inputs, reconstructions) [B, 3, H, W] in [-1, 1] -> [B]`` per-image distances.

    Args:
        net: trunk (``vgg`` as in the reference, or ``alex``/``squeeze``).
        backbone_weights: path to a torchvision state dict of the trunk (``features.N.weight`` keys, ``.pth`` or
            ``.safetensors``); ``"auto"`` looks for torchvision's cached VGG16 file; ``None`` keeps a random trunk.
        lin_weights: ``"bundled"`` (the linear layers shipped with ``lpips``), a path, or ``None`` (random).
    """

    def __init__(self, net: str = "vgg", backbone_weights: str | os.PathLike | None = "auto",
                 lin_weights: str | os.PathLike | None = "bundled"):
        super().__init__(net, extra="train")
        if lin_weights is not None:
            self.load_linear_layers(None if lin_weights == "bundled" else lin_weights)
        path = self._resolve_backbone(net, backbone_weights)
        if path is not None:
            self.load_backbone(path)
        elif backbone_weights is not None:
            logger.warning("LPIPS: no %s backbone weights found (pass backbone_weights=PATH to a torchvision state "
                           "dict); using a RANDOMLY INITIALISED trunk, the loss is then only a rough structural term",
                           net)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _resolve_backbone(net: str, backbone_weights) -> Path | None:
        if backbone_weights is None:
            return None
        if backbone_weights != "auto":
            path = Path(backbone_weights)
            if not path.is_file():
                raise FileNotFoundError(f"LPIPS backbone weights not found: {path}")
            return path
        if net not in ("vgg", "vgg16"):
            return None
        cached = LPIPS_VGG.cache_path()
        return cached if cached.is_file() else None

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Always stays in eval mode (no dropout, deterministic)."""
        return super().train(False)

    def forward(self, inputs: Tensor, reconstructions: Tensor) -> Tensor:
        """Per-image LPIPS ``[B]`` of ``[B, 3, H, W]`` images in [-1, 1] (gradients flow to both inputs)."""
        return self.distance(inputs, reconstructions, normalize=False)
