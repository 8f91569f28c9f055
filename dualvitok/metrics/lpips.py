"""LPIPS (Zhang et al. 2018, arXiv 1801.03924) through the ``lpips`` package: the package's one LPIPS wrapper.

Used by evaluation (:class:`LPIPS`, images in [0, 1], no gradients) and by training's perceptual loss
(:class:`dualvitok.training.perceptual.LPIPSLoss`, images in [-1, 1], gradients flow), which subclasses it.

Uses ``lpips.LPIPS`` (v0.1 linear calibration layers, which ship inside the ``lpips`` package) with a VGG16 trunk (the
network ILLUME+ trains its perceptual loss with) or AlexNet (the paper's default for evaluation). Differs from calling
``lpips.LPIPS(pretrained=True)`` directly only in how the trunk weights are found: torchvision's ImageNet weights are
read from an explicit path, an environment variable or the torch hub cache (see :mod:`dualvitok.metrics.weights`)
instead of being downloaded implicitly, so that offline use fails with instructions rather than a socket error.
Building the module does no I/O beyond the package's own bundled linear layers (loaded by the caller).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .._utils.deps import require as _require
from ._checks import check_pair
from .weights import LPIPS_ALEX, LPIPS_VGG, WeightsSpec, load_state_dict, resolve_weights

BACKBONES: dict[str, WeightsSpec] = {"vgg": LPIPS_VGG, "alex": LPIPS_ALEX}
NETS = ("vgg", "alex", "squeeze")  # trunks lpips.LPIPS can build (pretrained lookup: BACKBONES only)


def _check_net(net: str, allowed=tuple(BACKBONES)) -> str:
    if net not in allowed:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(allowed)}")
    return net


class LPIPS(nn.Module):
    """LPIPS distance between [0, 1] images; the trunk starts random (no I/O here, see :meth:`from_pretrained`).

    Args:
        net: ``"vgg"`` or ``"alex"`` (``"squeeze"`` too, without a pretrained-weights lookup).
        extra: the dualvitok extra named when ``lpips`` is missing (``eval``; training passes ``train``).
    """

    def __init__(self, net: str = "vgg", extra: str = "eval"):
        super().__init__()
        lpips = _require("lpips", extra, "LPIPS")
        self.net_name = _check_net(net, NETS)
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=False``
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False).eval()
        self.backbone_pretrained = False
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, net: str = "vgg", weights_path: str | os.PathLike | None = None,
                        allow_download: bool = True) -> LPIPS:
        """LPIPS with the calibrated linear layers and torchvision ImageNet trunk weights.

        Args:
            net: ``"vgg"`` or ``"alex"``.
            weights_path: torchvision trunk weights (``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``);
                default: the environment variable or the torch hub cache.
            allow_download: download the trunk into the torch hub cache when it is missing and not offline.

        Raises:
            WeightsNotFoundError: no trunk weights are available (the message says how to provide them).
        """
        path = resolve_weights(BACKBONES[_check_net(net)], weights_path, allow_download)  # fail before building
        module = cls(net)
        module.load_linear_layers()
        module.load_backbone(path)
        return module

    def load_linear_layers(self, path: str | os.PathLike | None = None) -> None:
        """Load the v0.1 calibration layers (default: the file shipped in the ``lpips`` package)."""
        if path is None:
            package = Path(_require("lpips", "eval", "LPIPS").__file__).parent
            path = package / "weights" / "v0.1" / f"{self.net_name}.pth"
        state = load_state_dict(path)
        missing = [k for k in state if k not in self.model.state_dict()]
        if missing or not any(k.startswith("lin") for k in state):
            raise ValueError(f"{path} is not an LPIPS v0.1 linear-layer file (unexpected keys {missing[:3]})")
        self.model.load_state_dict(state, strict=False)

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Load torchvision ImageNet weights (``features.<i>.*`` keys) into the trunk's slices."""
        state = load_state_dict(path)
        target = {}
        for slice_name, block in self.model.net.named_children():  # slice1..sliceN hold features[i] as child "i"
            for child, _ in block.named_children():
                for param in ("weight", "bias"):
                    key = f"features.{child}.{param}"
                    if key in state:
                        target[f"{slice_name}.{child}.{param}"] = state[key]
        expected = set(self.model.net.state_dict())
        if set(target) != expected:
            raise ValueError(f"{path} does not look like torchvision {self.net_name} ImageNet weights: missing "
                             f"{sorted(expected - set(target))[:4]}")
        self.model.net.load_state_dict(target, strict=True)
        self.backbone_pretrained = True

    def distance(self, a: Tensor, b: Tensor, normalize: bool) -> Tensor:
        """Per-image LPIPS ``[B]`` (float32) of ``[B, 3, H, W]`` images, in [0, 1] (``normalize``) or [-1, 1].

        Gradients flow to both inputs (the perceptual loss); :meth:`forward` is the checked, no-grad metric.
        """
        return self.model(a.float(), b.float(), normalize=normalize).flatten()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Distances ``[B]`` (float32) between ``pred`` and ``target``, both ``[B, 3, H, W]`` in [0, 1]."""
        check_pair(pred, target, "lpips")
        with torch.no_grad():
            return self.distance(pred, target, normalize=True)


_CACHE: dict[tuple, LPIPS] = {}


def lpips(pred: Tensor, target: Tensor, net: str = "vgg", weights_path: str | os.PathLike | None = None) -> Tensor:
    """LPIPS of each image pair with pretrained weights (cached per backbone, path and device).

    Shape: ``[B, 3, H, W]`` in [0, 1] twice -> ``[B]``.
    """
    key = (_check_net(net), str(weights_path), str(pred.device))
    if key not in _CACHE:
        _CACHE[key] = LPIPS.from_pretrained(net, weights_path).to(pred.device)
    return _CACHE[key](pred, target)
