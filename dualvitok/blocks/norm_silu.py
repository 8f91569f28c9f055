"""``silu(norm(x))`` for the MoVQ blocks' norms, with a native CPU kernel for the decoder's large bf16 maps.

Every ResNet block of the MoVQ decoder starts its two convolutions with ``silu(SpatialNorm(x, zq))``, a GroupNorm
modulated by the code map (``GroupNorm(x) * y(zq) + b(zq)``, :class:`~dualvitok.blocks.norm.SpatialNorm`). On CPU,
PyTorch runs that as three memory- and ``exp``-bound operators over a full-resolution map (at 256x256, 384 channels,
25-35 ms on 2 cores in bf16). :func:`norm_silu` runs the compiled kernel of ``dualvitok/_native/norm_silu.c`` instead
where it is available and the map is large enough: two passes (per-channel sums; normalise, modulate, SiLU, store),
split over PyTorch's thread count. Elsewhere (autograd on, tracing, other devices, layouts or dtypes, plain
GroupNorms, small maps, forward hooks on the norm, no C compiler) it runs the PyTorch operators.

Scope: bf16 maps and :class:`SpatialNorm` only, so everything float32 (the reference path, the fast path's
index-deciding pixel encoder, whose norms are plain GroupNorms) keeps PyTorch's values: pixel indices are
hypersensitive (one bf16 rounding moved in 0.2% of the activations of the encoder's first level moved 0.8% of them on
the released architecture with random weights).

Values: the kernel computes in float32 with double-precision statistics and rounds once, to bf16; PyTorch's bf16
operators round after each step. Both are within bf16 rounding of the float64 value
(``tests/blocks/test_norm_silu.py``). Non-finite inputs give unspecified finite or non-finite outputs (the C code
is built with ``-ffinite-math-only``), where PyTorch's operators would give NaN: a decoder that overflows is not
flagged by NaNs on this path.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _native
from .._native import pool as _pool
from .._utils.timing import measure_choice
from ..validation import is_tracing
from .norm import SpatialNorm, apply_norm

logger = logging.getLogger(__name__)

BLOCK_ROWS = 256
"""Rows (pixels) per block of the kernel's statistics (``DVT_BLOCK_ROWS`` in the C source)."""

MIN_NATIVE_ELEMENTS = 1 << 22
"""Maps with fewer elements per image (C * H * W) take the PyTorch operators: below about this size the calls'
fixed cost outweighs the saved passes. On an Intel Xeon with AMX (``benchmarks/bench_norm_silu.py``,
``benchmarks/results/norm_silu.md``) the kernel was 0.70-1.04x of PyTorch's operators from ``[1, 1536, 16, 16]``
to ``[1, 768, 64, 64]`` (0.4-3 M elements) and 1.12-1.84x from ``[1, 384, 128, 128]`` (6 M) to
``[1, 384, 512, 512]``."""

Functions = dict[str, Callable[..., None]]
"""The kernel's ctypes functions by role (``"sums"``, ``"affine"``, ``"apply"``)."""

_functions: Functions | None = None  # published after the self-check ({}: unavailable)


def _library_functions() -> Functions:
    """The kernel's ctypes functions, typed and self-checked against float64 PyTorch ({} if unavailable); loaded
    once per process, then returned without taking the lock."""
    global _functions
    if _functions is not None:
        return _functions
    with _native.lock:  # guards _functions
        if _functions is not None:
            return _functions
        functions: Functions = {}
        lib = _native.library("norm_silu")
        if lib is not None:
            p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
            signatures = {"sums": ("dvt_channel_sums_bf16", [p, p, i64, i64, i64, i64, p]),
                          "affine": ("dvt_group_affine", [p, i64, p, i64, i64, i64, f64, p, p, p, p]),
                          "apply": ("dvt_norm_silu_bf16_bf16", [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64])}
            for key, (symbol, argtypes) in signatures.items():
                functions[key] = getattr(lib, symbol)
                functions[key].argtypes, functions[key].restype = argtypes, None
            if not _self_check(functions):
                functions = {}
        _functions = functions  # other threads see the functions only once they passed the check
        return _functions


def float64_norm_silu(norm: SpatialNorm, x: Tensor, zq: Tensor) -> Tensor:
    """``silu(GroupNorm(x) * y + b)`` in float64 from ``x`` as given, with the modulation maps ``y``, ``b`` of the
    module's own 1x1 convolutions (in their dtype, as both paths compute them) resized nearest: the reference of the
    self-check and of ``benchmarks/bench_norm_silu.py``. Shape: ``[B, C, H, W]``."""
    with torch.no_grad():
        y, b = (F.interpolate(conv(zq).double(), size=x.shape[-2:]) for conv in (norm.conv_y, norm.conv_b))
        gn = norm.norm_layer
        return F.silu(F.group_norm(x.double(), gn.num_groups, gn.weight.double(), gn.bias.double(), gn.eps) * y + b)


def _self_check(functions: Functions) -> bool:
    """The kernel against float64 PyTorch on a small map (a miscompiled build is not used)."""
    generator = torch.Generator().manual_seed(0)
    norm = SpatialNorm(64, 8)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        norm.bfloat16()
        x = (torch.randn(2, 64, 8, 12, generator=generator) * 3 + 1).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last)
        zq = torch.randn(2, 8, 2, 3, generator=generator).bfloat16().contiguous(memory_format=torch.channels_last)
        want = float64_norm_silu(norm, x, zq)
        got = _native_norm_silu(norm, x, zq, functions, check_hooks=False)
        # one rounding to bf16 away from the float64 value computed from the same bf16 maps
        if got is None or not torch.allclose(got.double(), want, rtol=2**-8, atol=1e-3):
            error = "no result" if got is None else f"max error {(got.double() - want).abs().max().item():.3g}"
            logger.warning("native GroupNorm + SiLU kernel failed its self-check (%s); PyTorch operators are used "
                           "instead", error)
            return False
    return True


def _has_hooks(*modules: nn.Module) -> bool:
    """Whether forward hooks would run on these modules (the kernel calls none of them)."""
    global_hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    return any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _mean_estimate(x2d: Tensor) -> Tensor:
    """Each channel's mean over at most 256 rows spread evenly through ``x2d [rows, C]``, float32 (the shift of the
    kernel's sums: close to the mean, so the shifted sums do not cancel)."""
    step = -(-x2d.shape[0] // BLOCK_ROWS)
    return x2d[::step].float().mean(0).contiguous()


def _native_norm_silu(norm: SpatialNorm, x: Tensor, zq: Tensor, functions: Functions | None = None,
                      check_hooks: bool = True) -> Tensor | None:
    """The kernel's bf16 ``silu(norm(x, zq))``, or ``None`` where it does not apply (``functions``, ``check_hooks``:
    for the self-check, which runs before the functions are published and whatever hooks the process has)."""
    functions = functions if functions is not None else _library_functions()
    group_norm = norm.norm_layer
    if (not functions or x.dtype != torch.bfloat16 or x.dim() != 4 or x.shape[0] == 0 or x.device.type != "cpu"
            or zq.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last)
            or not isinstance(group_norm, nn.GroupNorm) or not group_norm.affine
            or group_norm.weight.device.type != "cpu" or group_norm.num_channels != x.shape[1] or zq.dim() != 4
            or (check_hooks and _has_hooks(norm, group_norm))):
        return None
    batch, channels, height, width = x.shape
    y, b = norm.conv_y(zq), norm.conv_b(zq)  # [B, C, h, w]: 1x1 convolutions on the small map
    h, w = y.shape[-2:]
    if height % h or width % w or y.shape[:2] != (batch, channels):
        return None
    if y.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or y.device.type != "cpu" or b.device.type != "cpu":
        return None
    sh, sw = height // h, width // w
    y = y.contiguous(memory_format=torch.channels_last)  # [B, C, h, w] in [B, h, w, C] memory (already, usually)
    b = b.contiguous(memory_format=torch.channels_last)
    sums, apply = functions["sums"], functions["apply"]
    gamma = group_norm.weight.detach().float().contiguous()
    beta = group_norm.bias.detach().float().contiguous()
    cpu = {"dtype": torch.float32, "device": "cpu"}  # explicit: the C code's buffers, whatever the process defaults
    out = torch.empty(x.shape, dtype=torch.bfloat16, device="cpu", memory_format=torch.channels_last)
    pool, threads = _pool.threads()
    rows = height * width
    blocks = -(-rows // BLOCK_ROWS)
    block_sums = torch.empty(blocks, 2 * channels, **cpu)  # per block of rows: the same statistics for any threads
    scale, shift = torch.empty(channels, **cpu), torch.empty(channels, **cpu)
    block_ranges = _pool.split(blocks, min(threads, blocks))
    height_ranges = _pool.split(height, min(threads, height))
    for image in range(batch):
        xi, oi = x[image], out[image]
        k = _mean_estimate(xi.permute(1, 2, 0).view(rows, channels))  # [H, W, C] memory -> [rows, C]
        _pool.run(pool, [partial(sums, xi.data_ptr(), k.data_ptr(), channels, rows, *r, block_sums.data_ptr())
                    for r in block_ranges])
        functions["affine"](block_sums.data_ptr(), blocks, k.data_ptr(), channels, group_norm.num_groups, rows,
                            float(group_norm.eps), gamma.data_ptr(), beta.data_ptr(), scale.data_ptr(),
                            shift.data_ptr())
        maps = (xi.data_ptr(), oi.data_ptr(), scale.data_ptr(), shift.data_ptr(), y[image].data_ptr(),
                b[image].data_ptr())
        _pool.run(pool, [partial(apply, *maps, channels, width, *r, sh, sw, w) for r in height_ranges])
    return out


def native_available() -> bool:
    """Whether the native kernel is built, loaded and passed its self-check in this process."""
    return bool(_library_functions())


def norm_silu(norm: nn.Module, x: Tensor, zq: Tensor | None = None, out_dtype: torch.dtype | None = None,
              native: bool = False) -> Tensor:
    """``silu(norm(x, zq))`` as ``out_dtype`` (default ``x``'s dtype), from the native kernel where ``native`` and it
    applies (autograd off, CPU, a :class:`~dualvitok.blocks.norm.SpatialNorm` on a channels_last bf16 map of at
    least :data:`MIN_NATIVE_ELEMENTS` per image, bf16 result), else from PyTorch's operators (a temporary the caller
    owns).

    Args:
        norm: an ``nn.GroupNorm`` or a :class:`~dualvitok.blocks.norm.SpatialNorm` (``zq`` required; the kernel
            serves only these).
        x: ``[B, C, H, W]``.
        zq: the conditioning map of a ``SpatialNorm``, ``[B, zq_channels, h, w]`` (``H``, ``W`` multiples of ``h``,
            ``w`` for the kernel).
        out_dtype: the result's dtype (e.g. bf16 for a bf16 residual branch read from a float32 stream).
        native: allow the native kernel.

    Returns:
        ``[B, C, H, W]`` in ``out_dtype``.
    """
    out_dtype = out_dtype or x.dtype
    if (native and isinstance(norm, SpatialNorm) and zq is not None and out_dtype == torch.bfloat16
            and not torch.is_grad_enabled() and math.prod(x.shape[1:]) >= MIN_NATIVE_ELEMENTS and not is_tracing()):
        out = _native_norm_silu(norm, x, zq)
        if out is not None:
            return out
    return F.silu(apply_norm(norm, x, zq), inplace=True).to(out_dtype)


_choices: dict[tuple, bool] = {}  # (dtype, channels, ISA) -> measured choice, once per process


def native_norm_silu_pays(channels: int, dtype: torch.dtype, size: int = 256, rounds: int = 5) -> bool:
    """Whether the native kernel is faster than PyTorch's operators on this CPU for a ``channels``-wide
    :class:`~dualvitok.blocks.norm.SpatialNorm` + SiLU at ``size x size`` (batch 1, channels_last; larger where
    that map would be under :data:`MIN_NATIVE_ELEMENTS`): a one-time measured choice (about 0.3 s at 384 channels,
    cached per process); ``False`` where the kernel is unavailable. The size is the released decoder's full-resolution
    level at 256x256, where most of the kernel's work is (at 128x128 the margin, about 1.1x, is within the noise of
    a shared machine)."""
    if not native_available() or dtype != torch.bfloat16:
        return False
    key = (dtype, channels, torch.backends.cpu.get_cpu_capability())
    if key in _choices:
        return _choices[key]
    while size * size * channels < MIN_NATIVE_ELEMENTS:
        size += 16
    norm = SpatialNorm(channels, 64).to(dtype).eval()
    x = torch.randn(1, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    zq = torch.randn(1, 64, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        choice = measure_choice(f"native GroupNorm + SiLU ({dtype}, {channels} channels)",
                                ("native", lambda: norm_silu(norm, x, zq, native=True)),
                                ("PyTorch operators", lambda: norm_silu(norm, x, zq, native=False)), rounds,
                                log=logger).chosen
    _choices[key] = choice
    return choice
