"""Inference kernels for the convolutional blocks: residual additions fused into convolutions, in-place epilogues.

At inference on a CPU the MoVQ decoder spends a large share of its time outside the convolutions, in element-wise
passes over full-resolution activations (at 256x256 one 384-channel map is 50 MB in bf16) and in the page faults
of their freshly allocated outputs. Two kernels remove most of that work:

* :func:`conv2d_add` computes ``residual + conv(x)`` with the addition as a oneDNN post-op of the convolution
  (the accumulator gets the residual added before it is stored): one pass, no separate output for ``conv(x)``.
  In float32 the result equals ``residual + conv(x)`` (bit for bit for the ungrouped convolutions of the MoVQ
  blocks in our tests; grouped ones can differ in the last bit); in bf16 it rounds once instead of twice.
* In-place epilogues (``addcmul_``/``add_``/``silu_``) on temporaries a block owns.

The inference variants of the blocks (:mod:`dualvitok.blocks.inference`, swapped in by
:func:`dualvitok.inference.optimize_for_inference`) use them, and only while autograd is off, so training and the
float32 reference path run the public blocks' plain operators; in-place additions are used only where both operands
have the same dtype (under autocast they may not). The oneDNN operator (``torch.ops.mkldnn._convolution_pointwise``,
the one Inductor uses for the same fusion on CPU) is internal to PyTorch: where it is missing, disabled
(``torch.backends.mkldnn.enabled``), under autocast, or refuses a kind of arguments, the plain operators run instead
(refused kinds are remembered). It is used on CPU only; other devices' plans never call it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .._utils.timing import measure_choice

logger = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_refused: set[tuple] = set()  # argument kinds the oneDNN operator has refused in this process


def _kind(x: Tensor, residual: Tensor, inplace: bool) -> tuple:
    return (x.dtype, x.is_contiguous(memory_format=torch.channels_last),
            residual.is_contiguous(memory_format=torch.channels_last), inplace)


def _conv_out_shape(conv: nn.Conv2d, x: Tensor) -> tuple[int, ...]:
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride,
                                     strict=True)]
    return (x.shape[0], conv.out_channels, *size)


def _can_fuse(conv: nn.Conv2d, x: Tensor, residual: Tensor, inplace: bool) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _FUSED_DTYPES
        and x.dim() == 4
        and residual.dtype == x.dtype
        and conv.weight.dtype == x.dtype
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
        and (residual.is_contiguous() or residual.is_contiguous(memory_format=torch.channels_last))  # no broadcast
        and tuple(residual.shape) == _conv_out_shape(conv, x)
        and _kind(x, residual, inplace) not in _refused
    )


def _mkldnn_op(inplace: bool):
    """The oneDNN convolution with a binary post-op (``other`` first when in place, ``X`` first otherwise)."""
    ops = torch.ops.mkldnn
    return ops._convolution_pointwise_.binary if inplace else ops._convolution_pointwise.binary


def is_out_of_memory(err: BaseException) -> bool:
    """Whether a ``RuntimeError`` from a oneDNN (or NNPACK) operator is an allocation failure (re-raised, never taken
    for an unsupported kind of arguments and answered with a fallback)."""
    message = str(err).lower()
    return any(text in message for text in ("out of memory", "not enough memory", "cannot allocate memory"))


def add(a: Tensor, b: Tensor, inplace: bool = False) -> Tensor:
    """``a + b``, written into ``a`` when ``inplace``, autograd is off and that keeps ``a + b``'s dtype and shape
    (``a`` must then be a temporary the caller owns)."""
    if inplace and not torch.is_grad_enabled() and a.dtype == b.dtype and a.shape == b.shape:
        return a.add_(b)
    return a + b


def conv2d_add(conv: nn.Conv2d, x: Tensor, residual: Tensor, inplace: bool = False,
               packed_weight: Tensor | None = None) -> Tensor:
    """``residual + conv(x)``, the addition fused into the convolution on CPU.

    Args:
        conv: a 2D convolution (zero padding, integer padding).
        x: its input ``[B, C_in, H, W]``.
        residual: ``[B, C_out, H', W']``, the shape of ``conv(x)``.
        inplace: write the sum into ``residual``'s memory (it must be a temporary the caller owns).
        packed_weight: ``conv``'s weight prepacked for oneDNN (:func:`dualvitok.blocks.packed_conv.pack_conv_weight`),
            used by the fused operator in place of ``conv.weight``.

    Returns:
        ``[B, C_out, H', W']``. Outside CPU inference (autograd on, other devices or dtypes) this is the plain
        ``residual + conv(x)``.
    """
    if torch.is_grad_enabled() or not _can_fuse(conv, x, residual, inplace):
        return add(residual, conv(x), inplace)
    weight = conv.weight if packed_weight is None else packed_weight
    args = (x, weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "add", None, None, [], None)
    try:
        if inplace:
            return _mkldnn_op(inplace=True)(residual, *args)
        return _mkldnn_op(inplace=False)(x, residual, *args[1:])
    except RuntimeError as err:  # an unsupported layout or build: remember this kind, use the plain operators
        if is_out_of_memory(err):
            raise
        kind = _kind(x, residual, inplace)
        _refused.add(kind)
        logger.warning("fused convolution + addition unavailable for %s (%s); using separate operators", kind, err)
        return residual + conv(x)


_fusion_choices: dict[tuple, bool] = {}  # (dtype, channels, ISA) -> measured choice, once per process


def fused_conv_add_pays(channels: int, dtype: torch.dtype, size: int = 96, rounds: int = 5,
                        tolerance: float = 0.10) -> bool:
    """Whether :func:`conv2d_add` is about as fast as ``residual.add_(conv(x))`` or faster on this CPU: a one-time
    measured choice (up to about 0.5 s at 384 channels, cached per process for each ``(dtype, channels)``).

    It times a 3x3 ``channels -> channels`` convolution with its residual addition at ``size x size`` (batch 1,
    channels_last) both ways, interleaved, best of ``rounds`` after a warm-up, and keeps the fused operator unless it
    is more than ``tolerance`` slower (on a shared machine single timings move by more than the difference).
    ``False`` where the operator is unavailable. The fused operator does one pass instead of two over a
    full-resolution map; whether that pays depends on the CPU's kernels (it does on an Intel Xeon with AMX), so it
    is measured rather than assumed.
    """
    key = (dtype, channels, torch.backends.cpu.get_cpu_capability())
    if key in _fusion_choices:
        return _fusion_choices[key]
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(1, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    residual = torch.randn_like(x)
    if not _can_fuse(conv, x, residual, True):
        _fusion_choices[key] = False
        return False
    with torch.inference_mode():
        measured = measure_choice(f"fused convolution + addition ({dtype}, {channels} channels)",
                                  ("fused", lambda: conv2d_add(conv, x, residual, inplace=True)),
                                  ("separate", lambda: residual.add_(conv(x))), rounds, 1 / (1 + tolerance), logger)
    choice = measured.chosen
    if _kind(x, residual, True) in _refused:  # the operator failed (conv2d_add warned why) and both runs were plain
        logger.info("fused convolution + addition: refused by oneDNN during its measurement; separate operators")
        choice = False
    _fusion_choices[key] = choice
    return choice
