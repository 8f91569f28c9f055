"""Conversion between the ILLUME+ reference checkpoint layout and this library's state dict.

The module tree of :class:`dualvitok.DualViTok` uses the reference's names, so conversion is small and explicit:

* training-checkpoint wrappers (``model`` / ``ema`` / ``state_dict``) are unwrapped and a ``module.`` prefix (DDP)
  is stripped;
* ``semantic_encoder.proj_in.weight`` is stored by the reference as a 1x1 Conv2d ``[E, C, 1, 1]`` but applied as a
  linear map: it becomes a Linear weight ``[E, C]``;
* non-persistent RoPE ``inv_freq`` buffers, if a file carries them, are dropped (they are recomputed).

Files are read with safetensors or ``torch.load(weights_only=True)``; pickled code is never executed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_PROJ_IN = "semantic_encoder.proj_in.weight"
_WRAPPERS = ("model", "state_dict", "module")


def load_weights(weights: Mapping[str, Tensor] | str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """Load a state dict from a mapping or a file, unwrapping training checkpoints.

    Args:
        weights: a state dict, or a path to ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``.
        use_ema: take the ``ema`` entry of a training checkpoint (error if absent).
    """
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights = load_file(path)
        else:
            try:
                weights = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle with code objects, or not a torch file
                raise ValueError(
                    f"could not load {path} with torch.load(weights_only=True): {e}. Only plain tensor checkpoints "
                    "are accepted (no pickled code); re-save the state dict with safetensors"
                ) from e
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a state dict (mapping of names to tensors), got {type(weights).__name__}")
    if use_ema:
        if "ema" not in weights:
            raise KeyError(
                f"use_ema=True but the checkpoint has no 'ema' entry (top-level keys: {sorted(weights)[:10]})"
            )
        weights = weights["ema"]
    else:
        for key in _WRAPPERS:
            if key in weights and isinstance(weights[key], Mapping):
                weights = weights[key]
                break
    tensors = {k: v for k, v in weights.items() if torch.is_tensor(v)}
    if not tensors:
        raise ValueError("no tensors found in the weights (expected a state dict, or a checkpoint with 'model'/'ema')")
    return tensors


def convert_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference (ILLUME+) key layout -> this library's state dict."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("inv_freq"):
            continue
        if key == _PROJ_IN and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # [E, C, 1, 1] -> [E, C]
        out[key] = value
    return out


def to_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This library's state dict -> the reference key layout (loadable by the ILLUME+ code)."""
    out = dict(state_dict)
    if _PROJ_IN in out and out[_PROJ_IN].ndim == 2:
        out[_PROJ_IN] = out[_PROJ_IN][:, :, None, None]  # [E, C] -> [E, C, 1, 1]
    return out
