"""2D convolutions with weights prepacked for oneDNN on CPU (the pixel decoder's bf16 convolutions at inference).

``F.conv2d`` on a CPU tensor hands oneDNN the weight in PyTorch's layout, and oneDNN reorders it into its blocked
(AMX / AVX-512) layout on **every call**. That reorder costs about as much as reading the weight, so it weighs most
where a wide weight meets a small map: the released pixel decoder's 1536-channel 3x3 convolutions at 16x16 (21 M
weights each, 42 MB in bf16, against 11 GFLOP of work) took 8-17 ms plain and 4.6-5.4 ms from a prepacked weight
on an Intel Xeon with AMX (2 threads), while its 384-channel ones at 256x256 gained nothing (0.97-1.02x): so only
maps of up to :data:`MAX_PACKED_POSITIONS` positions use it. Prepacking is what Inductor's CPU freezing pass does
for the same operator. ``benchmarks/bench_packed_conv.py`` measures each of the decoder's convolutions and the
decode.

* :func:`pack_conv_weight` reorders a weight once (``torch._C._nn.mkldnn_reorder_conv2d_weight``, for an input of
  a given shape: other shapes still compute correctly from it, but can be far slower, 160x for a 768-channel
  convolution packed for 32x32 and run on 8x8, so the layer uses it for that shape only) and :func:`packed_conv2d`
  computes from it (``torch.ops.mkldnn._convolution_pointwise``). :func:`dualvitok.blocks.fused.conv2d_add` takes a
  packed weight too. :class:`dualvitok.blocks.inference.InferenceConv2d` (swapped in by
  :func:`dualvitok.inference.optimize_for_inference`) keeps one packed copy per bf16 ``nn.Conv2d``, for the input
  shape of its first call (or the last one it was called with twice in a row), next to the plain weight (the state
  dict still holds the plain one): a second copy, about 0.9 GB for the released pixel decoder.
* The kernel is oneDNN's own either way: each of the released decoder's convolutions gave ``F.conv2d``'s values
  bit for bit on their own, yet inside the decoder one fused convolution (the attention block's ``proj_out``, on a
  strided view) rounded differently by a bf16 ulp, so decoded images may differ from the plain weights' in the
  last bits (about 2e-3 at most). The plan packs the pixel decoder's convolutions only
  (:func:`dualvitok.inference.use_kernels`), so tokens never depend on it.
* Whether it pays is a one-time measurement on this CPU (:func:`packed_conv_pays`), not assumed.
* Only channels_last bf16 inputs use it (the fast path's layout). float32 convolutions stay plain: the pixel
  encoder's float32 ones (512 channels at most) measured no gain, and the float32 path keeps PyTorch's operators.

The operators are internal to PyTorch: where they are missing, disabled (``torch.backends.mkldnn.enabled``), fail a
tiny probe on this CPU, under autocast, or refuse a weight or an input (the layer then logs it and stays with
``F.conv2d``), the plain ``F.conv2d`` runs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils.timing import measure_choice

logger = logging.getLogger(__name__)

PACKED_CONV_DTYPES = (torch.bfloat16,)
"""Weight dtypes whose convolutions are packed (see the module docstring)."""

_works: dict[torch.dtype, bool] = {}  # dtype -> the operators ran on a tiny convolution in this process


def _operators_work(dtype: torch.dtype) -> bool:
    """Whether this build and CPU run the packing operators in ``dtype`` (a tiny probe, once per process)."""
    if dtype not in _works:
        ok = False
        if (torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
            try:
                with torch.inference_mode():
                    conv = nn.Conv2d(16, 16, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
                    x = torch.randn(1, 16, 4, 4).to(dtype).contiguous(memory_format=torch.channels_last)
                    ok = torch.equal(packed_conv2d(x, pack_conv_weight(conv, x.shape), conv), conv(x))
            except RuntimeError as err:
                logger.info("prepacked convolution weights unavailable in %s here (%s)", dtype, err)
        _works[dtype] = ok
    return _works[dtype]


def can_pack_conv(conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s weight can be packed here: a bf16 CPU weight, zero padding given as integers, with oneDNN
    enabled and its operators running on this CPU."""
    weight = conv.weight
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKED_CONV_DTYPES
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and torch.backends.mkldnn.enabled
        and _operators_work(weight.dtype)
    )


MAX_PACKED_POSITIONS = 128 * 128
"""Inputs with more positions (batch x height x width) than this compute from the plain weight: there the reorder
is a negligible share of the work (at 256x256 the 384-channel convolutions measured 0.97-1.02x packed)."""


def usable(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether :func:`packed_conv2d` applies to input ``x`` of ``conv`` now: autograd off, no autocast, a 4-D
    channels_last CPU input of the weight's dtype with at most :data:`MAX_PACKED_POSITIONS` positions."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == conv.weight.dtype and x.dim() == 4
            and x.shape[0] * x.shape[2] * x.shape[3] <= MAX_PACKED_POSITIONS
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled("cpu"))


def pack_conv_weight(conv: nn.Conv2d, input_shape: tuple[int, ...] | torch.Size) -> Tensor:
    """``conv``'s weight reordered into oneDNN's layout for inputs of ``input_shape`` ``[B, C_in, H, W]`` (an opaque
    mkldnn tensor, a second copy of the weight)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        conv.weight.detach().to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        list(input_shape))


def packed_conv2d(x: Tensor, packed: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` computed from :func:`pack_conv_weight`'s ``packed`` weight.

    Shape: ``[B, C_in, H, W] -> [B, C_out, H', W']`` (channels_last, as the input)."""
    return torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, list(conv.padding), list(conv.stride),
                                                   list(conv.dilation), conv.groups, "none", [], "")


_choices: dict[tuple, bool] = {}  # (dtype, channels, size, ISA) -> measured choice, once per process


def packed_conv_pays(channels: int, dtype: torch.dtype, size: int = 16, rounds: int = 5,
                     tolerance: float = 0.10) -> bool:
    """Whether :func:`packed_conv2d` is about as fast as ``F.conv2d`` or faster on this CPU: a one-time measured
    choice (about 0.2 s at 1536 channels, cached per process for each ``(dtype, channels, size)``).

    It times a 3x3 ``channels -> channels`` convolution on a ``size x size`` channels_last map (batch 1; the
    released decoder's widest level at a 256x256 image's latent size) both ways, interleaved, best of ``rounds``
    after a warm-up, and keeps the packed weight unless it is more than ``tolerance`` slower. ``False`` where the
    operators are missing or refuse the weight.
    """
    key = (dtype, channels, size, torch.backends.cpu.get_cpu_capability())
    if key in _choices:
        return _choices[key]
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(1, channels, size, size, generator=generator).to(dtype).contiguous(
        memory_format=torch.channels_last)
    choice = False
    if can_pack_conv(conv):
        try:
            with torch.inference_mode():
                packed = pack_conv_weight(conv, x.shape)
                what = f"prepacked convolution weights ({dtype}, {channels} channels, {size}x{size})"
                choice = measure_choice(what, ("packed", lambda: packed_conv2d(x, packed, conv)),
                                        ("plain", lambda: F.conv2d(x, conv.weight, conv.bias, padding=1)), rounds,
                                        1 / (1 + tolerance), logger).chosen
        except RuntimeError as err:  # an unsupported build or ISA: plain F.conv2d
            logger.warning("prepacked convolution weights unavailable (%s); using F.conv2d", err)
    _choices[key] = choice
    return choice
