"""Resolve a model specification (bundled demo, folder, Hub repo or registered name) to a DualViTok."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def load_model(spec: str | os.PathLike | None = None, device: str | torch.device = "cpu", **kwargs):
    """Load a DualViTok.

    Args:
        spec: ``None`` or ``"demo"``: the bundled demo model; a folder (ours or the reference layout); a Hub repo id;
            or a registered architecture name (random weights, with a warning).
        device: where to put the model (``"auto"``: cuda, npu or cpu).
        kwargs: passed to :meth:`DualViTok.from_pretrained`.
    """
    from .assets import demo_model_path
    from .devices import resolve_device
    from .model import DualViTok
    from .registry import create_model, list_models

    device = resolve_device(device)
    if spec is None or str(spec) == "demo":
        return DualViTok.from_pretrained(demo_model_path(), **kwargs).to(device)
    if str(spec) in list_models() and not os.path.isdir(spec):
        logger.warning("building %s with RANDOM weights (a registered architecture, not a checkpoint)", spec)
        return create_model(str(spec)).to(device).eval()
    return DualViTok.from_pretrained(spec, **kwargs).to(device)
