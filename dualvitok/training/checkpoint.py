"""Training checkpoints that lose nothing: atomic writes, safe loading, RNG state capture.

No reference counterpart: the ILLUME+ reference saves through accelerate/``torch.save`` and restores no
RNG state. A checkpoint is a nested dict of tensors, optimizer states, numbers, strings, lists and dicts, written with
``torch.save`` to a temporary file in the destination folder, fsync'ed, then ``os.replace``'d over the target, so a
run killed mid-write leaves the previous file intact. Files are read with ``torch.load(weights_only=True)``: no pickled
code is ever executed, which is why RNG states are stored as tensors and plain lists.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state", "latest_checkpoint"]


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry to disk (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: destination file; its folder is created if needed.
        state: nested dict of tensors, optimizer ``state_dict()``s, ints, floats, bools, strings, None, lists, tuples
            and dicts (anything ``torch.load(weights_only=True)`` accepts). Numpy arrays must be converted first
            (``capture_rng_state`` already does).
    """
    path = Path(path)
    with atomic_write(path, fsync=True) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a file written by save_checkpoint or a run folder")
    from .._weights import load_torch_file

    return load_torch_file(path, map_location=map_location)


def capture_rng_state() -> dict[str, Any]:
    """States of Python's ``random``, numpy's global RNG, torch CPU and (if available) all CUDA generators.

    Everything is stored as tensors, ints, strings and lists so that it survives ``weights_only`` loading.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only when CUDA is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32) if torch.is_tensor(npst["keys"]) else np.asarray(npst["keys"])
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>.pt`` (or sharded ``checkpoint-<step>/``) with the highest step in ``folder`` (or
    ``folder/checkpoints``), else None. Temporary files of interrupted writes (``.checkpoint-*.tmp``) are never
    returned. See :class:`dualvitok.training.run.CheckpointFolder` for rotation and corrupt-file fallback."""
    from .run import CheckpointFolder

    folder = Path(folder)
    entries = CheckpointFolder(folder).entries() + CheckpointFolder(folder / "checkpoints").entries()
    return max(entries, key=lambda item: item[0])[1] if entries else None
