"""Device selection, including Ascend NPUs when ``torch_npu`` is installed (extra ``npu``).

``torch_npu`` is imported only when an ``npu`` device is asked for (or probed by ``"auto"``): on machines without
Ascend drivers importing it breaks ``import torch``, so it is never imported otherwise.
"""

from __future__ import annotations

import importlib.util

import torch


def is_npu_available() -> bool:
    """True if ``torch_npu`` is installed, imports, and sees an NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception:
        return False


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> cuda, npu or cpu (first available); ``"npu[:i]"`` checks for ``torch_npu`` with a clear error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("npu") if is_npu_available() else torch.device("cpu")
    if name.startswith("npu") and not is_npu_available():
        raise RuntimeError(f"device {device!r} needs torch_npu and Ascend drivers: pip install 'dualvitok[npu]'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)
