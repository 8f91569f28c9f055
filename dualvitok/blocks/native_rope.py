"""The vision tower's 2D RoPE on bf16 queries and keys with a native CPU kernel, bit for bit PyTorch's values.

Follows RoFormer (Su et al., 2021, arXiv 2104.09864) as the Qwen2-VL vision tower applies it (Wang et al., 2024,
arXiv 2409.12191; ``apply_rotary_pos_emb_vision`` in transformers' ``modeling_qwen2_vl.py``), through
:func:`~dualvitok.blocks.rope.apply_rotary`; what differs is only how it is computed (below).

Each block of the Qwen2-VL tower rotates its queries and keys in float32 (:func:`~dualvitok.blocks.rope.apply_rotary`):
on CPU in bf16 that is a float32 copy of the fused qkv projection's queries and keys, three products, a subtraction,
an addition and a copy back to bf16, seven passes that took about 11% of a block's time on the fast path (released
architecture, 256x256, batch 1, Intel Xeon with AMX; more at batch 8, where the maps leave the caches).
:func:`rotate_queries_keys` runs the compiled kernel of ``dualvitok/_native/rope.c`` instead where it is available:
one pass from the qkv output to the rotated bf16 queries and keys, split over PyTorch's thread count. It computes the
same float32 products, sums and bf16 rounding as PyTorch's operators, so its finite outputs are theirs bit for bit
(``tests/blocks/test_native_rope.py``; a NaN stays a NaN, with other bits) and tokens do not depend on whether it
runs. Elsewhere (autograd on, tracing,
other devices, dtypes or layouts, no C compiler) it runs :func:`~dualvitok.blocks.rope.apply_rotary`.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .. import _native
from .._native import pool as _pool
from .._utils.timing import measure_choice
from ..validation import is_tracing
from .rope import VisionRotaryEmbedding, apply_rotary, grid_positions, rotary_cos_sin

logger = logging.getLogger(__name__)

MIN_ROWS_PER_THREAD = 512
"""Rows (tokens of all images) per thread of the kernel at least: below that one thread runs it (the tower's 324
tokens of a 256x256 image took 0.26 ms on one thread and 0.32 ms on two, handing work to a pool thread costing more
than it saves; 2,592 tokens 1.8 ms and 1.1 ms, Intel Xeon with AMX)."""

_function: Callable[..., None] | None = None
_loaded = False  # _function is final (None: unavailable)



def _library_function() -> Callable[..., None] | None:
    """The kernel's ctypes function, typed and self-checked against PyTorch (``None`` if unavailable); loaded once
    per process, then returned without taking the lock."""
    global _function, _loaded
    if _loaded:
        return _function
    with _native.lock:  # guards _function
        if _loaded:
            return _function
        function = None
        lib = _native.library("rope")
        if lib is not None:
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            function = lib.dvt_rope_bf16
            function.argtypes, function.restype = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64], None
            if not _self_check(function):
                function = None
        _function, _loaded = function, True  # other threads see the function only once it passed the check
        return _function


def _rope(height: int, width: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``[L, 1, head_dim]``, of the tower's 2D RoPE on an ``height x width`` patch grid."""
    angles = VisionRotaryEmbedding(head_dim // 2)(grid_positions(height, width, 2 if height % 2 == 0 else 1))
    return rotary_cos_sin(angles)


def _self_check(function: Callable[..., None]) -> bool:
    """The kernel against PyTorch's operators on a small input (a miscompiled build is not used): bit for bit."""
    generator = torch.Generator().manual_seed(0)
    # the released tower at 256x256 (the 16 lanes and a masked remainder): enough products (830 k) that a build
    # contracting them into fused multiply-adds shows a difference (tests/blocks/test_native_rope.py)
    cos, sin = _rope(18, 18, 80)
    qkv = (torch.randn(1, 324, 3, 16, 80, generator=generator) * 4).bfloat16()
    got = _native_rotate(qkv, cos, sin, function)
    want = apply_rotary(qkv[:, :, :2], (cos.unsqueeze(1), sin.unsqueeze(1)))
    if got is None or not torch.equal(got.view(torch.int16), want.view(torch.int16)):
        logger.warning("native RoPE kernel failed its self-check (%s); PyTorch operators are used instead",
                       "no result" if got is None else f"max difference {(got.float() - want.float()).abs().max():.3g}")
        return False
    return True


def _native_rotate(qkv: Tensor, cos: Tensor, sin: Tensor, function: Callable[..., None] | None = None) -> Tensor | None:
    """The kernel's rotated queries and keys ``[B, L, 2, H, d]`` bf16, or ``None`` where it does not apply."""
    function = function if function is not None else _library_function()
    if (function is None or qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or qkv.dim() != 5
            or qkv.shape[2] != 3 or not qkv.is_contiguous() or qkv.shape[-1] % 2 or qkv.numel() == 0):
        return None
    batch, tokens, _, heads, head_dim = qkv.shape
    cpu = {"dtype": torch.float32, "device": "cpu"}  # explicit: the C code's buffers, whatever the process defaults
    if cos.numel() != tokens * head_dim or sin.numel() != tokens * head_dim:
        return None
    cos = cos.to(**cpu).reshape(tokens, head_dim).contiguous()  # [L, 1, d] -> [L, d] (a view, usually)
    sin = sin.to(**cpu).reshape(tokens, head_dim).contiguous()
    out = torch.empty(batch, tokens, 2, heads, head_dim, dtype=torch.bfloat16, device="cpu")
    rows = batch * tokens
    pool, threads = _pool.threads()
    parts = max(1, min(threads, rows // MIN_ROWS_PER_THREAD))
    _pool.run(pool, [partial(function, qkv.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), *r, tokens,
                             3 * heads * head_dim, 2 * heads * head_dim, heads, head_dim)
                     for r in _pool.split(rows, parts)])
    return out


def native_available() -> bool:
    """Whether the native RoPE kernel is built, loaded and passed its self-check in this process."""
    return _library_function() is not None


def rotate_queries_keys(qkv: Tensor, rope: tuple[Tensor, Tensor], native: bool = False) -> Tensor:
    """The rotated queries and keys of a fused qkv projection, from the native kernel where ``native`` and it applies
    (autograd off, CPU, bf16, contiguous ``qkv``), else from :func:`~dualvitok.blocks.rope.apply_rotary`: the same
    values either way.

    Args:
        qkv: ``[B, L, 3, H, d]`` (queries, keys, values).
        rope: ``(cos, sin)`` from :func:`~dualvitok.blocks.rope.rotary_cos_sin`, each ``[L, 1, d]``.
        native: allow the native kernel.

    Returns:
        ``[B, L, 2, H, d]`` in ``qkv``'s dtype: the rotated queries and keys.
    """
    cos, sin = rope
    if native and not torch.is_grad_enabled() and not is_tracing():
        out = _native_rotate(qkv, cos, sin)
        if out is not None:
            return out
    return apply_rotary(qkv[:, :, :2], (cos.unsqueeze(1), sin.unsqueeze(1)))


_choices: dict[tuple, bool] = {}  # (heads, head_dim, tokens, ISA, threads) -> measured choice, once per process


def native_rope_pays(heads: int, head_dim: int, grid: int = 18, rounds: int = 5) -> bool:
    """Whether the native kernel is faster than PyTorch's operators on this CPU for ``heads`` heads of ``head_dim``
    on a ``grid x grid`` patch grid (the tower's at 256x256; batch 1): a one-time measured choice (milliseconds,
    cached per process); ``False`` where the kernel is unavailable. The plan measures it at the vision tower's
    heads and applies it to every bf16 vision block of the model (the tower's are nearly all of the work; the
    semantic decoder's have the released tower's width and heads too)."""
    if not native_available():
        return False
    key = (heads, head_dim, grid, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    if key in _choices:
        return _choices[key]
    rope = _rope(grid, grid, head_dim)
    qkv = torch.randn(1, grid * grid, 3, heads, head_dim).bfloat16()
    with torch.inference_mode():
        choice = measure_choice(f"native RoPE ({heads} heads of {head_dim}, {grid * grid} tokens)",
                                ("native", lambda: rotate_queries_keys(qkv, rope, native=True)),
                                ("PyTorch operators", lambda: rotate_queries_keys(qkv, rope, native=False)), rounds,
                                log=logger).chosen
    _choices[key] = choice
    return choice
