"""Opt-in fast inference: inference modules swapped in, bf16 stages, channels_last, float32 where indices are decided.

:func:`optimize_for_inference` prepares a :class:`~dualvitok.DualViTok` once, in place, for inference only. The
float32 modules stay the reference; this layer changes the model in three ways, all without changing a state-dict
key:

* **Inference variants of the blocks** (:mod:`dualvitok.blocks.inference`) replace the public MoVQ blocks: residual
  additions fused into the preceding convolution, in-place epilogues on temporaries. On CPU the fused addition is a
  oneDNN post-op (:mod:`dualvitok.blocks.fused`); other devices' plans never use that operator.
* **Stages in bf16**: the frozen Qwen2-VL vision tower (its RoPE still in float32), the semantic decoder and the pixel
  decoder with ``pixel_post_quant_conv`` are converted natively (weights and norms, no autocast). The trainable
  encoders in front of the quantizers (pixel encoder + ``pixel_quant_conv``, semantic head) decide the indices;
  ``indices`` says how they run:

  - ``"guarded"`` (default): the **residual branches** of the pixel encoder's full-resolution level (``conv1``,
    ``norm2``, ``conv2`` of each ResNet block there, about 55% of its FLOPs; :data:`GUARDED_LEVELS`) compute in
    bf16 while its residual stream, the norms reading it, the shortcuts, the DC downsampling, the lower levels, the
    middle block, ``conv_out``, ``pixel_quant_conv`` and the semantic head stay float32. At least 99%
    of pixel indices equal the float32 path's (the quality guard, a test on the conformance weights and on the
    released architecture); the flips are near ties.
  - ``"exact"``: the pixel encoder and the semantic head stay float32 in the float32 path's layout, so pixel
    indices equal the float32 path's bit for bit.
  - ``"fast"``: those stages are converted too (some more indices differ).

  In every mode semantic indices differ only where the bf16 tower moves a feature across a near tie, and the
  quantizers always search in float32.
* **Casts between stages** are forward hooks of this module (:func:`install_stage_casts`, installed by
  ``DualViTok.__init__``) on each stage's entry and exit: inputs are cast to the stage's weight dtype, outputs back
  to float32; the fast path adds channels_last for the inputs of its convolutional stages. So
  ``DualViTok.encode``/``decode`` contain no dtype or layout code, and every output is float32.

**Device plans.** On CPU: bf16 as above, channels_last, oneDNN-fused additions where a one-time measurement on this
CPU finds them about as fast as the separate operators or faster
(:func:`dualvitok.blocks.fused.fused_conv_add_pays`), the bf16 linear layers (the vision tower's GEMMs) computing
from prepacked weights where another one-time measurement finds that faster than ``F.linear``
(:func:`dualvitok.blocks.packed.packed_linear_pays`; a second copy of those weights), behind a bf16 tower the
float32 semantic head's linear layers the same way where a measurement in float32 finds oneDNN faster than PyTorch's
BLAS (``pack_float32``), the pixel decoder's bf16 convolutions on maps of up to 128x128 positions from prepacked
weights too where another one finds that faster than ``F.conv2d``
(:func:`dualvitok.blocks.packed_conv.packed_conv_pays`; ``pack_conv``), where the pixel decoder stays float32 (CPUs
without bf16 matrix hardware) its 3x3 convolutions on large maps with NNPACK's Winograd algorithm and the decoder in
NCHW where another one finds that faster than oneDNN's direct convolution in channels_last
(:func:`dualvitok.blocks.winograd.winograd_conv_pays`; ``winograd_conv``), and the decoder's
``silu(SpatialNorm(x, zq))`` as a native kernel (:mod:`dualvitok.blocks.norm_silu`, built on first use with the
system C compiler) where a third one finds it faster
(:func:`dualvitok.blocks.norm_silu.native_norm_silu_pays`), and the bf16 vision blocks' RoPE as another native
kernel (:mod:`dualvitok.blocks.native_rope`, PyTorch's values bit for bit) where a fourth one does
(:func:`dualvitok.blocks.native_rope.native_rope_pays`). Under ``torchrun``, ``dualvitok encode`` and ``dualvitok
evaluate`` make every rank take rank 0's choices (:func:`agree_on_kernels`).
On CUDA and other accelerators: bf16 weights, channels_last, in-place variants with plain operators (never the
oneDNN operator), attention through ``F.scaled_dot_product_attention`` (every attention of the model already uses
it, so the flash / memory-efficient kernels apply), and with ``compile=True`` the stages are also compiled with
``torch.compile``.

**Freed buffers kept (CPU).** glibc hands every allocation above 32 MiB a fresh ``mmap`` and unmaps it when freed,
so the full-resolution activations of each forward pass page-fault on first touch: keeping freed buffers made the
fast path 1.14-1.29x faster over encode+decode at 256x256 and 512x512 on an Intel Xeon with AMX, for about 1.8 GiB
more peak RSS (``benchmarks/bench_reference.py``). The CPU plan therefore calls
:func:`dualvitok.devices.keep_freed_cpu_memory` (``keep_freed_memory=None``, the default, or ``True``): glibc's mmap
and trim thresholds are raised so freed buffers are reused. That setting is **process-wide and not undone**
(the process keeps its peak memory reserved; the model is inference-only from here on anyway);
``keep_freed_memory=False`` leaves the allocator alone, e.g. beside jemalloc or tcmalloc. It is the only
process-wide setting a plan changes, and ``inference_plan.keep_freed_memory`` records whether it applied.

**Never slower than float32.** bf16 pays only where the CPU has native bf16 matrix instructions, the stage is
wide enough to use them, and they are measured faster. The rule (:func:`low_precision_reason`, checked per stage at
preparation time): on x86 CPUs without AVX-512-BF16 or AMX (or with oneDNN limited below them by
``ONEDNN_MAX_CPU_ISA``) bf16 is emulated and every stage stays float32; on CPUs with AVX-512-BF16 but no AMX (e.g.
AMD EPYC, or AMX hidden from oneDNN) and non-x86 ones a stage runs in bf16 only if its base channel width is at
least :data:`MIN_BF16_WIDTH` (128): there the demo model (widths 32 and 64) ran 0.79x of float32 on the fast path
while the released architecture (pixel decoder 384, tower 1280) ran 2.6x; with AMX every stage may (the demo model,
base width 32, is ~2x faster so). In every case a one-time measurement
(:func:`dualvitok.cpu.low_precision_speedup`: bf16 against float32 matrix products) must find bf16 at least
:data:`~dualvitok.cpu.MIN_LOW_PRECISION_SPEEDUP` times faster, so CPUs whose flags promise more than their bf16
kernels give keep float32 (an Intel Xeon with AMX limited to AVX-512-BF16 in oneDNN measured 0.43-0.65x). Under
``torchrun`` call :func:`agree_on_low_precision` on every rank first (``dualvitok encode`` and ``dualvitok evaluate``
do), so every rank takes rank 0's measurement. Each stage left
in float32 is logged with its reason, and ``inference_plan.low_precision_speedup`` records the measurement.

After this call the model can no longer be trained, and ``save_pretrained`` refuses it when a stage was converted
(the weights are rounded): save before optimizing, or reload. ``benchmarks/bench_tokenizer.py`` measures the float32
path and the fast path side by side, with the quality guard (bf16 vs float32 reconstructions and indices).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from .blocks import fused, norm_silu, packed, packed_conv, winograd
from .blocks import native_rope as native_rope_kernel
from .blocks.inference import KERNELS, InferenceLinear, InferenceVariant, PackedCopy, swap_inference_blocks
from .cpu import MIN_LOW_PRECISION_SPEEDUP, cpu_bf16_support, low_precision_speedup, use_low_precision_speedup

logger = logging.getLogger(__name__)

MIN_BF16_WIDTH = 128
"""On CPUs without AMX, a stage whose base channel width is below this stays float32 (see the module docstring)."""


INDEX_MODES = ("guarded", "exact", "fast")
"""Values of ``optimize_for_inference(indices=...)`` (see the module docstring)."""


@dataclass
class InferencePlan:
    """What :func:`optimize_for_inference` did to a model (kept as ``model.inference_plan``).

    Attributes:
        device_type: the plan's device kind (``"cpu"``, ``"cuda"``, ...).
        stage_dtypes: stage name -> dtype it computes in (``"bfloat16"``, ``"float32"``).
        kept_float32: stage name -> why it stays float32.
        channels_last: 2D convolutions and their inputs in channels_last (except in the pixel decoder where
            ``winograd_conv`` was chosen, and the index-deciding encoders with ``indices="exact"``).
        fuse_conv: the oneDNN convolution + addition operator is used (CPU plan only, where a one-time measurement
            on this CPU finds it at least as fast as the separate operators:
            :func:`dualvitok.blocks.fused.fused_conv_add_pays`).
        pack_linear: the bf16 linear layers compute from prepacked weights (CPU plan only, where a one-time
            measurement on this CPU finds it at least as fast as ``F.linear``:
            :func:`dualvitok.blocks.packed.packed_linear_pays`).
        pack_float32: the float32 linear layers behind a bf16 vision tower (the semantic head's) compute from
            prepacked weights with oneDNN's GEMM (CPU plan only, where a one-time measurement on this CPU finds it
            at least as fast as ``F.linear``, i.e. PyTorch's BLAS, in float32).
        pack_conv: the bf16 2D convolutions (the pixel decoder's) compute from prepacked weights (CPU plan with
            channels_last only, where a one-time measurement on this CPU finds it at least as fast as ``F.conv2d``:
            :func:`dualvitok.blocks.packed_conv.packed_conv_pays`; decoded images within a bf16 rounding, the same
            tokens).
        winograd_conv: the pixel decoder's float32 3x3 convolutions on maps of at least 64x64 positions compute with
            NNPACK's Winograd algorithm, and the decoder runs in NCHW (CPU plan with a float32 decoder only, where a
            one-time measurement on this CPU finds it at least 1.2x as fast as oneDNN's direct convolution:
            :func:`dualvitok.blocks.winograd.winograd_conv_pays`; decoded images within float32-level differences of
            the float32 path's, the same tokens).
        native_norm: the MoVQ blocks compute ``silu(norm(x))`` with the native CPU kernel on large maps (CPU plan only,
            where it compiled here and a one-time measurement on this CPU finds it faster than PyTorch's operators:
            :func:`dualvitok.blocks.norm_silu.native_norm_silu_pays`).
        native_rope: the bf16 vision blocks rotate their queries and keys with the native CPU kernel (CPU plan only,
            where it compiled here and a one-time measurement on this CPU finds it faster than PyTorch's operators:
            :func:`dualvitok.blocks.native_rope.native_rope_pays`; the same values either way).
        compiled: the stages were compiled with ``torch.compile``.
        indices: how the index-deciding encoders run (one of :data:`INDEX_MODES`).
        low_precision_speedup: how many times faster ``dtype`` matrix products measured than float32 on this CPU
            (:func:`dualvitok.cpu.low_precision_speedup`; rank 0's under ``torchrun`` after
            :func:`agree_on_low_precision`); ``None`` where the rule did not measure (other devices,
            ``dtype`` float32 or ``None``, x86 without bf16 instructions, or every stage too narrow for bf16
            without AMX).
        keep_freed_memory: this plan applied :func:`dualvitok.devices.keep_freed_cpu_memory` (CPU plan only; the
            C library accepted the settings). ``False`` does not mean glibc's defaults are in force: another plan or
            caller of this process may have applied them, and under a preloaded jemalloc/tcmalloc they do nothing.
    """

    device_type: str
    stage_dtypes: dict[str, str] = field(default_factory=dict)
    kept_float32: dict[str, str] = field(default_factory=dict)
    channels_last: bool = True
    fuse_conv: bool = True
    pack_linear: bool = False
    pack_float32: bool = False
    pack_conv: bool = False
    winograd_conv: bool = False
    native_norm: bool = False
    native_rope: bool = False
    compiled: bool = False
    indices: str = "guarded"
    low_precision_speedup: float | None = None
    keep_freed_memory: bool = False

    @property
    def low_precision(self) -> bool:
        """Whether any stage's weights were converted from float32."""
        return any(d != "float32" for d in self.stage_dtypes.values())


@dataclass
class _Stage:
    name: str
    modules: list[nn.Module]  # converted to the stage dtype
    entry: nn.Module  # inputs cast to the stage dtype (and channels_last) on the way in
    exit: nn.Module  # outputs cast to float32 on the way out
    width: int  # base channel width, for the "never slower than float32" rule
    convolutional: bool
    decides_indices: bool  # kept float32 with exact_indices
    winograd: bool = False  # where float32, its 3x3 convolutions may use Winograd's (winograd_conv; tokens never do)


def _stages(model) -> list[_Stage]:
    cfg, se = model.config, model.semantic_encoder
    tower = cfg.semantic_encoder.semantic_encoder_config
    return [
        _Stage("vision tower", [se.model], se.model, se.model, tower.embed_dim, False, False),
        _Stage("semantic head", [se.proj_in, se.blocks, se.proj_out], se.proj_in, se.proj_out,
               cfg.semantic_encoder.embed_dim, False, True),
        _Stage("pixel encoder", [model.pixel_encoder, model.pixel_quant_conv], model.pixel_encoder,
               model.pixel_quant_conv, cfg.pixel_encoder.ch, True, True),
        _Stage("semantic decoder", [model.semantic_decoder], model.semantic_decoder, model.semantic_decoder,
               cfg.semantic_decoder.embed_dim, False, False),
        _Stage("pixel decoder", [model.pixel_post_quant_conv, model.pixel_decoder], model.pixel_decoder_branch,
               model.pixel_decoder_branch, cfg.pixel_decoder.ch, True, False, winograd=True),
    ]


PIXEL_BRANCHES = "pixel encoder residual branches"
"""The plan's name for the bf16 residual branches of the pixel encoder (``indices="guarded"``)."""


GUARDED_LEVELS = 1
"""``indices="guarded"`` converts the residual branches of this many leading down levels of the pixel encoder (the
full-resolution one: about 55% of its FLOPs at the released widths). Share of pixel indices equal to float32's,
measured on an Intel Xeon with AMX (fused kernels): on the released architecture with the reference's seeded random
weights (benchmarks/bench_reference.py's), 99.1% / 99.2% / 99.0% at 256x256 one by one / batch 8 and at 512x512 with
1 level, against 98.9% / 99.0% / 99.0% with 2 levels; on the conformance weights 2 levels kept 99.6% / 99.2%
(compact / full set) and the whole encoder in bf16 (``"fast"``) 98.3% / 97.8%. A study with ``conv_in`` also in bf16
gave 98.7% for the branches of all 5 levels."""


def _pixel_branch_modules(model) -> list[nn.Module]:
    """``conv1``, ``norm2``, ``conv2`` of every ResNet block of the first :data:`GUARDED_LEVELS` down levels of the
    pixel encoder."""
    return [part for level in model.pixel_encoder.down[:GUARDED_LEVELS] for block in level.block
            for part in (block.conv1, block.norm2, block.conv2)]


def _is_low_precision(dtype: torch.dtype | None) -> bool:
    """Whether a plan in ``dtype`` converts stages (``None`` and float32 keep them float32)."""
    return dtype is not None and dtype != torch.float32


def low_precision_reason(width: int, device_type: str, dtype: torch.dtype | None) -> str | None:
    """``None`` if a stage of base channel width ``width`` should run in ``dtype`` on ``device_type``, else why it
    stays float32 (the rule of the module docstring; it may measure once:
    :func:`dualvitok.cpu.low_precision_speedup`)."""
    return _low_precision_rule(width, device_type, dtype)[0]


def _low_precision_rule(width: int, device_type: str, dtype: torch.dtype | None) -> tuple[str | None, float | None]:
    """:func:`low_precision_reason` and the measured speedup it used (``None`` where it measured nothing)."""
    if device_type != "cpu" or not _is_low_precision(dtype):
        return None, None
    support = cpu_bf16_support()
    if support == "none":
        return f"this CPU has no AVX-512-BF16 or AMX: {dtype} is emulated and slower than float32", None
    if support != "amx" and width < MIN_BF16_WIDTH:
        return (f"base width {width} < {MIN_BF16_WIDTH}: on CPUs without AMX {dtype} kernels are slower than "
                "float32 at this width"), None
    speedup = low_precision_speedup(dtype)  # measured once per process
    if speedup == 0.0:
        return f"{dtype} matrix products failed on this CPU (dualvitok.cpu.low_precision_speedup)", speedup
    if speedup < MIN_LOW_PRECISION_SPEEDUP:
        return (f"{dtype} matrix products measured {speedup:.2f}x the speed of float32 on this CPU (under "
                f"{MIN_LOW_PRECISION_SPEEDUP}x; dualvitok.cpu.low_precision_speedup)"), speedup
    return None, speedup


def _cast(t, dtype: torch.dtype | None, channels_last: bool):
    if not torch.is_tensor(t) or not t.is_floating_point():
        return t
    if dtype is not None:
        t = t.to(dtype)
    if channels_last and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _to_stage_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: floating inputs to the dtype of the stage's weights (a no-op for a float32 stage)."""
    dtype = next(module.parameters()).dtype
    return tuple(_cast(a, dtype, False) for a in args)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the fast path's convolutional stages: 4D floating inputs to channels_last."""
    return tuple(_cast(a, None, True) for a in args)


def _to_float32(module: nn.Module, args: tuple, output):
    """Forward hook: a floating output back to float32 (a no-op for a float32 stage)."""
    return output.float() if torch.is_tensor(output) and output.is_floating_point() else output


def install_stage_casts(model: nn.Module) -> None:
    """Give each stage of a :class:`~dualvitok.DualViTok` its casts: inputs to the stage's weight dtype on the way
    in, outputs to float32 on the way out (forward hooks; no state-dict change).

    Called once by ``DualViTok.__init__``, so a model whose stages have other dtypes (the fast path's bf16 stages, or
    ``from_pretrained(..., dtype=torch.bfloat16)`` / ``model.to(torch.bfloat16)``) still takes float32 images and
    returns float32 outputs, and ``encode``/``decode`` hold no dtype code. In float32 the casts are no-ops.
    """
    for stage in _stages(model):
        stage.entry.register_forward_pre_hook(_to_stage_dtype)
        stage.exit.register_forward_hook(_to_float32)


def _convert(plan: InferencePlan, name: str, modules: list[nn.Module], dtype: torch.dtype, reason: str | None):
    """Convert ``modules`` to ``dtype`` and record it as stage ``name`` of ``plan``, or (``reason`` given) record
    that they stay float32 and why."""
    if reason is None:
        for module in modules:
            module.to(dtype)
        plan.stage_dtypes[name] = str(dtype).removeprefix("torch.")
    else:
        plan.stage_dtypes[name] = "float32"
        plan.kept_float32[name] = reason


KERNEL_CHOICES = tuple(KERNELS)
"""The plan's measured kernel choices (:class:`InferencePlan` fields), which :func:`use_kernels` sets."""


@dataclass(frozen=True)
class _NativeKernel:
    module: ModuleType  # the kernel's module: native_available() says whether it built and passed its self-check here
    description: str
    without_it: str  # what running PyTorch's operators instead changes


NATIVE_KERNELS = {
    "native_norm": _NativeKernel(norm_silu, "the native GroupNorm + SiLU kernel",
                                 "decoded images may differ from other processes' in the last bits; tokens do not"),
    "native_rope": _NativeKernel(native_rope_kernel, "the native RoPE kernel", "the same values"),
}
"""The kernel choices of :data:`KERNEL_CHOICES` that are native kernels (built on first use; maybe unavailable)."""


def _native_choice(name: str, asked: bool | None, pays: Callable[[], bool]) -> bool:
    """The plan's choice for native kernel ``name``: ``asked`` (``True``) or the one-time measurement ``pays()``
    (``None``), and never where the kernel is unavailable here (asked for: a warning)."""
    kernel = NATIVE_KERNELS[name]
    if asked and not kernel.module.native_available():
        logger.warning("optimize_for_inference(%s=True): %s is unavailable here (logged at INFO: no C compiler, "
                       "DUALVITOK_NATIVE=0; or a warning above); PyTorch's operators run instead", name,
                       kernel.description)
    return kernel.module.native_available() and (bool(asked) or pays())


def use_kernels(model: nn.Module, **choices: bool) -> None:
    """Switch a prepared model's inference variants to (or off) the kernels named by :data:`KERNEL_CHOICES`
    (``fuse_conv=``: the oneDNN convolution + addition; ``pack_linear=``: prepacked linear weights;
    ``pack_float32=``: the semantic head's float32 ones too, behind a bf16 tower only; ``pack_conv=``: prepacked
    bf16 convolution weights; ``winograd_conv=``: Winograd convolutions in a float32 pixel decoder;
    ``native_norm=``: the native GroupNorm + SiLU kernel; ``native_rope=``: the native RoPE kernel), e.g. to take
    another process's measured choices; ``model.inference_plan`` records them. ``native_norm=True`` or
    ``native_rope=True`` where the kernel is unavailable (no C compiler), and ``winograd_conv=True`` on a decoder
    that is not float32, are recorded as ``False``, with a warning. Layouts stay as the plan made them: a decoder
    switched to Winograd later keeps its channels_last layout (NNPACK then reads contiguous copies), one switched
    off keeps NCHW (oneDNN's direct convolutions in NCHW); either way tokens do not change."""
    unknown = set(choices) - set(KERNEL_CHOICES)
    if unknown:
        raise TypeError(f"unknown kernel choices {sorted(unknown)}; expected some of {', '.join(KERNEL_CHOICES)}")
    for name, value in choices.items():
        value = bool(value)
        if name in NATIVE_KERNELS and value and not NATIVE_KERNELS[name].module.native_available():
            kernel = NATIVE_KERNELS[name]
            logger.warning("use_kernels(%s=True): %s is unavailable in this process; PyTorch's operators run (%s)",
                           name, kernel.description, kernel.without_it)
            value = False
        if name == "pack_float32" and value and model.inference_plan.stage_dtypes.get("vision tower") != "bfloat16":
            logger.warning("use_kernels(pack_float32=True): this model's vision tower is not bf16, so its float32 "
                           "linear layers keep PyTorch's BLAS (the float32 path's values)")
            value = False
        if name == "winograd_conv" and value and model.inference_plan.stage_dtypes.get("pixel decoder") != "float32":
            logger.warning("use_kernels(winograd_conv=True): this model's pixel decoder is not float32, and the "
                           "Winograd kernel computes float32 convolutions only")
            value = False
        setattr(model.inference_plan, name, value)
        scope = _KERNEL_SCOPES.get(name)
        for module in scope(model) if scope is not None else model.modules():
            if isinstance(module, InferenceVariant):
                setattr(module, name, value)
                if isinstance(module, PackedCopy) and name in module.pack_switches:
                    module.invalidate()  # frees the packed copy (made again on the next call if on)


def _semantic_head_linears(model: nn.Module) -> list[nn.Module]:
    """The linear layers of the semantic head (the only ones ``pack_float32`` applies to)."""
    return [m for part in _stages(model)[1].modules for m in part.modules() if isinstance(m, InferenceLinear)]


def _pixel_decoder_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the pixel decoder branch (the only ones ``pack_conv`` and ``winograd_conv`` apply to)."""
    return list(model.pixel_decoder_branch.modules())


_KERNEL_SCOPES: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    "pack_float32": _semantic_head_linears,  # every other float32 layer keeps the float32 path's values
    "pack_conv": _pixel_decoder_modules,  # the encoders' convolutions, which decide the indices, stay plain
    "winograd_conv": _pixel_decoder_modules,  # likewise: tokens never depend on Winograd's rounding
}
"""Kernel choices that reach only part of the model (the others reach every inference variant)."""


def _winograd_choice(model: nn.Module, asked: bool | None, channels_last: bool) -> bool:
    """The plan's ``winograd_conv`` for a float32 pixel decoder: ``asked`` (``True``/``False``) or the one-time
    measurement at the decoder's base width against its layout otherwise (``None``), and never where none of its
    convolutions can use it."""
    if asked is False or not any(isinstance(m, nn.Conv2d) and winograd.can_winograd(m)
                                 for m in model.pixel_decoder_branch.modules()):
        if asked:
            logger.warning("optimize_for_inference(winograd_conv=True): no convolution of this pixel decoder can use "
                           "NNPACK's Winograd kernel here (NNPACK unavailable, or under %d channels); oneDNN's "
                           "convolutions run", winograd.MIN_CHANNELS)
        return False
    return True if asked else winograd.winograd_conv_pays(model.config.pixel_decoder.ch, channels_last=channels_last)


def agree_on_low_precision(dtype: torch.dtype | None, device: str | torch.device = "cpu") -> None:
    """Under ``torchrun``, before :func:`optimize_for_inference`: make every rank take rank 0's measured bf16
    speedup (:func:`dualvitok.cpu.low_precision_speedup`; only rank 0 measures), so ranks on one kind of CPU convert
    the same stages even where the measurement is near :data:`~dualvitok.cpu.MIN_LOW_PRECISION_SPEEDUP`. Rank 0
    measures whenever its CPU has bf16 instructions, also where the width rule would then keep every stage float32
    (milliseconds). A no-op in a single process, on other devices and for float32; every rank must call it with the
    same arguments (a collective)."""
    import torch.distributed as dist

    from ._utils.distributed import all_gather_json, is_distributed

    if not is_distributed() or torch.device(device).type != "cpu" or not _is_low_precision(dtype):
        return
    mine = low_precision_speedup(dtype) if dist.get_rank() == 0 and cpu_bf16_support() != "none" else None
    rank0 = all_gather_json(mine)[0]
    if rank0 is not None:
        use_low_precision_speedup(dtype, rank0)


def agree_on_kernels(model: nn.Module) -> None:
    """Under ``torchrun``: make every rank use rank 0's measured kernel choices (:data:`KERNEL_CHOICES`), so that
    the same image gets the same tokens on any rank (the kernels round differently in bf16). A rank whose stages
    compute in other dtypes than rank 0's (another kind of CPU, or a bf16 measurement on the other side of
    :data:`~dualvitok.cpu.MIN_LOW_PRECISION_SPEEDUP`) cannot take them (its weights are rounded or would be slower):
    it warns. A no-op in a single process or on a model that is not prepared; every rank must call it (a
    collective)."""
    from ._utils.distributed import all_gather_json

    plan = getattr(model, "inference_plan", None)
    if plan is None:
        return
    rank0 = all_gather_json({"kernels": {name: getattr(plan, name) for name in KERNEL_CHOICES},
                             "stage_dtypes": plan.stage_dtypes})[0]
    differ = {name: value for name, value in rank0["kernels"].items() if value != getattr(plan, name)}
    if differ:
        logger.info("using rank 0's kernel choices %s", differ)
        use_kernels(model, **differ)
    stages = {name: (dtype, rank0["stage_dtypes"].get(name)) for name, dtype in plan.stage_dtypes.items()
              if dtype != rank0["stage_dtypes"].get(name)}
    if stages:
        logger.warning("this rank computes %s where rank 0 computes %s (%s): the same image can get other tokens "
                       "here than on rank 0. Run every rank on one kind of CPU, or use float32 stages everywhere "
                       "(--dtype float32)", ", ".join(f"{n} in {d}" for n, (d, _) in stages.items()),
                       ", ".join(f"{n} in {d0}" for n, (_, d0) in stages.items()),
                       "; ".join(f"{n}: {plan.kept_float32[n]}" for n in stages if n in plan.kept_float32)
                       or "rank 0 keeps them float32")


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, channels_last: bool = True,
                           exact_indices: bool | None = None, *, indices: str = "guarded",
                           device: str | torch.device | None = None, compile: bool = False,
                           fuse_conv: bool | None = None, pack_linear: bool | None = None,
                           pack_float32: bool | None = None, pack_conv: bool | None = None,
                           winograd_conv: bool | None = None, native_norm: bool | None = None,
                           native_rope: bool | None = None, keep_freed_memory: bool | None = None):
    """Prepare ``model`` (a :class:`~dualvitok.DualViTok`) for fast inference, in place; returns it.

    Args:
        model: the tokenizer.
        dtype: compute dtype of the converted stages (``torch.bfloat16``; ``torch.float16`` on GPU) or ``None``
            to keep float32 (inference modules and channels_last only).
        channels_last: store 2D convolution weights (and inputs) in channels_last layout.
        exact_indices: deprecated spelling of ``indices``: ``True`` is ``"exact"``, ``False`` is ``"fast"``.
        indices: how the encoders in front of the quantizers run (about 5% of the float32 work at 256x256):
            ``"guarded"`` (default) the pixel encoder's residual branches in ``dtype``, >= 99% of pixel indices equal
            the float32 path's; ``"exact"`` all float32, pixel indices equal; ``"fast"`` all in ``dtype``.
        device: the device plan to use (``"cpu"``, ``"cuda"``, ...); default: the device of the model's weights.
        compile: also compile the stages with ``torch.compile`` (meant for CUDA; the first calls then compile).
        fuse_conv: CPU plan: use the oneDNN convolution + addition operator (``True``), not (``False``), or measure
            once which is faster on this CPU (``None``, default; :func:`dualvitok.blocks.fused.fused_conv_add_pays`).
        pack_linear: CPU plan: compute the bf16 linear layers (the vision tower's GEMMs) from prepacked weights
            (``True``; a second copy of those weights, about 1.3 GB for the released tower), not (``False``), or
            measure once which is faster on this CPU (``None``, default;
            :func:`dualvitok.blocks.packed.packed_linear_pays`).
        pack_float32: CPU plan, where the vision tower runs in bf16: compute the float32 linear layers behind it
            (the semantic head's) from prepacked weights with oneDNN's GEMM instead of PyTorch's BLAS (``True``;
            other last bits, far below the bf16 tower's rounding), not (``False``), or measure once which is faster
            on this CPU (``None``, default; :func:`dualvitok.blocks.packed.packed_linear_pays` in float32: about
            2.7x on an AMD EPYC, whose MKL float32 GEMMs run at under half oneDNN's speed).
        pack_conv: CPU plan with channels_last: compute the bf16 2D convolutions (the pixel decoder's) from
            prepacked weights (``True``; decoded images within a bf16 rounding, a second copy of those weights for
            one input shape at a time, about 0.9 GB for the released decoder:
            :class:`dualvitok.blocks.inference.InferenceConv2d`), not (``False``), or measure once which is faster
            on this CPU (``None``, default; :func:`dualvitok.blocks.packed_conv.packed_conv_pays` at the decoder's
            widest level).
        winograd_conv: CPU plan where the pixel decoder stays float32: compute its 3x3 convolutions on maps of at
            least 64x64 positions with NNPACK's Winograd algorithm and keep the decoder in NCHW (``True``; decoded
            images within float32-level differences of the float32 path's, the same tokens:
            :mod:`dualvitok.blocks.winograd`), not
            (``False``), or measure once which is faster on this CPU (``None``, default;
            :func:`dualvitok.blocks.winograd.winograd_conv_pays` at the decoder's base width). Where NNPACK is
            unavailable oneDNN's convolutions run.
        native_norm: CPU plan: compute the MoVQ blocks' ``silu(norm(x))`` on large maps with the native kernel
            (``True``; built on first use with the system C compiler, :mod:`dualvitok.blocks.norm_silu`), not
            (``False``), or measure once which is faster on this CPU (``None``, default;
            :func:`dualvitok.blocks.norm_silu.native_norm_silu_pays`). Without a C compiler PyTorch's operators run.
        native_rope: CPU plan: rotate the bf16 vision blocks' queries and keys with the native kernel (``True``;
            :mod:`dualvitok.blocks.native_rope`, PyTorch's values bit for bit), not (``False``), or measure once which
            is faster on this CPU (``None``, default; :func:`dualvitok.blocks.native_rope.native_rope_pays`).
            Without a C compiler PyTorch's operators run.
        keep_freed_memory: CPU plan: let glibc keep freed large buffers for reuse, **for the whole process**
            (``None``, default, or ``True``; :func:`dualvitok.devices.keep_freed_cpu_memory`), or leave the allocator
            alone (``False``). Ignored by other plans.

    The plan taken is kept as ``model.inference_plan`` (:class:`InferencePlan`). Calling this twice does nothing
    the second time. The model can no longer be trained in this state; reload it for training.
    """
    if getattr(model, "inference_plan", None) is not None:
        logger.info("optimize_for_inference: the model is already prepared (%s plan); nothing to do",
                    model.inference_plan.device_type)
        return model
    if exact_indices is not None:
        warnings.warn("optimize_for_inference(exact_indices=...) is deprecated: use indices='exact' (True) or "
                      "indices='fast' (False)", DeprecationWarning, stacklevel=2)
        indices = "exact" if exact_indices else "fast"
    if indices not in INDEX_MODES:
        raise ValueError(f"indices={indices!r}: expected one of {', '.join(INDEX_MODES)}")
    device_type = torch.device(device).type if device is not None else next(model.parameters()).device.type
    plan = InferencePlan(device_type, channels_last=channels_last, fuse_conv=device_type == "cpu" and not compile,
                         compiled=compile, indices=indices)
    model.eval().requires_grad_(False)
    if device_type == "cpu" and keep_freed_memory is not False:
        from .devices import keep_freed_cpu_memory

        plan.keep_freed_memory = bool(keep_freed_cpu_memory())
    exact = indices == "exact"
    low_precision = _is_low_precision(dtype)

    def rule(width: int) -> str | None:
        reason, speedup = _low_precision_rule(width, device_type, dtype)
        if speedup is not None:
            plan.low_precision_speedup = speedup
        return reason

    for stage in _stages(model):
        if not low_precision:
            reason = "dtype=None" if dtype is None else "dtype=float32"
        elif stage.decides_indices and indices != "fast":
            reason = f"indices={indices!r}"
        else:
            reason = rule(stage.width)
        _convert(plan, stage.name, stage.modules, dtype, reason)
        # exact indices: the index-deciding float32 stages keep the float32 path's layout too (channels_last picks
        # other convolution kernels, whose float32 sums differ in the last bits and can flip a near-tie index)
        layout = channels_last and stage.convolutional and not (stage.decides_indices and exact)
        if stage.winograd and device_type == "cpu" and not compile and plan.stage_dtypes[stage.name] == "float32":
            plan.winograd_conv = _winograd_choice(model, winograd_conv, layout)
            layout = layout and not plan.winograd_conv  # NNPACK reads and writes NCHW
        if layout:
            for module in stage.modules:
                for conv in module.modules():
                    if isinstance(conv, nn.Conv2d):
                        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
            stage.entry.register_forward_pre_hook(_to_channels_last)  # after the dtype cast of install_stage_casts
    if indices == "guarded" and low_precision:
        # the branches only: InferenceResnetBlock2d keeps the stream float32 around them
        _convert(plan, PIXEL_BRANCHES, _pixel_branch_modules(model), dtype, rule(model.config.pixel_encoder.ch))
    decoder_dtype = next(model.pixel_decoder.parameters()).dtype
    # one-time measured choice on this CPU (pixel decoder width and dtype, channels_last: the encoders' layout, and
    # the decoder's unless Winograd is chosen, where it then applies to the maps under 64x64 only)
    if plan.fuse_conv and fuse_conv is None:
        plan.fuse_conv = fused.fused_conv_add_pays(model.config.pixel_decoder.ch, decoder_dtype)
    elif plan.fuse_conv:
        plan.fuse_conv = bool(fuse_conv)
    tower, head = _stages(model)[:2]  # the tower's GEMMs are the linear layers that count
    tower_weight = next(tower.entry.parameters())
    if (device_type == "cpu" and not compile and tower_weight.dtype != torch.float32 and packed.can_pack(tower_weight)
            and pack_linear is not False):  # float32 layers are pack_float32's (below)
        # one-time measured choice on this CPU, at the tower's width and dtype
        plan.pack_linear = True if pack_linear else packed.packed_linear_pays(tower.width, tower_weight.dtype)
    head_weight = next(head.entry.parameters())
    if (device_type == "cpu" and not compile and pack_float32 is not False and tower_weight.dtype == torch.bfloat16
            and head_weight.dtype == torch.float32 and packed.can_pack(head_weight)):
        # one-time measured choice on this CPU, at the semantic head's width; only behind a bf16 tower, whose
        # rounding moves the head's input far more than oneDNN's other last bits (a float32 plan stays BLAS's)
        plan.pack_float32 = True if pack_float32 else packed.packed_linear_pays(model.config.semantic_encoder.embed_dim,
                                                                                 torch.float32)
    decoder_conv = next(m for m in model.pixel_decoder.modules() if isinstance(m, nn.Conv2d))
    if (device_type == "cpu" and not compile and channels_last and pack_conv is not False
            and packed_conv.can_pack_conv(decoder_conv)):
        # one-time measured choice on this CPU, at the decoder's widest level (where the reorder weighs most)
        widest = model.config.pixel_decoder.ch * max(model.config.pixel_decoder.ch_mult)
        plan.pack_conv = True if pack_conv else packed_conv.packed_conv_pays(widest, decoder_conv.weight.dtype)
    if device_type == "cpu" and not compile and native_norm is not False and decoder_dtype == torch.bfloat16:
        plan.native_norm = _native_choice("native_norm", native_norm, lambda: norm_silu.native_norm_silu_pays(
            model.config.pixel_decoder.ch, decoder_dtype))
    if device_type == "cpu" and not compile and native_rope is not False and tower_weight.dtype == torch.bfloat16:
        tower_config = model.config.semantic_encoder.semantic_encoder_config
        plan.native_rope = _native_choice("native_rope", native_rope, lambda: native_rope_kernel.native_rope_pays(
            tower_config.num_heads, tower_config.embed_dim // tower_config.num_heads))
    # replaced parts reach the branches (DualViTok.__setattr__)
    # the scoped choices (pack_float32: the semantic head; pack_conv, winograd_conv: the pixel decoder) are set by
    # use_kernels, below
    swap_inference_blocks(model, **{name: getattr(plan, name) for name in KERNEL_CHOICES if name not in _KERNEL_SCOPES})
    if compile:
        for module in (model.semantic_encoder.model, model.semantic_decoder, model.pixel_encoder,
                       model.pixel_decoder_branch):
            module.compile()
    model.inference_plan = plan
    use_kernels(model, **{name: True for name in _KERNEL_SCOPES if getattr(plan, name)})
    if plan.low_precision:
        model._save_refusal = (
            "this model was prepared with optimize_for_inference(): its "
            + ", ".join(n for n, d in plan.stage_dtypes.items() if d != "float32")
            + " weights are rounded to low precision. Save the model before calling optimize_for_inference(), or "
            "reload it (from_pretrained) and save that")
    converted = [f"{n} ({d})" for n, d in plan.stage_dtypes.items() if d != "float32"]
    kernels = (f"; fused convolution + addition {'on' if plan.fuse_conv else 'off'}, prepacked linear weights "
               f"{'on' if plan.pack_linear else 'off'} (float32 {'on' if plan.pack_float32 else 'off'}), "
               f"prepacked convolution weights {'on' if plan.pack_conv else 'off'}, "
               f"Winograd convolutions {'on' if plan.winograd_conv else 'off'}, "
               f"native GroupNorm + SiLU {'on' if plan.native_norm else 'off'}, "
               f"native RoPE {'on' if plan.native_rope else 'off'}, "
               f"freed buffers kept for reuse (process-wide) "
               f"{'on' if plan.keep_freed_memory else 'off'}" if device_type == "cpu" else "")
    measured = (f", {str(dtype).removeprefix('torch.')} matrix products {plan.low_precision_speedup:.1f}x float32"
                if plan.low_precision_speedup is not None else "")
    logger.info("optimize_for_inference (%s plan%s): %s; float32: %s%s", device_type,
                f", CPU bf16 support: {cpu_bf16_support()}{measured}" if device_type == "cpu" else "",
                ", ".join(converted) or "no stage converted",
                "; ".join(f"{n} ({r})" for n, r in plan.kept_float32.items()) or "none", kernels)
    return model

