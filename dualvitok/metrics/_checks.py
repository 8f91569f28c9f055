"""Shared input checks and optional-dependency imports of :mod:`dualvitok.metrics`."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from .._utils.deps import require as _require


def require(module: str) -> ModuleType:
    """Import an optional dependency of the ``eval`` extra, or raise an ImportError that says how to install it."""
    return _require(module, "eval", "dualvitok.metrics")


def check_pair(pred: Tensor, target: Tensor, name: str = "metric") -> None:
    """Raise a clear error unless ``pred`` and ``target`` are float ``[B, 3, H, W]`` images in [0, 1] of one shape."""
    for label, t in (("pred", pred), ("target", target)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name}: {label} must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be float in [0, 1], got {t.dtype}; convert uint8 with x / 255")
        if t.ndim != 4:
            hint = "; add a batch dimension with x.unsqueeze(0)" if t.ndim == 3 else ""
            raise ValueError(f"{name}: {label} must be [B, C, H, W], got shape {tuple(t.shape)}{hint}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    lo = min(float(pred.min()), float(target.min())) if pred.numel() else 0.0
    hi = max(float(pred.max()), float(target.max())) if pred.numel() else 1.0
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name}: images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map model outputs in "
                         "[-1, 1] with (x + 1) / 2 (and clamp), uint8 data with x / 255")
