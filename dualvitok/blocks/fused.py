"""Inference kernels for the convolutional blocks: residual additions fused into convolutions, in-place epilogues.

At inference on a CPU the MoVQ decoder spends a large share of its time outside the convolutions, in element-wise
passes over full-resolution activations (at 256x256 one 384-channel map is 50 MB in bf16) and in the page faults
of their freshly allocated outputs. Two kernels remove most of that work:

* :func:`conv2d_add` computes ``residual + conv(x)`` with the addition as a oneDNN post-op of the convolution
  (the accumulator gets the residual added before it is stored): one pass, no separate output for ``conv(x)``.
  In float32 the result equals ``residual + conv(x)`` (bit for bit for the ungrouped convolutions of the MoVQ
  blocks in our tests; grouped ones can differ in the last bit); in bf16 it rounds once instead of twice.
* In-place epilogues (``addcmul_``/``add_``/``silu_``) on temporaries a block owns.

Blocks use them only when their ``fused_inference`` attribute is set (by
:func:`dualvitok.inference.optimize_for_inference`) *and* autograd is off, so training and the float32 reference
path run the plain operators. The oneDNN operator (``torch.ops.mkldnn._convolution_pointwise``, the one Inductor
uses for the same fusion on CPU) is internal to PyTorch: where it is missing or refuses the arguments, the plain
operators run instead.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_fusion_failed = False  # set once the oneDNN operator has refused a call in this process


def _can_fuse(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> bool:
    return (
        not _fusion_failed
        and x.device.type == "cpu"
        and x.dtype in _FUSED_DTYPES
        and x.dim() == 4
        and residual.dtype == x.dtype
        and conv.weight.dtype == x.dtype
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
    )


def _mkldnn_op(inplace: bool):
    """The oneDNN convolution with a binary post-op (``other`` first when in place, ``X`` first otherwise)."""
    ops = torch.ops.mkldnn
    return ops._convolution_pointwise_.binary if inplace else ops._convolution_pointwise.binary


def conv2d_add(conv: nn.Conv2d, x: Tensor, residual: Tensor, inplace: bool = False) -> Tensor:
    """``residual + conv(x)``, the addition fused into the convolution on CPU.

    Args:
        conv: a 2D convolution (zero padding, integer padding).
        x: its input ``[B, C_in, H, W]``.
        residual: ``[B, C_out, H', W']``, the shape of ``conv(x)``.
        inplace: write the sum into ``residual``'s memory (it must be a temporary the caller owns).

    Returns:
        ``[B, C_out, H', W']``. Outside CPU inference (autograd on, other devices or dtypes) this is the plain
        ``residual + conv(x)``.
    """
    global _fusion_failed
    if torch.is_grad_enabled() or not _can_fuse(conv, x, residual):
        return residual.add_(conv(x)) if inplace and not torch.is_grad_enabled() else residual + conv(x)
    args = (x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "add", None, None, [], None)
    try:
        if inplace:
            return _mkldnn_op(inplace=True)(residual, *args)
        return _mkldnn_op(inplace=False)(x, residual, *args[1:])
    except RuntimeError as err:  # an unsupported layout or build: remember, and use the plain operators
        _fusion_failed = True
        logger.warning("fused convolution + addition unavailable (%s); using separate operators", err)
        return residual + conv(x)

