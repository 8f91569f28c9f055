"""A training run folder or checkpoint used as a model: what ``--model RUN`` means for evaluate, reconstruct, encode.

:func:`load_run_model` accepts

* a run folder of ``dualvitok train`` (its ``final/`` model when the run finished, else its newest readable
  checkpoint), or its ``checkpoints/`` folder;
* a checkpoint file ``checkpoint-<step>.pt`` (EMA weights when the run kept an EMA, as ``final/`` does);
* a sharded FSDP checkpoint folder ``checkpoint-<step>/`` (read on one process with ``torch.distributed.checkpoint``,
  its metadata through an allow-list, tensors with ``weights_only``).

Anything else returns ``None`` so the caller can try other kinds of model specification.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["load_run_model", "is_run_path"]


def is_run_path(spec: str | os.PathLike) -> bool:
    """True if ``spec`` is a training run folder, its ``checkpoints/`` folder or a training checkpoint."""
    from .run import CHECKPOINT_NAME

    path = Path(spec)
    if path.is_file():
        return path.suffix == ".pt" and bool(CHECKPOINT_NAME.match(path.name))
    if not path.is_dir() or (path / "config.json").is_file():
        return False  # a save_pretrained folder is not a run
    if CHECKPOINT_NAME.match(path.name) and (path / "trainer_state.pt").is_file():
        return True
    return (path / "final" / "config.json").is_file() or (path / "checkpoints").is_dir() or (
        path.name == "checkpoints" and any(CHECKPOINT_NAME.match(p.name) for p in path.iterdir()))


def load_run_model(spec: str | os.PathLike, **kwargs):
    """The DualViTok of a training run or checkpoint (see the module docstring), or ``None`` if ``spec`` is not one.

    Args:
        spec: a path.
        kwargs: passed to :meth:`DualViTok.from_pretrained` for a run's ``final/`` folder.
    """
    from ..model import DualViTok
    from .run import CheckpointFolder

    if not is_run_path(spec):
        return None
    path = Path(spec)
    if path.is_dir() and (path / "final" / "config.json").is_file():
        logger.info("%s is a training run: loading its final model %s", path, path / "final")
        return DualViTok.from_pretrained(path / "final", **kwargs)
    if path.is_file() or (path / "trainer_state.pt").is_file():
        model = _from_checkpoint(path)
    else:
        folder = CheckpointFolder(path if path.name == "checkpoints" else path / "checkpoints")
        found, model = folder.load_latest(_from_checkpoint, set_aside=False)
        logger.info("%s has no final/ model: using its newest readable checkpoint %s", path, found)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def _from_checkpoint(path: Path):
    from ..configuration import DualViTokConfig
    from ..model import DualViTok
    from .checkpoint import load_checkpoint

    sharded = path.is_dir()
    state = load_checkpoint(path / "trainer_state.pt" if sharded else path, map_location="cpu")
    if state.get("kind") == "dualvitok-refiner":
        raise ValueError(f"{path} is a refiner training checkpoint, not a tokenizer; pass the tokenizer as --model "
                         "and load the refiner from its run's refiner/ folder")
    if "model_config" not in state:
        raise ValueError(f"{path} is not a dualvitok training checkpoint (no model_config)")
    model = DualViTok(DualViTokConfig.from_dict(state["model_config"]))
    if sharded:
        weights, shadow = _read_sharded(path, model, state.get("ema_decay") is not None)
    else:
        weights, shadow = state["model"], (state.get("ema") or {}).get("shadow")
    model.load_state_dict(weights)
    if shadow:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in shadow:
                    p.copy_(shadow[name].to(p.dtype))
    logger.info("built the model of %s (step %s%s)", path, state.get("step"), ", EMA weights" if shadow else "")
    return model.eval()


def _read_sharded(path: Path, model, has_ema: bool):
    import warnings

    import torch.distributed.checkpoint as dcp

    from .strategy import safe_reader

    tensors = {"model": model.state_dict()}
    if has_ema:
        tensors["ema"] = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=safe_reader(path))
    return tensors["model"], tensors.get("ema")
