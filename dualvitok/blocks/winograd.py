"""Winograd 3x3 convolutions in float32 on CPU (NNPACK), for float32 plans on CPUs without bf16 matrix hardware.

Where a CPU has neither AVX-512-BF16 nor AMX (an AMD EPYC with AVX2 only, say) the fast path is a float32 plan
(:mod:`dualvitok.inference`), and the pixel decoder's 3x3 convolutions are nearly all of the work (2,266 of the
2,834 GFLOP of an encode + decode of a 256x256 image with the released architecture). oneDNN computes them directly,
at about float32's GEMM peak. Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016) does the same convolution with fewer multiplications: ``F(6x6, 3x3)`` computes each 6x6
output tile from an 8x8 input tile with 64 products per channel pair instead of 324. PyTorch's CPU builds ship
NNPACK (``Maratyszcza/NNPACK``), whose inference convolution uses that algorithm for 3x3 kernels with stride 1;
``torch._nnpack_spatial_convolution`` calls it. ``F.conv2d`` itself never picks it for a batch of one image.

* Measured on an AMD EPYC with AVX2 and no AVX-512 (2 threads, ``benchmarks/bench_kernel_choices.py``,
  ``benchmarks/bench_winograd.py``): 1.6-2.7x ``F.conv2d`` in channels_last on maps of 64x64 positions and more
  (384 channels at 64-256 px, 128-256 channels at 64-256 px), but 0.4-0.6x on 16x16 maps and below: NNPACK
  transforms the weights on every call (64 floats per input-output channel pair), which only a large map
  amortises. So a convolution uses it only on maps of at least :data:`MIN_POSITIONS` positions per image and with
  at least :data:`MIN_CHANNELS` input and output channels (a 3 -> 128 convolution measured 0.47x).
* For a batch of several images the layer calls it once per image: NNPACK's batched algorithm (which
  ``torch._nnpack_spatial_convolution`` uses for ``B > 1``) gained 1.3x at most where the per-image calls gained 2x.
* The values differ from ``F.conv2d``'s by about 1e-4 relative (the transforms round in float32; a direct
  convolution's float32 error was about 3x smaller against a float64 computation): far below bf16's rounding
  (4e-3), but not the float32 path's values. The plan therefore uses it in the pixel decoder only
  (:func:`dualvitok.inference.use_kernels`), so tokens never depend on it, and decoded images stay within about
  1e-3 of the float32 path's.
* Whether it pays is a one-time measurement on this CPU (:func:`winograd_conv_pays`), not assumed: with bf16 stages
  (AMX, AVX-512-BF16) the decoder is not float32 and this kernel never runs.

NNPACK is initialised by ``torch._nnpack_available()`` (its convolution fails until then), which :func:`available`
calls. Its thread pool is PyTorch's own (not OpenMP's), created on first use with ``torch.get_num_threads()``
threads; later changes of the thread count do not reach it. The operator is internal to PyTorch: where it is
missing, NNPACK is unavailable in the build, fails a tiny probe, or refuses an input, ``F.conv2d`` runs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils.timing import measure_choice

logger = logging.getLogger(__name__)

MIN_POSITIONS = 64 * 64
"""A convolution uses the Winograd kernel only on maps of at least this many positions per image (height x width):
below it NNPACK's per-call weight transform outweighs the saving (see the module docstring)."""

MIN_CHANNELS = 64
"""... and only with at least this many input and output channels."""

_available: bool | None = None  # NNPACK initialised and its convolution matched F.conv2d on a tiny probe


def available() -> bool:
    """Whether NNPACK's convolution runs here and matches ``F.conv2d`` (initialises NNPACK; a tiny probe, once per
    process)."""
    global _available
    if _available is None:
        _available = False
        if hasattr(torch, "_nnpack_spatial_convolution") and hasattr(torch, "_nnpack_available"):
            try:
                if torch._nnpack_available():  # also initialises NNPACK
                    generator = torch.Generator().manual_seed(0)
                    conv = nn.Conv2d(8, 8, 3, padding=1)
                    x = torch.randn(1, 8, 8, 8, generator=generator)
                    with torch.inference_mode():
                        _available = torch.allclose(_nnpack(x, conv), F.conv2d(x, conv.weight, conv.bias, padding=1),
                                                    rtol=1e-3, atol=1e-4)
            except RuntimeError as err:
                logger.info("NNPACK's Winograd convolution is unavailable here (%s)", err)
    return _available


def can_winograd(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` has the form the kernel computes: a float32 CPU weight, 3x3, stride 1, no dilation, no groups,
    integer zero padding of at most 2, at least :data:`MIN_CHANNELS` input and output channels; and NNPACK runs
    here."""
    weight = conv.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and max(conv.padding) <= 2
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS and available())


def usable(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether :func:`winograd_conv2d` applies to input ``x`` of ``conv`` now: autograd off, no autocast, a 4-D
    float32 CPU input with at least :data:`MIN_POSITIONS` positions per image."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[2] * x.shape[3] >= MIN_POSITIONS and not torch.is_autocast_enabled("cpu"))


def _nnpack(x: Tensor, conv: nn.Conv2d) -> Tensor:
    return torch._nnpack_spatial_convolution(x, conv.weight, conv.bias, list(conv.padding), [1, 1])


def winograd_conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` with NNPACK's Winograd algorithm, one image at a time (see the module docstring).

    Shape: ``[B, C_in, H, W] -> [B, C_out, H', W']`` (contiguous NCHW; a channels_last input is read through a
    contiguous copy)."""
    if x.shape[0] == 1:
        return _nnpack(x, conv)
    return torch.cat([_nnpack(image, conv) for image in x.split(1)])


_choices: dict[tuple, bool] = {}  # (channels, size, threads, ISA) -> measured choice, once per process


def winograd_conv_pays(channels: int, size: int = 64, rounds: int = 3, min_speedup: float = 1.2) -> bool:
    """Whether :func:`winograd_conv2d` is at least ``min_speedup`` times as fast as ``F.conv2d`` on this CPU: a
    one-time measured choice (about 0.5 s at 384 channels, cached per process for each ``(channels, size)``).

    It times a float32 3x3 ``channels -> channels`` convolution on a ``size x size`` map (batch 1; the smallest map
    the kernel is used on) with NNPACK against ``F.conv2d`` in channels_last (the fast path's layout otherwise),
    interleaved, best of ``rounds`` after a warm-up. The margin is there because the kernel also changes the
    decoder's values in the last bits and its layout (NCHW). ``False`` where NNPACK is unavailable or fails.
    """
    key = (channels, size, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key in _choices:
        return _choices[key]
    choice = False
    conv = nn.Conv2d(channels, channels, 3, padding=1).eval()
    if can_winograd(conv):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, channels, size, size, generator=generator)
        x_last = x.contiguous(memory_format=torch.channels_last)
        weight_last = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                choice = measure_choice(f"Winograd convolution (float32, {channels} channels, {size}x{size})",
                                        ("winograd", lambda: winograd_conv2d(x, conv)),
                                        ("direct", lambda: F.conv2d(x_last, weight_last, conv.bias, padding=1)),
                                        rounds, min_speedup, logger).chosen
        except RuntimeError as err:
            logger.warning("NNPACK's Winograd convolution failed (%s); using F.conv2d", err)
    _choices[key] = choice
    return choice
