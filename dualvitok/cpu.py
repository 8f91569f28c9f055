"""What low precision is worth on this CPU: the bf16 instructions it has, oneDNN's ISA limit, and a measured speedup.

The fast path (:mod:`dualvitok.inference`) converts a stage to bf16 on CPU only where that is faster than float32.
Two inputs decide it:

* :func:`cpu_bf16_support`, from the CPU's flags (``torch.cpu``): AMX, AVX-512-BF16, neither, or not x86. oneDNN,
  which runs PyTorch's bf16 matrix products and convolutions on CPU, can be told to use less than the CPU has
  (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``, read by oneDNN once at its first use; values from oneDNN's
  ``dnnl_cpu_isa_t``); such a limit is honoured, so a CPU with AMX limited to ``AVX512_CORE_BF16`` is treated as one
  without AMX.
* :func:`low_precision_speedup`, a one-time measurement (about 20-60 ms where bf16 is fast; a probe ends it
  early, with its own number, where bf16 is far slower than float32): a ``512 x 1024 x 1024`` matrix product in the
  low-precision dtype against float32, interleaved, best of 5. Stages stay float32 where it is under
  :data:`MIN_LOW_PRECISION_SPEEDUP` twice (a slow reading is measured again: a busy spell once made the probe of an
  Intel Xeon with AMX, at a smaller size than now, read bf16 under half float32's speed, and a whole plan ran in
  float32). The flags alone do not say what bf16 costs: on an Intel Xeon with AMX whose oneDNN was limited to
  AVX-512-BF16, bf16 products ran at 0.57-0.65x of float32 (three runs; the probe 0.43x at 128 x 256 x 256, 0.6x
  at 256 x 512 x 512; 196 against 340 GFLOP/s at 2048 x 2048, 2 threads), and float16 on a CPU without AMX-FP16
  runs at about float32's speed; with AMX bf16 runs about 6x faster, and on an AMD EPYC with AVX-512-BF16 about
  4x (bf16 ~900 against ~210 GFLOP/s, 2 threads). That float32 baseline is ``torch.mm``, i.e. PyTorch's BLAS (MKL),
  which on that AMD EPYC runs at under half oneDNN's float32 GEMM (~480 GFLOP/s; the float32 convolutions of the
  fast path are oneDNN's): against oneDNN, bf16 is about 2x there, still above the threshold.
* Under ``torchrun``, :func:`dualvitok.inference.agree_on_low_precision` gives every rank rank 0's measurement
  (:func:`use_low_precision_speedup`) before the stages are converted, so ranks on one kind of CPU convert the same
  stages even where the speedup is near the threshold.
"""

from __future__ import annotations

import logging
import os
import platform
import threading

import torch

from ._utils.timing import measure_choice

logger = logging.getLogger(__name__)

MIN_LOW_PRECISION_SPEEDUP = 1.5
"""A stage runs in bf16 on CPU only where bf16 matrix products measure at least this many times faster than float32
(:func:`low_precision_speedup`): below it the casts and the element-wise work a bf16 stage keeps leave too little."""

_PROBE_SPEEDUP = 0.5  # under this at the probe's size the dtype is emulated or slow: no full measurement
_PROBE_SIZE = (256, 512)  # rows x inner of the probe: large enough that AMX bf16 reads ~3x float32 there, not ~1x

# AVX2_VNNI_2 converts to and from bf16 but has no bf16 dot products: counted as without (conservative)
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                       "AVX512_CORE_VNNI"})
_ONEDNN_ISAS_WITHOUT_AMX = _ONEDNN_ISAS_WITHOUT_BF16 | {"AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16",
                                                     "AVX10_2_512"}


def onednn_isa_limit() -> str | None:
    """oneDNN's CPU ISA limit from the environment (``ONEDNN_MAX_CPU_ISA``, else ``DNNL_MAX_CPU_ISA``; an empty
    value counts as unset, as in oneDNN), upper-cased; ``None`` where unset. oneDNN reads it once, at its first use
    in the process: set it before, as this reads it on every call."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.upper() if value else None


def cpu_bf16_support() -> str:
    """This CPU's bf16 matrix support as oneDNN may use it: ``"amx"``, ``"avx512_bf16"``, ``"none"`` (x86 without
    either, or oneDNN limited below AVX-512-BF16: emulated) or ``"unknown"`` (not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return "unknown"
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        support = "amx"
    elif getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        support = "avx512_bf16"
    else:
        return "none"
    limit = onednn_isa_limit()
    if limit in _ONEDNN_ISAS_WITHOUT_BF16:
        return "none"
    if limit in _ONEDNN_ISAS_WITHOUT_AMX:
        return "avx512_bf16"
    return support


_speedups: dict[tuple, float] = {}  # (dtype, threads, support, oneDNN limit) -> measured speedup, per process
_lock = threading.Lock()  # one measurement at a time: two at once would share the cores and both read slow


def _key(dtype: torch.dtype) -> tuple:
    return (dtype, torch.get_num_threads(), cpu_bf16_support(), onednn_isa_limit())


def _time_products(dtype: torch.dtype, rows: int, inner: int, rounds: int, what: str, threshold: float) -> float:
    """Speedup of ``dtype`` over float32 for a ``rows x inner x inner`` product (logged against ``threshold``)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=generator), torch.randn(inner, inner, generator=generator)
    low_a, low_b = a.to(dtype), b.to(dtype)
    name = str(dtype).removeprefix("torch.")
    with torch.inference_mode():
        return measure_choice(f"{name} matrix products ({rows} x {inner} x {inner}, {torch.get_num_threads()} threads; "
                              f"{what} >= {threshold}x)", (name, lambda: torch.mm(low_a, low_b)),
                              ("float32", lambda: torch.mm(a, b)), rounds, threshold, logger).speedup


def _measure(dtype: torch.dtype, rounds: int) -> float:
    """One measurement: the probe, then (unless the probe reads far slower) the full product."""
    rows, inner = _PROBE_SIZE
    speedup = _time_products(dtype, rows, inner, 3, "probe: measured in full if", _PROBE_SPEEDUP)
    if speedup >= _PROBE_SPEEDUP:
        speedup = _time_products(dtype, 512, 1024, rounds, "bf16 stages if", MIN_LOW_PRECISION_SPEEDUP)
    return speedup


def low_precision_speedup(dtype: torch.dtype, rounds: int = 5) -> float:
    """How many times faster a matrix product runs in ``dtype`` than in float32 on this CPU: measured once per
    process for each dtype and thread count (a ``512 x 1024 x 1024`` product, best of ``rounds``, interleaved, after
    a warm-up; about 20-60 ms where bf16 is fast). A probe goes first (``256 x 512 x 512``, 3 rounds): where
    ``dtype`` runs under half float32's speed there (emulated, or slow kernels) the probe's result is the answer, so
    such a CPU spends milliseconds, not seconds.

    A reading under :data:`MIN_LOW_PRECISION_SPEEDUP` is measured once more and the faster of the two is kept: a busy
    spell of the machine can make a fast dtype read slow, never a slow one read fast, and a wrong "slow" costs a
    whole plan in float32 (about 4x slower where bf16 pays) while a wrong "fast" costs far less. ``0.0`` where
    ``dtype`` products fail here."""
    with _lock:
        key = _key(dtype)
        if key not in _speedups:
            try:
                speedup = _measure(dtype, rounds)
                if speedup < MIN_LOW_PRECISION_SPEEDUP:
                    again = _measure(dtype, rounds)
                    logger.info("%s matrix products measured %.2fx float32, then %.2fx: keeping %.2fx",
                                str(dtype).removeprefix("torch."), speedup, again, max(speedup, again))
                    speedup = max(speedup, again)
            except RuntimeError as err:  # a dtype without CPU kernels in this build
                logger.warning("%s matrix products failed on this CPU (%s); stages stay float32", dtype, err)
                speedup = 0.0
            _speedups[key] = speedup
        return _speedups[key]


def use_low_precision_speedup(dtype: torch.dtype, speedup: float) -> None:
    """Take ``speedup`` (another process's :func:`low_precision_speedup`, e.g. rank 0's under ``torchrun``) as this
    process's measurement for ``dtype``, so both prepare the same stages in the same dtype."""
    with _lock:
        _speedups[_key(dtype)] = float(speedup)
