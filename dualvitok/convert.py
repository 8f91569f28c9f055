"""Conversion between the ILLUME+ reference checkpoint layout and this library's state dict.

The module tree of :class:`dualvitok.DualViTok` uses the reference's names, so conversion is small and explicit:

* training-checkpoint wrappers (``model`` / ``ema`` / ``state_dict``) are unwrapped and a ``module.`` prefix (DDP)
  is stripped;
* ``semantic_encoder.proj_in.weight`` is stored by the reference as a 1x1 Conv2d ``[E, C, 1, 1]`` but applied as a
  linear map: it becomes a Linear weight ``[E, C]``;
* non-persistent RoPE ``inv_freq`` buffers, if a file carries them, are dropped (they are recomputed).

Files are read with safetensors or ``torch.load(weights_only=True)`` (``dualvitok._weights``); pickled code is never
executed. This module also decides which layout a folder's config is in (:func:`config_layout`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._weights import read_state_dict, unwrap_state_dict

logger = logging.getLogger(__name__)

_PROJ_IN = "semantic_encoder.proj_in.weight"


def config_layout(data: Any) -> str | None:
    """``"dualvitok"`` for this library's ``config.json``, ``"reference"`` for an ILLUME+ (reference-layout) config,
    None for anything else (e.g. a remote-code config of another library)."""
    if not isinstance(data, Mapping):
        return None
    if data.get("model_type") == "dualvitok":
        return "dualvitok"
    if "semantic_encoder" in data or "vq_model" in data:
        return "reference"
    return None


def reference_key(key: str) -> str | None:
    """Reference key -> this library's key (None: dropped, e.g. recomputed RoPE ``inv_freq`` buffers)."""
    if key.startswith("module."):
        key = key[len("module."):]
    if key.endswith("inv_freq"):
        return None
    return key


def convert_reference_tensor(key: str, value: Tensor) -> Tensor:
    """A tensor under its converted key: the reference's 1x1-conv ``proj_in`` ``[E, C, 1, 1]`` becomes ``[E, C]``."""
    if key == _PROJ_IN and value.ndim == 4:
        return value.reshape(value.shape[0], value.shape[1])
    return value


def convert_reference_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """:func:`convert_reference_tensor` on shapes (to check a file before reading its data)."""
    if key == _PROJ_IN and len(shape) == 4:
        return tuple(shape[:2])
    return tuple(shape)


def load_weights(weights: Mapping[str, Tensor] | str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """Load a state dict from a mapping or a file, unwrapping training checkpoints.

    Args:
        weights: a state dict, or a path to ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``.
        use_ema: take the ``ema`` entry of a training checkpoint (error if absent).
    """
    if isinstance(weights, (str, os.PathLike)):
        return read_state_dict(weights, use_ema=use_ema)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a state dict (mapping of names to tensors), got {type(weights).__name__}")
    return unwrap_state_dict(weights, use_ema=use_ema, source="the weights")


def load_reference(cls, config: Mapping[str, Any] | str | os.PathLike,
                   weights: Mapping[str, Tensor] | str | os.PathLike, *, use_ema: bool = False, strict: bool = True,
                   check_weights: bool = True, dtype: torch.dtype | None = None):
    """``cls.from_reference``: a reference config and reference-named weights (file or state dict), streamed into a
    model built with meta parameters (no random-initialised copy; the weights are held once)."""
    from ._weights import LoadingError, WeightFiles
    from .configuration import DualViTokConfig
    from .hub import _build_and_load

    try:
        model_config = DualViTokConfig.from_reference(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        where = os.fspath(config) if isinstance(config, (str, os.PathLike)) else "the reference config"
        raise LoadingError(f"{where}: not a valid DualViTok reference config: {e}") from None
    if isinstance(weights, (str, os.PathLike)) and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {os.fspath(weights)}")
    if not isinstance(weights, (str, os.PathLike, Mapping)):
        raise TypeError(f"weights must be a state dict (mapping of names to tensors) or a file path, got "
                        f"{type(weights).__name__}")
    with WeightFiles(weights, use_ema=use_ema) as stream:
        model = _build_and_load(cls, model_config, stream, reference=True, strict=strict, dtype=dtype, device="cpu",
                                check=check_weights, hint=None)
    return model.eval()


def convert_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reference (ILLUME+) key layout -> this library's state dict."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = reference_key(key)
        if new is not None:
            out[new] = convert_reference_tensor(new, value)
    return out


def to_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This library's state dict -> the reference key layout (loadable by the ILLUME+ code)."""
    out = dict(state_dict)
    if _PROJ_IN in out and out[_PROJ_IN].ndim == 2:
        out[_PROJ_IN] = out[_PROJ_IN][:, :, None, None]  # [E, C] -> [E, C, 1, 1]
    return out
