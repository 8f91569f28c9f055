"""Linear layers with weights prepacked for oneDNN on CPU (the vision tower's GEMMs at inference).

In bf16 on CPU ``F.linear`` hands the weight to oneDNN in PyTorch's plain ``[out, in]`` layout, and oneDNN reorders
it into its blocked (AMX / AVX-512-BF16) layout on **every call**. At the vision tower's shapes (324 tokens at
256x256 against 1280x5120 weights, 13 MB each in bf16) that reorder is a large share of the GEMM: prepacking the
weight once (``torch.ops.mkldnn._reorder_linear_weight``, the same prepacking Inductor's CPU freezing pass does) and
calling ``torch.ops.mkldnn._linear_pointwise`` on it made those GEMMs 1.1-1.8x faster on an Intel Xeon with AMX.

* :func:`pack_weight` / :func:`packed_linear` are the two operators; :class:`dualvitok.blocks.inference.InferenceLinear`
  (swapped in by :func:`dualvitok.inference.optimize_for_inference`) keeps one packed copy per bf16 ``nn.Linear`` next
  to the plain weight (the state dict still holds the plain one), made on the first call.
* :class:`dualvitok.blocks.inference.InferenceVisionMlp` folds quick-GELU into the first GEMM of each vision MLP
  (the ``swish`` post-op of :func:`packed_linear` on weights scaled by 1.702), removing the MLP's element-wise
  passes, which at batch 8 (26 MB activations per block, out of cache) cost about 7% of the encode.
* The packed kernel is oneDNN's own, so results match ``F.linear`` in bf16 (bit for bit at most shapes we tried,
  within a bf16 rounding where oneDNN blocks the sum differently).
* Whether it pays is a one-time measurement on this CPU (:func:`packed_linear_pays`), not assumed: the AVX-512-BF16
  kernels of CPUs without AMX have another layout and cost.

bf16 weights are packed where the plan's ``pack_linear`` says so. float32 ``F.linear`` goes to another library
(PyTorch's BLAS, MKL in the PyPI builds), whose sums differ from oneDNN's in the last bits; on an AMD EPYC with
AVX-512-BF16 it ran at about 210 GFLOP/s where oneDNN's float32 GEMM ran at about 480 (2 threads, 2048 x 2048),
and the fast path's float32 semantic head (18 GEMMs on 81 rows at 256x256) spent about 10% of the encode in it.
So float32 weights are packed too where the plan's ``pack_float32`` says so: only behind a bf16 vision tower,
whose rounding already moves the semantic head's input by far more than those last bits, and only where a one-time
measurement finds oneDNN faster (:func:`packed_linear_pays` in float32).

The operators are internal to PyTorch: where they are missing, disabled (``torch.backends.mkldnn.enabled``), fail a
tiny probe on this CPU, under autocast, or refuse a weight or an input (the layer then logs it and stays with
``F.linear``), the plain ``F.linear`` runs.

The plan measures the bf16 choice once, at the vision tower's width, and applies it to every bf16 linear layer of the
model (the tower's are nearly all of their FLOPs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils.timing import measure_choice

logger = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16, torch.float32)
"""Weight dtypes that can be packed (see the module docstring)."""


_works: dict[torch.dtype, bool] = {}  # dtype -> the operators ran on a tiny weight in this process


def _operators_work(dtype: torch.dtype) -> bool:
    """Whether this build and CPU run the packing operators in ``dtype`` (a tiny probe, once per process: oneDNN's
    bf16 kernels need AVX-512 or AMX, and a build may lack the operators)."""
    if dtype not in _works:
        ok = False
        if (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            try:
                with torch.inference_mode():
                    weight, x = torch.eye(16, dtype=dtype), torch.arange(32.0).reshape(2, 16).to(dtype)
                    ok = torch.equal(packed_linear(x, pack_weight(weight, 2), None), x)
            except RuntimeError as err:
                logger.info("prepacked linear weights unavailable in %s here (%s)", dtype, err)
        _works[dtype] = ok
    return _works[dtype]


def can_pack(weight: Tensor) -> bool:
    """Whether weights like ``weight`` (its dtype and device) can be packed here: bf16 or float32 on CPU, with
    oneDNN enabled and its operators running on this CPU."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKED_DTYPES
        and torch.backends.mkldnn.enabled
        and _operators_work(weight.dtype)
    )


def pack_weight(weight: Tensor, tokens: int) -> Tensor:
    """``weight [out, in]`` reordered into oneDNN's layout for GEMMs of about ``tokens`` rows (an opaque mkldnn
    tensor, a second copy of the weight)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), tokens)


ACTIVATIONS = ("none", "swish")
"""oneDNN post-ops :func:`packed_linear` applies to the float32 accumulator (``swish(x) = x * sigmoid(x)``)."""


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """``activation(F.linear(x, weight, bias))`` from :func:`pack_weight`'s ``packed`` weight (one of
    :data:`ACTIVATIONS`, applied before the output is rounded).

    Shape: ``[..., in] -> [..., out]``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], "")


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`packed_linear` applies to input ``x`` for ``weight`` now (autograd off, same dtype, no
    autocast)."""
    return (not torch.is_grad_enabled() and x.dtype == weight.dtype and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and x.dim() >= 2)


_choices: dict[tuple, bool] = {}  # (dtype, width, tokens, ISA) -> measured choice, once per process


def packed_linear_pays(width: int, dtype: torch.dtype, tokens: int = 324, rounds: int = 5,
                       tolerance: float = 0.10) -> bool:
    """Whether :func:`packed_linear` is about as fast as ``F.linear`` or faster on this CPU: a one-time measured
    choice (about 0.2 s at width 1280, cached per process for each ``(dtype, width, tokens)``).

    It times the ``width -> 4 * width`` MLP projection of a vision block on ``tokens`` rows both ways, interleaved,
    best of ``rounds`` after a warm-up, and keeps the packed weights unless they are more than ``tolerance`` slower.
    ``False`` where the operators are missing or refuse the weight.
    """
    key = (dtype, width, tokens, torch.backends.cpu.get_cpu_capability())
    if key in _choices:
        return _choices[key]
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(4 * width, width, generator=generator) * width**-0.5).to(dtype)
    bias = torch.zeros(4 * width, dtype=dtype)
    x = torch.randn(tokens, width, generator=generator).to(dtype)
    choice = False
    if can_pack(weight):
        try:
            with torch.inference_mode():
                packed = pack_weight(weight, tokens)
                what = f"prepacked linear weights ({dtype}, {width} -> {4 * width}, {tokens} tokens)"
                choice = measure_choice(what, ("packed", lambda: packed_linear(x, packed, bias)),
                                        ("plain", lambda: F.linear(x, weight, bias)), rounds, 1 / (1 + tolerance),
                                        logger).chosen
        except RuntimeError as err:  # an unsupported build or ISA: plain F.linear
            logger.warning("prepacked linear weights unavailable (%s); using F.linear", err)
    _choices[key] = choice
    return choice
