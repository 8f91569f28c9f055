"""LPIPS perceptual loss for training, usable offline: local backbone weights or a random (untrained) backbone.

Wraps the ``lpips`` package (Zhang et al. 2018), whose VGG16 variant with the shipped v0.1 linear weights is the
perceptual loss ILLUME+ uses (taming-transformers' ``LPIPS``, ``../shared/reference/dualvitok.md`` section 6: the
same input scaling, channel normalisation, 1x1 ``lin`` layers and spatial mean summed over 5 VGG stages).
Differences from the reference: the ImageNet VGG16 trunk cannot be downloaded here, so it is loaded from a local
torchvision state dict (``backbone_weights``, or the torch hub cache when present) and otherwise left randomly
initialised, with a warning; the module always runs in eval mode (no LPIPS dropout; the reference leaves dropout
active during training), so the loss is deterministic and identical under data parallelism.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .._utils.deps import require

logger = logging.getLogger(__name__)

__all__ = ["LPIPSLoss", "TORCHVISION_VGG16_FILE"]

TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
"""File name torchvision uses for the ImageNet VGG16 weights in the torch hub cache."""


def _import_lpips():
    return require("lpips", "train", "the LPIPS loss")


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    from .._weights import read_state_dict

    return read_state_dict(path)


class LPIPSLoss(nn.Module):
    """Frozen LPIPS distance: ``(inputs, reconstructions) [B, 3, H, W] in [-1, 1] -> [B]`` per-image distances.

    Args:
        net: trunk (``vgg`` as in the reference, or ``alex``/``squeeze``).
        backbone_weights: path to a torchvision state dict of the trunk (``features.N.weight`` keys, ``.pth`` or
            ``.safetensors``); ``"auto"`` looks for torchvision's cached file; ``None`` keeps a random trunk.
        lin_weights: ``"bundled"`` (the linear layers shipped with ``lpips``), a path, or ``None`` (random).
    """

    def __init__(self, net: str = "vgg", backbone_weights: str | os.PathLike | None = "auto",
                 lin_weights: str | os.PathLike | None = "bundled"):
        super().__init__()
        lpips = _import_lpips()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation inside lpips
            self.model = lpips.LPIPS(net=net, pretrained=lin_weights == "bundled", pnet_rand=True, verbose=False)
        if lin_weights not in (None, "bundled"):
            self.model.load_state_dict(_load_state_dict(Path(lin_weights)), strict=False)
        self.backbone_pretrained = False
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
        cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE
        return cached if cached.is_file() else None

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Load a torchvision trunk state dict (``features.<i>.weight``/``bias``) into the LPIPS slices."""
        state = _load_state_dict(Path(path))
        targets: dict[str, Tensor] = {}
        for name, module in self.model.net.named_modules():
            # LPIPS slices keep torchvision's feature indices as child names: 'slice2.5' is features.5
            parts = name.split(".")
            if len(parts) == 2 and parts[0].startswith("slice"):
                for pname, param in module.named_parameters(recurse=False):
                    targets[f"features.{parts[1]}.{pname}"] = param
        missing = [k for k in targets if k not in state]
        if missing:
            raise ValueError(f"{path} is not a torchvision {self.model.pnet_type} state dict: missing {missing[:4]}...")
        with torch.no_grad():
            for key, param in targets.items():
                param.copy_(state[key])
        self.backbone_pretrained = True

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Always stays in eval mode (no dropout, deterministic)."""
        return super().train(False)

    def forward(self, inputs: Tensor, reconstructions: Tensor) -> Tensor:
        """Per-image LPIPS ``[B]`` of ``[B, 3, H, W]`` images in [-1, 1] (gradients flow to both inputs)."""
        return self.model(inputs.float(), reconstructions.float(), normalize=False).flatten()
