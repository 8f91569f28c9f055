"""Peak signal-to-noise ratio, one value per image.

Definition as ``skimage.metrics.peak_signal_noise_ratio`` (RGB, MSE over all channels and pixels of one image,
``data_range`` 1 for [0, 1] images), computed in float64. Written by hand (two lines) rather than with torchmetrics
so that the float64 accumulation is guaranteed whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_pair


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB of each image.

    Args:
        pred: reconstructions ``[B, C, H, W]`` in [0, 1].
        target: originals ``[B, C, H, W]`` in [0, 1].
        data_range: the maximum possible value difference (1 for [0, 1] images).

    Returns:
        ``[B]`` float64; ``inf`` for identical images.
    """
    check_pair(pred, target, "psnr")
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)  # [B]
    return 10.0 * torch.log10(data_range**2 / mse)
