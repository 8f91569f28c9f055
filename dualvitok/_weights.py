"""The one weight-file reader of the package (private).

Every weight file the library reads (its own checkpoints, the ILLUME+ reference files, LPIPS / Inception weights,
training checkpoints) goes through here:

* ``.safetensors`` files (and sharded ``*.safetensors.index.json`` sets) are opened with ``safetensors.safe_open``
  and read one tensor at a time, so a loader can cast, check and place each tensor before the next is read (a
  tensor of the file's dtype on the CPU is a copy-on-write memory map of the file: no second copy is made);
* anything else is read with ``torch.load(weights_only=True)``: pickled code is never executed, and a refused
  pickle gives :class:`UnsafeCheckpointError` (a ``ValueError``) naming the file, not a raw ``UnpicklingError``;
* training-checkpoint wrappers (``model`` / ``state_dict`` / ``module``, or ``ema`` on request) are unwrapped.

:func:`check_weights` is the load-time guard against NaN/Inf values and non-float weights (one pass, opt-out).
:func:`parameters_on_meta` builds a module without materialising its parameters (accelerate's
``init_empty_weights(include_buffers=False)`` idea), so a loader can ``load_state_dict(assign=True)`` the file's
tensors without a random-initialised copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

WRAPPERS = ("model", "state_dict", "module")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoadingError(ValueError, RuntimeError):
    """A checkpoint cannot be loaded: unreadable/truncated file, or it does not fit the model (missing /
    unexpected keys, shape mismatches, non-finite or non-float weights). A ``ValueError`` (and, as before, a
    ``RuntimeError``)."""


class UnsafeCheckpointError(LoadingError):
    """``torch.load(weights_only=True)`` refused a file: it holds pickled objects other than tensors and containers."""


# --------------------------------------------------------------------------------------------------- torch.load
def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file holds pickled code or objects (never executed).
        LoadingError: not a torch file, or truncated / corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UnsafeCheckpointError(
                f"refused to load {path}: it holds pickled objects other than tensors, and torch.load("
                f"weights_only=True) never runs pickled code ({reason}). Re-save the state dict with safetensors "
                "(safetensors.torch.save_file) or as a plain dict of tensors"
            ) from None
        raise LoadingError(f"could not read {path} with torch.load(weights_only=True): {reason}; the file may be "
                           "truncated or corrupt (download or copy it again)") from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):
            return load_torch_file(path, map_location, mmap=False)
        raise LoadingError(f"could not read {path} as a torch checkpoint ({str(e).splitlines()[0]}); the file may "
                           "be truncated or corrupt (download or copy it again)") from None
    except (EOFError, ValueError, OSError) as e:
        raise LoadingError(f"could not read {path} as a torch checkpoint ({e}); the file may be truncated or "
                           "corrupt (download or copy it again)") from None


def unwrap_state_dict(obj: Any, use_ema: bool = False, source: str = "the checkpoint") -> dict[str, Tensor]:
    """A state dict from a plain one or a training checkpoint (``model`` / ``state_dict`` / ``module`` / ``ema``)."""
    if not isinstance(obj, Mapping):
        raise LoadingError(f"{source} is not a state dict (a mapping of names to tensors) but a {type(obj).__name__}")
    if use_ema:
        if "ema" not in obj:
            raise KeyError(f"use_ema=True but {source} has no 'ema' entry (top-level keys: {sorted(obj)[:10]})")
        obj = obj["ema"]
    else:
        for key in WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise LoadingError(f"no tensors found in {source} (expected a state dict, or a checkpoint with "
                           "'model' / 'ema')")
    return tensors


# --------------------------------------------------------------------------------------------------- lazy files
class WeightFiles:
    """A checkpoint (one file, or a sharded safetensors set) read lazily: names and shapes first, tensors on demand.

    Args:
        paths: the weight files (``.safetensors`` files are streamed; others are read with ``torch.load``), or one
            ``*.safetensors.index.json`` whose ``weight_map`` names shards beside it.
        use_ema: for ``torch.load`` checkpoints, take the ``ema`` entry.

    Use as a context manager (safetensors handles stay open until exit).
    """

    def __init__(self, paths: list[str | os.PathLike] | str | os.PathLike | Mapping[str, Any], use_ema: bool = False):
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._eager: dict[str, Tensor] = {}
        self._stack = contextlib.ExitStack()
        self._opened = False
        self.use_ema = use_ema
        if isinstance(paths, Mapping):  # an in-memory state dict (or training checkpoint)
            self.paths = ["the given state dict"]
            self._eager = unwrap_state_dict(paths, use_ema, source="the given state dict")
            self._where = dict.fromkeys(self._eager, self.paths[0])
            self._opened = True
            return
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]

    def __enter__(self) -> WeightFiles:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._stack.close()
        self._handles.clear()
        self._eager = {}

    def open(self) -> None:
        if self._opened:
            return
        self._opened = True
        files: list[str] = []
        for path in self.paths:
            if path.endswith(".index.json"):
                files.extend(shards_from_index(path))
            else:
                files.append(path)
        for path in files:
            if path.endswith(".safetensors"):
                handle = self._open_safetensors(path)
                for key in handle.keys():
                    self._where[key] = path
            else:
                tensors = unwrap_state_dict(load_torch_file(path, mmap=True), self.use_ema, source=path)
                for key, value in tensors.items():
                    self._where[key] = path
                    self._eager[key] = value

    def _open_safetensors(self, path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # SafetensorError (Rust) for a torn header, OSError, ...
            raise LoadingError(f"{path} is not a readable safetensors file ({e}); it is probably truncated or "
                               "corrupt: download or copy it again") from None
        size = os.path.getsize(path)
        end = _safetensors_data_end(path)
        if end is not None and end > size:
            raise LoadingError(f"{path} is truncated: its header describes {end:,} bytes but the file has {size:,}; "
                               "download or copy it again")
        self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        self.open()
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        path = self._where[key]
        if key in self._eager:
            return tuple(self._eager[key].shape)
        return tuple(self._handles[path].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | str:
        if key in self._eager:
            return self._eager[key].dtype
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name, name)

    def get(self, key: str) -> Tensor:
        """The tensor ``key`` (read now; a later ``get`` reads it again)."""
        if key in self._eager:
            return self._eager[key]
        path = self._where[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise LoadingError(f"could not read tensor {key!r} from {path} ({e}); the file is probably truncated or "
                               "corrupt: download or copy it again") from None

    def file_of(self, key: str) -> str:
        return self._where[key]

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor, read now."""
        return {k: self.get(k) for k in self.keys()}

    @property
    def description(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}


def _safetensors_data_end(path: str) -> int | None:
    """Byte offset where the last tensor of a safetensors file ends (from its header), or None if unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return 8 + n + max(ends, default=0)


def shards_from_index(index_path: str | os.PathLike) -> list[str]:
    """The shard files named by a ``*.safetensors.index.json`` (``weight_map``), beside the index."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadingError(f"{index_path} is not a valid shard index (a JSON object with a 'weight_map'): {e}") \
            from None
    return [os.fspath(index_path.parent / name) for name in names]


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """All tensors of a weight file (safetensors, sharded index, or ``torch.load``-able), unwrapped."""
    with WeightFiles(path, use_ema=use_ema) as files:
        return files.state_dict()


# --------------------------------------------------------------------------------------------------- checks
def check_weights(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor] | None = None,
                  source: str = "the checkpoint") -> None:
    """Refuse NaN/Inf values, and integer / bool / fp8 / complex tensors where the model has floating weights.

    One pass over the floating tensors (``torch.isfinite(t).all()``). ``expected`` (the model's own state dict,
    meta tensors are fine) says which entries must be floating; without it every tensor is checked.

    Raises:
        LoadingError: naming the tensors; ``check_weights=False`` on the loaders skips this check.
    """
    bad_dtype, non_finite = [], []
    for key, value in tensors.items():
        wants_float = expected is None or (key in expected and expected[key].is_floating_point())
        if not wants_float:
            continue
        if value.dtype not in FLOAT_DTYPES:
            bad_dtype.append(f"{key} ({value.dtype})")
        elif not all_finite(value):
            non_finite.append(key)
    problems = []
    if bad_dtype:
        problems.append(f"{len(bad_dtype)} weights are not float16/bfloat16/float32/float64: {_first(bad_dtype)}")
    if non_finite:
        problems.append(f"{len(non_finite)} weights hold NaN or Inf: {_first(non_finite)}")
    if problems:
        raise LoadingError(f"refusing to load {source}: " + "; ".join(problems)
                           + ". The file is damaged or not a DualViTok float checkpoint; pass check_weights=False "
                           "to load it anyway")


def all_finite(tensor: Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN/Inf in a floating tensor (True for other dtypes and meta tensors). Checked in chunks of ``chunk``
    elements, so the temporaries stay small (``torch.isfinite`` on a whole 340 MB weight takes ~600 MB more)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def _first(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------- meta build
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory, no random init cost); buffers
    stay real, so non-persistent ones (RoPE frequencies, normalisation constants) need no reloading."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


# --------------------------------------------------------------------------------------------------- dtype kw
def dtype_keyword(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None = None,
                  where: str = "from_pretrained") -> torch.dtype | None:
    """The library's one dtype keyword is ``dtype`` (as transformers >= 4.56); ``torch_dtype`` still works with a
    DeprecationWarning. Strings such as ``"bfloat16"`` are accepted."""
    if torch_dtype is not None:
        warnings.warn(f"{where}(torch_dtype=...) is deprecated; pass dtype=... (the same keyword everywhere in "
                      "dualvitok)", DeprecationWarning, stacklevel=3)
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"{where}: dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype")
        dtype = torch_dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'bfloat16' or 'float16'")
        dtype = value
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}")
    return dtype
