"""Inception-v3 pool features (2048-d) for FID, numerically the network of pytorch-fid.

Follows pytorch-fid (github.com/mseitzer/pytorch-fid, ``pytorch_fid/inception.py``: ``InceptionV3`` with the output
block 3 and ``fid_inception_v3``): torchvision's Inception-v3 with 1008 classes and pytorch-fid's FID-specific blocks
(``FIDInceptionA/C/E_1/E_2``), the TF-FID weights ``pt_inception-2015-12-05-6726825d.pth``, input in [0, 1] resized
bilinearly (align_corners=False) to 299x299 and scaled to [-1, 1]. Differs in that building the network does no I/O
(weights are loaded by :meth:`InceptionFeatures.from_pretrained` from a path, the torch hub cache, or a download
only when allowed) and the output is a ``[B, 2048]`` tensor instead of a list of feature maps.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import require
from .weights import FID_INCEPTION, load_state_dict, resolve_weights

FEATURE_DIM = 2048


def _fid_inception_v3() -> nn.Module:
    """torchvision Inception-v3 patched with pytorch-fid's FID blocks, random weights."""
    tv_models = require("torchvision.models")
    fid_inception = require("pytorch_fid.inception")
    net = tv_models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    return net


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID Inception; random weights until :meth:`load_weights`."""

    def __init__(self):
        super().__init__()
        self.inception = _fid_inception_v3()
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None,
                        allow_download: bool = True) -> InceptionFeatures:
        """The FID Inception with pytorch-fid's weights.

        Args:
            weights_path: ``pt_inception-2015-12-05-6726825d.pth``; default: ``$DUALVITOK_FID_WEIGHTS`` or the torch
                hub cache (where pytorch-fid stores its download).
            allow_download: download into the torch hub cache when missing and not offline.

        Raises:
            WeightsNotFoundError: no weights are available (the message says how to provide them).
        """
        path = resolve_weights(FID_INCEPTION, weights_path, allow_download)  # fail before building the network
        module = cls()
        module.load_weights(path)
        return module

    def load_weights(self, path: str | os.PathLike) -> None:
        state = load_state_dict(path)
        try:
            self.inception.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} is not pytorch-fid's FID Inception weights ({str(e)[:200]})") from e

    def forward(self, images: Tensor) -> Tensor:
        """Features of images ``[B, 3, H, W]`` in [0, 1] -> ``[B, 2048]`` float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception features need [B, 3, H, W] images in [0, 1], got {tuple(images.shape)}")
        net = self.inception
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        with torch.no_grad():
            x = net.Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(net, name)(x)
            return F.adaptive_avg_pool2d(x, 1).flatten(1)  # [B, 2048]
