"""Winograd 3x3 convolutions in float32 on CPU (NNPACK), for float32 plans on CPUs without bf16 matrix hardware.

Where a CPU has neither AVX-512-BF16 nor AMX (an AMD EPYC with AVX2 only, say) the fast path is a float32 plan
(:mod:`dualvitok.inference`), and the pixel decoder's 3x3 convolutions are nearly all of the work (2,266 of the
2,834 GFLOP of an encode + decode of a 256x256 image with the released architecture). oneDNN computes them directly,
at about float32's GEMM peak. Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016) does the same convolution with fewer multiplications: ``F(6x6, 3x3)`` computes each 6x6
output tile from an 8x8 input tile with 64 products per channel pair instead of 324. PyTorch's CPU builds ship
NNPACK (``Maratyszcza/NNPACK``), whose inference convolution uses that algorithm for 3x3 kernels with stride 1;
``torch._nnpack_spatial_convolution`` calls it. ``F.conv2d`` itself never picks it for a batch of one image.

* Measured on an AMD EPYC with AVX2 and no AVX-512 (2 threads, ``benchmarks/bench_winograd.py``): the released
  decoder's convolutions for a 256x256 image ran 2.0-3.2x faster than ``F.conv2d`` in channels_last on maps of
  64x64 positions and more, 1.06-1.20x at 32x32 and 0.35-0.60x at 16x16: NNPACK transforms the weights on every
  call (64 floats per input-output channel pair), which only a large map amortises. So a convolution uses it only
  on maps of at least :data:`MIN_POSITIONS` positions per image (at 32x32 the gain is under the plan's 1.2x margin)
  and with at least :data:`MIN_CHANNELS` input and output channels (the decoder's 384 -> 3 output convolution
  measured 0.40x, a 3 -> 128 one 0.47x).
* For a batch of several images the layer calls it once per image, into one output: for ``B > 1``
  ``torch._nnpack_spatial_convolution`` switches to NNPACK's batched (training) algorithm, which in one measurement
  at ``[8, 384, 64, 64]`` gained 1.29x over ``F.conv2d`` where eight single-image calls gained 2.0x.
* The values differ from ``F.conv2d``'s by about 1e-5 of the output's magnitude (the transforms round in float32:
  1.0-1.5e-5 against a float64 convolution at the decoder's shapes, where a direct convolution gave 2-5e-6): far
  below bf16's rounding (4e-3), but not the float32 path's values. The plan therefore uses it in the pixel decoder only
  (:func:`dualvitok.inference.use_kernels`), so tokens never depend on it; decoded images differ from the float32
  path's by float32-level amounts (``tests/blocks/test_winograd.py`` holds them within 1e-4 on a small model).
* Whether it pays is a one-time measurement on this CPU (:func:`winograd_conv_pays`), not assumed: with bf16 stages
  (AMX, AVX-512-BF16) the decoder is not float32 and this kernel never runs.

NNPACK is initialised by ``torch._nnpack_available()`` (its convolution fails until then), which :func:`available`
calls. Its thread pool is PyTorch's own (not OpenMP's), created on first use with ``torch.get_num_threads()``
threads; later changes of the thread count do not reach it, and a process forked after that first use has none
of its threads, so :func:`usable` answers ``False`` in any process other than the one that first used it. The
operator is internal to PyTorch: where it is missing, NNPACK is unavailable in the build or on this CPU (x86 without
AVX2), fails a tiny probe, or refuses an input, ``F.conv2d`` runs.
"""

from __future__ import annotations

import logging
import math
import os

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
_pool_pid: int | None = None  # the process whose NNPACK thread pool exists (set on first use)
_NO_NNPACK_CAPABILITIES = ("DEFAULT", "NO AVX")  # x86 without AVX2: NNPACK's x86 kernels need AVX2 and FMA3


def available() -> bool:
    """Whether NNPACK's convolution runs here and matches ``F.conv2d`` (initialises NNPACK; a tiny probe, once per
    process; nothing is probed on x86 CPUs without AVX2, where NNPACK logs that it cannot initialise)."""
    global _available
    if _available is None:
        _available = False
        if (hasattr(torch, "_nnpack_spatial_convolution") and hasattr(torch, "_nnpack_available")
                and torch.backends.cpu.get_cpu_capability() not in _NO_NNPACK_CAPABILITIES):
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
    float32 CPU input of at least one image of :data:`MIN_POSITIONS` positions or more, in the process whose NNPACK
    thread pool this is (not a child forked after its first use)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[0] > 0 and x.shape[2] * x.shape[3] >= MIN_POSITIONS and not torch.is_autocast_enabled("cpu")
            and _pool_pid in (None, os.getpid()))


def _nnpack(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """NNPACK's convolution of ``x`` ``[B, C_in, H, W]`` (of one image: its Winograd inference algorithm); records
    this process as the owner of NNPACK's thread pool."""
    global _pool_pid
    _pool_pid = _pool_pid or os.getpid()
    return torch._nnpack_spatial_convolution(x, conv.weight, conv.bias, list(conv.padding), [1, 1])


def winograd_conv2d(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` with NNPACK's Winograd algorithm, one image at a time (see the module docstring).

    Shape: ``[B, C_in, H, W] -> [B, C_out, H', W']`` (contiguous NCHW; a channels_last input is read through a
    contiguous copy)."""
    if x.shape[0] <= 1:
        return _nnpack(x, conv)
    first = _nnpack(x[:1], conv)  # [1, C_out, H', W']
    out = first.new_empty((x.shape[0], *first.shape[1:]))  # one output: no per-image list to concatenate
    out[:1] = first
    for i in range(1, x.shape[0]):
        out[i:i + 1] = _nnpack(x[i:i + 1], conv)
    return out


_choices: dict[tuple, bool] = {}  # (channels, size, layout, threads, ISA) -> measured choice, once per process


def winograd_conv_pays(channels: int, channels_last: bool = True, size: int = math.isqrt(MIN_POSITIONS),
                       rounds: int = 3, min_speedup: float = 1.2) -> bool:
    """Whether :func:`winograd_conv2d` is at least ``min_speedup`` times as fast as ``F.conv2d`` on this CPU: a
    one-time measured choice (about 0.5 s at 384 channels, cached per process for each set of arguments).

    It times a float32 3x3 ``channels -> channels`` convolution on a ``size x size`` map (batch 1; by default the
    smallest map the kernel is used on) with NNPACK against ``F.conv2d`` in the layout the decoder would have
    otherwise (``channels_last``, the fast path's default, or NCHW), interleaved, best of ``rounds`` after a
    warm-up. The margin is there because the kernel also changes the decoder's values in the last bits and its
    layout (NCHW). ``False`` where NNPACK is unavailable or fails.
    """
    key = (channels, size, channels_last, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key in _choices:
        return _choices[key]
    choice = False
    conv = nn.Conv2d(channels, channels, 3, padding=1).eval()
    if can_winograd(conv):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, channels, size, size, generator=generator)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x_direct = x.contiguous(memory_format=layout)
        weight_direct = conv.weight.detach().contiguous(memory_format=layout)
        try:
            with torch.inference_mode():
                choice = measure_choice(f"Winograd convolution (float32, {channels} channels, {size}x{size})",
                                        ("winograd", lambda: winograd_conv2d(x, conv)),
                                        ("direct", lambda: F.conv2d(x_direct, weight_direct, conv.bias, padding=1)),
                                        rounds, min_speedup, logger).chosen
        except RuntimeError as err:
            logger.warning("NNPACK's Winograd convolution failed (%s); using F.conv2d", err)
    _choices[key] = choice
    return choice
