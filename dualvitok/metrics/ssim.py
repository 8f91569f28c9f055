"""Structural similarity (SSIM, Wang et al. 2004), one value per image, and the reference repository's variant.

``ssim``: the standard definition (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population covariance,
``data_range`` 1 for [0, 1] images), averaged over the valid window positions and over channels; equal to
``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=-1)``. torchmetrics' SSIM pads the borders differently (about 1.5e-3 off skimage on a
photo), so this is written directly: separable "valid" filtering in float64, which equals skimage's reflect-padded
filtering followed by its border crop.

``ssim_reference_inflated``: what ILLUME+ (``tokenizer/reconstruction_vq_ddp.py``) and LlamaGen report:
skimage's defaults (7x7 uniform window, sample covariance) with ``data_range=2.0`` on [0, 1] images. The wrong data
range makes the stabilising constants C1, C2 four times too large, which raises SSIM (e.g. 0.675 vs 0.54 for
LlamaGen's VQ-16); use it only to compare with numbers published that way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_pair


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian window ``[size]`` (float64); the 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def uniform_window(size: int = 7) -> Tensor:
    """Uniform 1-D window ``[size]`` (float64); the 2-D window is its outer product."""
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def _valid_filter(x: Tensor, window: Tensor) -> Tensor:
    """Separable "valid" filtering of ``[N, H, W]`` with the outer product of ``window [k]`` -> ``[N, H-k+1, W-k+1]``.

    Done as two matrix products with banded (Toeplitz) matrices, which is exact and much faster than a float64
    ``conv2d`` on CPU.
    """
    k = window.shape[0]

    def band(n: int) -> Tensor:  # [n, n-k+1], column j holds the window at rows j..j+k-1
        m = torch.zeros(n, n - k + 1, dtype=x.dtype, device=x.device)
        for i in range(k):
            m.diagonal(-i).fill_(float(window[i]))
        return m

    y = x @ band(x.shape[-1])  # filter along W: [N, H, W-k+1]
    return (y.transpose(-1, -2) @ band(x.shape[-2])).transpose(-1, -2)  # along H: [N, H-k+1, W-k+1]


def ssim_with_window(pred: Tensor, target: Tensor, window: Tensor, data_range: float = 1.0, k1: float = 0.01,
                     k2: float = 0.03, sample_covariance: bool = False) -> Tensor:
    """SSIM of each image with a separable window, averaged over valid positions and channels.

    Args:
        pred, target: ``[B, C, H, W]`` float images (H, W at least the window size).
        window: ``[k]`` 1-D weights summing to 1 (the 2-D window is their outer product).
        data_range: value range L of the images (C1 = (k1 L)^2, C2 = (k2 L)^2).
        sample_covariance: scale (co)variances by N / (N - 1), N = k * k (skimage's default for uniform windows).

    Returns:
        ``[B]`` float64.
    """
    k = window.shape[-1]
    if pred.shape[-1] < k or pred.shape[-2] < k:
        raise ValueError(f"ssim needs images of at least {k}x{k} pixels, got {tuple(pred.shape[-2:])}")
    b, c, h, w = pred.shape
    x = pred.double().reshape(b * c, h, w)
    y = target.double().reshape(b * c, h, w)
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=0)  # [5*B*C, H, W]
    ux, uy, uxx, uyy, uxy = _valid_filter(stacked, window.to(x.device)).chunk(5, dim=0)  # each [B*C, h', w']
    cov_norm = k * k / (k * k - 1) if sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # [B*C, h', w']
    return s.reshape(b, c, -1).mean(-1).mean(-1)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Standard Gaussian-window SSIM of each image (see the module docstring).

    Args:
        pred: reconstructions ``[B, C, H, W]`` in [0, 1].
        target: originals ``[B, C, H, W]`` in [0, 1].

    Returns:
        ``[B]`` float64.
    """
    check_pair(pred, target, "ssim")
    return ssim_with_window(pred, target, gaussian_window(window_size, sigma), data_range=data_range)


def ssim_reference_inflated(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM as ILLUME+/LlamaGen compute it (7x7 uniform window, sample covariance, ``data_range=2`` on [0, 1] data).

    Inflated relative to :func:`ssim`; only for comparison with numbers published that way.

    Shape: ``[B, C, H, W]`` in [0, 1] twice -> ``[B]`` float64.
    """
    check_pair(pred, target, "ssim_reference_inflated")
    return ssim_with_window(pred, target, uniform_window(7), data_range=2.0, sample_covariance=True)
