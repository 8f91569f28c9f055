"""Resolve a model specification (bundled demo, folder, Hub repo or registered name) to a DualViTok."""

from __future__ import annotations

import logging
import os

import torch

from ._hubfiles import DEMO_NAMES

logger = logging.getLogger(__name__)


def load_demo(device: str | torch.device = "cpu", **kwargs):
    """The small demo DualViTok shipped with the package (``dualvitok_tiny`` trained on CPU; see its card,
    ``dualvitok/assets/demo_model/README.md``). Same as ``DualViTok.from_pretrained("dualvitok-demo")``.

    Args:
        device: where to put the model (``"auto"``: cuda, mps, npu or cpu).
        kwargs: passed to :meth:`DualViTok.from_pretrained` (e.g. ``dtype=torch.bfloat16``).
    """
    from .assets import demo_model_path
    from .devices import resolve_device
    from .model import DualViTok

    return DualViTok.from_pretrained(demo_model_path(), **kwargs).to(resolve_device(device))


ALIASES = {"tiny": "dualvitok_tiny"}
"""Short names accepted by ``--model`` (the unified commands' ``tiny`` is the tiny unified model around it)."""


def load_model(spec: str | os.PathLike | None = None, device: str | torch.device = "cpu", **kwargs):
    """Load a DualViTok.

    Args:
        spec: ``None``, ``"dualvitok-demo"`` or ``"demo"``: the bundled demo model; a folder (ours or the reference
            layout); a Hub repo id; a registered architecture name (random weights, with a warning); or a
            ``dualvitok train`` run folder or checkpoint (:func:`dualvitok.training.run_model.load_run_model`).
        device: where to put the model (``"auto"``: cuda, mps, npu or cpu).
        kwargs: passed to :meth:`DualViTok.from_pretrained`.
    """
    from .devices import resolve_device
    from .model import DualViTok
    from .registry import create_model, list_models

    if spec is None or (str(spec) in DEMO_NAMES and not os.path.isdir(spec)):
        return load_demo(device, **kwargs)
    device = resolve_device(device)
    name = ALIASES.get(str(spec), str(spec)) if not os.path.exists(spec) else str(spec)
    if name in list_models() and not os.path.isdir(spec):
        logger.warning("building %s with RANDOM weights (a registered architecture, not a checkpoint)", name)
        return create_model(name).to(device).eval()
    if not os.path.exists(spec) and "/" not in str(spec):
        raise FileNotFoundError(
            f"unknown model {str(spec)!r}: not a folder or file here, not a registered architecture and not a Hub "
            f"repo id (owner/name); registered: {', '.join(list_models())}; the bundled demo: 'demo' "
            "(aliases: " + ", ".join(f"{a!r} = {n}" for a, n in ALIASES.items()) + ")")
    if os.path.exists(spec):  # a training run folder or checkpoint (dualvitok.training.run_model)
        from .training.run_model import load_run_model

        from_run = load_run_model(spec, **kwargs)
        if from_run is not None:
            return from_run.to(device)
    return DualViTok.from_pretrained(spec, **kwargs).to(device)
