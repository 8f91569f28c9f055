"""Reconstruction metrics (extra ``eval``): PSNR, SSIM, LPIPS, rFID with streaming statistics and three backends
(pytorch-fid, torch-fidelity, clean-fid), codebook usage.

All image metrics take float images ``[B, 3, H, W]`` in [0, 1] and return one value per image (``[B]``).
Heavy optional dependencies (lpips, pytorch-fid, torchvision) are imported only when their metric is built.
See ``docs/evaluation.md`` ("How the numbers are computed").
"""

from .fid import (
    FIDStatistics,
    FrechetInceptionDistance,
    GaussianStatistics,
    fid_from_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from .fid_backends import FID_BACKENDS, FIDBackend, build_fid_backend
from .inception import InceptionFeatures
from .lpips import LPIPS, lpips
from .psnr import psnr
from .ssim import ssim, ssim_reference_inflated
from .usage import DualCodebookUsage
from .weights import WeightsNotFoundError

__all__ = [
    "FID_BACKENDS",
    "DualCodebookUsage",
    "FIDBackend",
    "FIDStatistics",
    "FrechetInceptionDistance",
    "GaussianStatistics",
    "InceptionFeatures",
    "LPIPS",
    "WeightsNotFoundError",
    "build_fid_backend",
    "fid_from_statistics",
    "frechet_distance",
    "load_statistics",
    "lpips",
    "psnr",
    "save_statistics",
    "ssim",
    "ssim_reference_inflated",
]
