"""Device selection, including Ascend NPUs when ``torch_npu`` is installed (extra ``npu``).

``torch_npu`` is imported only when an ``npu`` device is asked for (or probed by ``"auto"``): on machines without
Ascend drivers importing it breaks ``import torch``, so it is never imported otherwise.
"""

from __future__ import annotations

import importlib.util
import os

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


def is_mps_available() -> bool:
    """True on Apple-silicon builds of torch with the Metal (MPS) backend usable."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The library's one device policy: ``"auto"`` -> cuda > mps > npu > cpu (the first available).

    Explicit names are checked with a clear error (``"npu[:i]"`` needs ``torch_npu``, ``"cuda"`` a CUDA build and a
    GPU, ``"mps"`` Apple's Metal backend). Every command's ``--device`` goes through here.
    """
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if is_mps_available():
            return torch.device("mps")
        return torch.device("npu") if is_npu_available() else torch.device("cpu")
    if name.startswith("npu") and not is_npu_available():
        raise RuntimeError(f"device {device!r} needs torch_npu and Ascend drivers: pip install 'dualvitok[npu]'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use --device cpu (or auto)")
    if name.startswith("mps") and not is_mps_available():
        raise RuntimeError(f"device {device!r} requested but Apple's MPS backend is not available; use --device cpu")
    return torch.device(name)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_cpu_memory(threshold: int = 1 << 30) -> bool:
    """Let the CPU allocator keep freed large buffers for reuse instead of returning them to the OS (glibc only).

    By default glibc serves each allocation above its mmap threshold (which adjusts itself, up to 32 MiB) with a fresh
    ``mmap`` and unmaps it when freed, so every large activation of the next forward pass page-faults on first touch
    (about 10 ms per 50 MB on a 2-core CPU, a sixth of the fast decoder's time at 256x256). This raises glibc's mmap
    and trim thresholds (``mallopt``), so such buffers come from the heap and freed ones are reused. The PyTorch CPU
    tuning guide gets the same effect by preloading jemalloc or tcmalloc.

    Process-wide and not undone: the process keeps its peak memory reserved. Meant for long inference jobs: the fast
    path's CPU plan calls it (``optimize_for_inference(keep_freed_memory=False)`` does not), and so does
    ``dualvitok encode`` (``--default-malloc`` turns it off); not for libraries to call on import.

    Args:
        threshold: allocations up to this many bytes come from the heap (default 1 GiB).

    Returns:
        True if applied; False where the C library has no ``mallopt`` (macOS, Windows, musl) or refuses the values.
    """
    import ctypes
    import ctypes.util
    import logging
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    log = logging.getLogger(__name__)
    threshold = min(int(threshold), 2**31 - 1)
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not mmap_set and threshold > 32 << 20:  # some glibc builds cap the mmap threshold at HEAP_MAX_SIZE / 2
        threshold = 32 << 20
        mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not (mmap_set and trim_set):
        log.warning("keep_freed_cpu_memory: the C library refused mallopt (mmap threshold %s, trim threshold %s); "
                    "freed buffers are still returned to the OS", "set" if mmap_set else "refused",
                    "set" if trim_set else "refused")
        return False
    log.info("keep_freed_cpu_memory: buffers up to %d bytes come from the heap and are kept when freed", threshold)
    return True


def reproducible_cpu_blas() -> bool:
    """Ask MKL for float32 results that do not depend on the operands' memory alignment, for this process: sets
    ``MKL_CBWR=AUTO`` (MKL's conditional numerical reproducibility, same code path as without it) unless
    ``MKL_CBWR`` is set already; returns whether it set it.

    PyTorch's float32 ``torch.mm`` / ``F.linear`` on CPU are MKL's in the PyPI builds, and without this MKL may
    round the same product differently in other buffers (its documentation: without CNR, results can depend on the
    data's memory alignment): on an AMD EPYC two copies of one model (one loaded from safetensors) gave outputs
    differing in the last bits, so an image could get other tokens (near ties) in another process. MKL reads the
    setting at its first call: call this before any float32 matrix product (the ``dualvitok`` command does, first
    thing); afterwards it has no effect."""
    if os.environ.get("MKL_CBWR"):
        return False
    os.environ["MKL_CBWR"] = "AUTO"
    return True
