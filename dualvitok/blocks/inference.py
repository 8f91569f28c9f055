"""Inference variants of the blocks: in-place epilogues, residual additions fused into convolutions, packed weights.

:func:`dualvitok.inference.optimize_for_inference` swaps these in for the plain blocks (:func:`swap_inference_blocks`).
A variant is a subclass of its block built from an existing instance: it shares the instance's parameters, buffers
and submodules, so state-dict keys and values do not change. Its ``forward`` computes what the plain block computes,
with fewer full-resolution passes and allocations (see :mod:`dualvitok.blocks.fused`):

* the residual addition of ``ResnetBlock2d``/``AttnBlock2d`` goes into the last convolution (a oneDNN post-op on
  CPU where ``fuse_conv`` is set, else an in-place ``add_``), written into the block's input ``x``;
* ``nn.Linear`` computes from a prepacked copy of its bf16 weight on CPU where ``pack_linear`` is set
  (:mod:`dualvitok.blocks.packed`), and ``VisionMlp`` folds its quick-GELU into the first of those GEMMs;
  ``nn.Conv2d`` likewise where ``pack_conv`` is set (:mod:`dualvitok.blocks.packed_conv`), and computes float32
  3x3 convolutions on large maps with NNPACK's Winograd algorithm where ``winograd_conv`` is set
  (:mod:`dualvitok.blocks.winograd`);
* ``VisionAttention`` rotates its bf16 queries and keys with a native CPU kernel in one pass where ``native_rope``
  is set (:mod:`dualvitok.blocks.native_rope`; PyTorch's values bit for bit);
* the DC shortcuts and the decoder stem are added in place (the DC-up shortcut as a broadcast over views, nothing
  materialised at full size). (``SpatialNorm`` and the plain ``ResnetBlock2d`` write into their own temporaries
  without autograd already, on every path.)

So a convolutional variant **overwrites its input**: the MoVQ encoder and decoder only pass temporaries they own.
While autograd is on a variant runs the plain block's ``forward`` (training and gradient checks see the public
block). In float32 the results equal the plain blocks' (``tests/blocks/test_fused.py``); in bf16 a fused addition
rounds once, not twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import is_tracing, version_counter
from . import packed, packed_conv, winograd
from .attention import AttnBlock2d
from .dc import DCDownBlock2d, DCUpBlock2d, space_to_channel, space_to_channel_average
from .fused import add, conv2d_add, is_out_of_memory
from .movq import MoVQDecoder
from .native_rope import rotate_queries_keys
from .norm_silu import norm_silu
from .resnet import ResnetBlock2d
from .vit import QUICK_GELU_ALPHA, VisionAttention, VisionMlp, quick_gelu

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)


KERNELS: dict[str, bool] = {"fuse_conv": True, "pack_linear": False, "pack_float32": False, "pack_conv": False,
                            "winograd_conv": False, "native_norm": False, "native_rope": False}
"""The variants' kernel switches (see :class:`InferenceVariant`) and their defaults."""


def _kernel_switches(kernels: dict[str, bool]) -> dict[str, bool]:
    """Every switch of :data:`KERNELS`, ``kernels`` over the defaults (an unknown name is an error)."""
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise TypeError(f"unknown kernel switches {sorted(unknown)}; expected some of {', '.join(KERNELS)}")
    return {**KERNELS, **{name: bool(value) for name, value in kernels.items()}}


class InferenceVariant(nn.Module):
    """Base of the inference variants: construction from a plain block, the kernel switches (:data:`KERNELS`), and
    the conv + residual epilogue.

    ``fuse_conv``: use the oneDNN convolution with an addition post-op (CPU only,
    :func:`dualvitok.blocks.fused.conv2d_add`); otherwise ``residual.add_(conv(x))``, plain operators only.
    ``pack_linear``: compute bf16 linear layers from prepacked weights (:mod:`dualvitok.blocks.packed`).
    ``pack_float32``: compute float32 linear layers from prepacked weights too (oneDNN's GEMM instead of PyTorch's
    BLAS: other last bits).
    ``pack_conv``: compute bf16 2D convolutions on channels_last inputs from prepacked weights
    (:mod:`dualvitok.blocks.packed_conv`; oneDNN's kernels either way, within a bf16 rounding).
    ``winograd_conv``: compute float32 3x3 convolutions on large maps with NNPACK's Winograd algorithm
    (:mod:`dualvitok.blocks.winograd`; about 1e-5 relative from ``F.conv2d``, unfused from the residual addition).
    ``native_norm``: compute the blocks' ``silu(norm(x))`` with the native CPU kernel where it applies
    (:func:`dualvitok.blocks.norm_silu.norm_silu`).
    ``native_rope``: rotate the vision blocks' queries and keys with the native CPU kernel where it applies
    (:func:`dualvitok.blocks.native_rope.rotate_queries_keys`; PyTorch's values bit for bit).
    """

    fuse_conv: bool = True
    pack_linear: bool = False
    pack_float32: bool = False
    pack_conv: bool = False
    winograd_conv: bool = False
    native_norm: bool = False
    native_rope: bool = False

    @classmethod
    def from_module(cls: type[M], module: nn.Module, **kernels: bool) -> M:
        """A variant sharing ``module``'s parameters, buffers, submodules and hooks (``module`` is left as it was),
        with the kernel switches ``kernels`` (names of :data:`KERNELS`; the others take their defaults)."""
        plain = cls.__bases__[-1]  # the block this variant derives from
        if not isinstance(module, plain):
            raise TypeError(f"{cls.__name__} is built from a {plain.__name__}, got {type(module).__name__}")
        switches = _kernel_switches(kernels)
        variant = cls.__new__(cls)
        variant.__dict__.update(module.__dict__)
        for name in ("_parameters", "_buffers", "_modules"):  # own dicts: swapping children leaves module alone
            variant.__dict__[name] = dict(module.__dict__[name])
        for name, value in switches.items():
            setattr(variant, name, value)
        return variant

    def conv_add(self, conv: nn.Conv2d, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + conv(x)``, written into ``residual`` (a temporary the caller owns)."""
        if isinstance(conv, InferenceConv2d) and conv.winograd_applies(x):
            return add(residual, conv(x), inplace=True)  # NNPACK has no fused addition
        if self.fuse_conv:
            weight = conv.packed_weight(x) if isinstance(conv, InferenceConv2d) else None
            return conv2d_add(conv, x, residual, inplace=True, packed_weight=weight)
        return add(residual, conv(x), inplace=True)


class PackedCopy:
    """A layer's prepacked copy of its weight (and what goes with it), made on demand and made again when the weight
    or bias is replaced or updated in place (``.to()``, ``load_state_dict``, ``with torch.no_grad(): w.copy_(...)``:
    the parameters' identity, storage and version counters are compared). A write through ``.data`` changes none of
    them: call :meth:`invalidate` after one. The copy is not part of the state dict, nor of copies or pickles of the
    layer."""

    _packed: tuple | None = None  # (stamp, operands...)
    pack_switches: tuple[str, ...] = ()  # the kernel switches (KERNELS) that decide whether the copy is used

    def invalidate(self) -> None:
        """Drop the packed copy (it is made again on the next call)."""
        self._packed = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_packed", None)  # an opaque oneDNN tensor: neither copied nor pickled
        return state

    def _stamp(self, extra: tuple) -> tuple:
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return (*extra, *((id(t), t.data_ptr(), version_counter(t)) for t in tensors))

    def packed_copy(self, extra: tuple, make: Callable[[], tuple]) -> tuple:
        """The operands ``make()`` returned for the current weights and ``extra`` (made again when either changed)."""
        stamp = self._stamp(extra)
        if self._packed is None or self._packed[0] != stamp:
            self._packed = (stamp, *make())
        return self._packed[1:]


class InferenceLinear(PackedCopy, InferenceVariant, nn.Linear):
    """:class:`torch.nn.Linear` computing from a prepacked copy of its bf16 weight on CPU where ``pack_linear`` is
    set, or of its float32 weight where ``pack_float32`` is (:mod:`dualvitok.blocks.packed`); otherwise, and while
    autograd is on or ``torch.compile`` traces, the plain
    ``F.linear``. Its input is not overwritten.

    The packed copy is made on the first call (sized for that call's rows) and kept as :class:`PackedCopy` says.
    :meth:`packed_call` also serves callers that fold a scale into the weights and an activation into the
    GEMM (:class:`InferenceVisionMlp`).
    """

    pack_switches = ("pack_linear", "pack_float32")

    def _packed_weight(self, x: Tensor, weight_scale: float, bias_scale: float) -> tuple | None:
        """``(packed weight_scale * weight, bias_scale * bias)``, made when missing or stale; ``None`` where the
        packed path does not apply."""
        weight = self.weight
        wanted = self.pack_float32 if weight.dtype == torch.float32 else self.pack_linear
        if not (wanted and packed.usable(x, weight) and packed.can_pack(weight)) or is_tracing():
            return None

        def make() -> tuple:
            scaled = weight if weight_scale == 1 else weight * weight_scale
            bias = self.bias if self.bias is None or bias_scale == 1 else self.bias * bias_scale
            return packed.pack_weight(scaled, max(1, x.numel() // x.shape[-1])), bias

        try:
            return self.packed_copy((weight_scale, bias_scale), make)
        except RuntimeError as err:  # an unsupported build or layout: plain F.linear from now on
            self._refuse(f"prepacking a {tuple(weight.shape)} weight failed ({err})")
            return None

    def _refuse(self, why: str) -> None:
        logger.warning("%s; using F.linear", why)
        self.pack_linear, self.pack_float32, self._packed = False, False, None

    def packed_call(self, x: Tensor, weight_scale: float = 1.0, bias_scale: float = 1.0,
                    activation: str = "none") -> Tensor | None:
        """``activation(x @ (weight_scale * W)^T + bias_scale * b)`` from the packed copy (``activation`` a oneDNN
        post-op name, ``"none"`` or ``"swish"``), or ``None`` where the packed path does not apply (then nothing ran:
        the caller computes it the plain way)."""
        operands = self._packed_weight(x, weight_scale, bias_scale)
        if operands is None:
            return None
        try:
            return packed.packed_linear(x, *operands, activation=activation)
        except RuntimeError as err:
            if is_out_of_memory(err):
                raise
            self._refuse(f"the packed {tuple(self.weight.shape)} linear refused an input {tuple(x.shape)} ({err})")
            return None

    def forward(self, x: Tensor) -> Tensor:
        out = self.packed_call(x)
        return F.linear(x, self.weight, self.bias) if out is None else out


class InferenceConv2d(PackedCopy, InferenceVariant, nn.Conv2d):
    """:class:`torch.nn.Conv2d` computing from a prepacked copy of its bf16 weight on CPU where ``pack_conv`` is set
    and the input is channels_last (:mod:`dualvitok.blocks.packed_conv`; within a bf16 rounding of ``F.conv2d``);
    otherwise, and while autograd is on or ``torch.compile`` traces, the plain ``F.conv2d``.

    The copy is packed for one input shape: oneDNN picks the layout for the shape, and another shape's layout can be
    far slower than the plain weight (a 768-channel 3x3 convolution packed for 32x32 maps took 193 ms on an 8x8 map
    against 1.2 ms plain, ``benchmarks/bench_packed_conv.py``). So the first call packs for its shape, any other
    shape computes from the plain weight, and a shape called twice in a row gets its own copy on the second call
    (replacing the other; packing the released decoder took about 2 s on an Intel Xeon, mostly allocating the
    copies): a fixed-size pipeline packs once, alternating shapes do not pack again. The copy is also made again
    where :class:`PackedCopy` says. The fused convolution + addition (:meth:`InferenceVariant.conv_add`) uses it
    too.

    Where ``winograd_conv`` is set, float32 3x3 convolutions on maps of at least
    :data:`dualvitok.blocks.winograd.MIN_POSITIONS` positions compute with NNPACK's Winograd algorithm instead
    (:mod:`dualvitok.blocks.winograd`)."""

    pack_switches = ("pack_conv",)

    _last_shape: tuple | None = None  # the input shape of the previous call that could pack

    def packed_weight(self, x: Tensor) -> Tensor | None:
        """The weight packed for input ``x``'s shape ``[B, C_in, H, W]``, made on the first call, and for another
        shape on its second call in a row; ``None`` where the packed path does not apply and for shapes other than
        the packed one until they repeat."""
        if not (self.pack_conv and packed_conv.usable(x, self) and packed_conv.can_pack_conv(self)) or is_tracing():
            return None
        shape = tuple(x.shape)
        repeated, self._last_shape = self._last_shape == shape, shape
        if self._packed is not None and self._packed[0][0] != shape and not repeated:
            return None  # packed for another shape, whose layout can be far slower here: plain until this one repeats
        try:
            return self.packed_copy((shape,), lambda: (packed_conv.pack_conv_weight(self, shape),))[0]
        except RuntimeError as err:  # an unsupported build or layout: plain F.conv2d from now on
            self._refuse(f"prepacking a {tuple(self.weight.shape)} convolution weight failed ({err})")
            return None

    def _refuse(self, why: str) -> None:
        logger.warning("%s; using F.conv2d", why)
        self.pack_conv, self._packed = False, None

    def winograd_applies(self, x: Tensor) -> bool:
        """Whether this call on input ``x`` computes with the Winograd kernel (:mod:`dualvitok.blocks.winograd`)."""
        return (self.winograd_conv and winograd.usable(x, self) and winograd.can_winograd(self)
                and not is_tracing())

    def forward(self, x: Tensor) -> Tensor:
        if self.winograd_applies(x):
            try:
                return winograd.winograd_conv2d(x, self)
            except RuntimeError as err:
                if is_out_of_memory(err):
                    raise
                logger.warning("the Winograd %s convolution refused an input %s (%s); using F.conv2d",
                               tuple(self.weight.shape), tuple(x.shape), err)
                self.winograd_conv = False
        weight = self.packed_weight(x)
        if weight is not None:
            try:
                return packed_conv.packed_conv2d(x, weight, self)
            except RuntimeError as err:
                if is_out_of_memory(err):
                    raise
                self._refuse(f"the packed {tuple(self.weight.shape)} convolution refused an input {tuple(x.shape)} "
                             f"({err})")
        return super().forward(x)


class InferenceVisionMlp(InferenceVariant, VisionMlp):
    """:class:`VisionMlp` with quick-GELU folded into ``fc1``'s packed GEMM where both layers compute from packed
    weights (:class:`InferenceLinear`); otherwise the plain MLP.

    ``quick_gelu(h) = h * sigmoid(a h)`` with ``a = 1.702`` is ``swish(a h) / a``, so ``fc1`` computes from weights
    and bias scaled by ``a`` with oneDNN's ``swish`` post-op on its float32 accumulator (one bf16 rounding, no
    element-wise passes), and ``fc2`` from weights scaled by ``1 / a``. The scaled copies round once more than the
    bf16 weights (within a bf16 rounding, as any bf16 kernel change); the state dict keeps the plain weights.
    """

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if not (self.act is quick_gelu and isinstance(fc1, InferenceLinear) and isinstance(fc2, InferenceLinear)):
            return super().forward(x)
        z = fc1.packed_call(x, QUICK_GELU_ALPHA, QUICK_GELU_ALPHA, activation="swish")  # a * quick_gelu(fc1(x))
        if z is None:
            return super().forward(x)
        out = fc2.packed_call(z, 1 / QUICK_GELU_ALPHA)
        return fc2(z.div_(QUICK_GELU_ALPHA)) if out is None else out


class InferenceVisionAttention(InferenceVariant, VisionAttention):
    """:class:`VisionAttention` rotating its queries and keys with the native CPU kernel where ``native_rope`` is set
    and it applies (:func:`dualvitok.blocks.native_rope.rotate_queries_keys`: the same values as the plain block)."""

    def rotate(self, qkv: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """``[B, L, 3, H, hd] -> [B, L, 2, H, hd]``: the rotated queries and keys, as the plain block's."""
        return rotate_queries_keys(qkv, rope, native=self.native_rope)


class InferenceResnetBlock2d(InferenceVariant, ResnetBlock2d):
    """:class:`ResnetBlock2d` whose residual addition is fused into ``conv2``; **the output overwrites** ``x``.

    **Mixed precision** (the fast path's "guarded" pixel encoder): when ``conv1``/``conv2``/``norm2`` hold another
    dtype than ``norm1`` (bf16 against float32), the residual branch computes in that dtype while the residual
    stream stays float32: ``norm1`` reads the float32 ``x``, its activation is cast once to the branch dtype, and
    ``conv2``'s output is added into the float32 ``x`` (``nin_shortcut`` stays with the stream). The rounding then
    touches only the branch's contribution, never the accumulated stream.
    """

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x, zq)
        # mixed precision: the branch in its own dtype (conv1's), the stream as it is
        h = self.conv1(norm_silu(self.norm1, x, zq, self.conv1.weight.dtype, self.native_norm))
        h = self.dropout(norm_silu(self.norm2, h, zq, native=self.native_norm))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        if h.dtype != x.dtype:
            return x.add_(self.conv2(h))  # the float32 stream += the bf16 branch (promoted in the addition)
        return self.conv_add(self.conv2, h, x)  # x + conv2(h), written into x


class InferenceAttnBlock2d(InferenceVariant, AttnBlock2d):
    """:class:`AttnBlock2d` whose residual addition is fused into ``proj_out``; **the output overwrites** ``x``."""

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x, zq)
        return self.conv_add(self.proj_out, self.attend(x, zq), x)


class InferenceDCDownBlock2d(InferenceVariant, DCDownBlock2d):
    """:class:`DCDownBlock2d` adding its shortcut in place on the convolution's output."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not self.shortcut:
            return super().forward(x)
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"DCDownBlock2d needs even height and width, got {tuple(x.shape[-2:])}")
        h = space_to_channel(self.conv(x))  # [B, C_out, H/2, W/2]
        return add(h, space_to_channel_average(x, self.out_channels), inplace=True)


class InferenceDCUpBlock2d(InferenceVariant, DCUpBlock2d):
    """:class:`DCUpBlock2d` adding its nearest-upsampling shortcut in place, as a broadcast over views."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not self.shortcut or self.repeats != 4:
            return super().forward(x)
        h = F.pixel_shuffle(self.conv(x), 2)  # [B, C, 2H, 2W]
        if h.dtype != x.dtype:  # under autocast: keep the plain block's type promotion
            return h + F.interpolate(x, scale_factor=2.0, mode="nearest")
        # nearest 2x upsampling as a broadcast over [B, C, H, 2, W, 2] views of h, added in place
        h.unflatten(2, (x.shape[2], 2)).unflatten(4, (x.shape[3], 2)).add_(x[:, :, :, None, :, None])
        return h


class InferenceMoVQDecoder(InferenceVariant, MoVQDecoder):
    """:class:`MoVQDecoder` adding its repeating input stem in place."""

    def forward(self, z: Tensor, zq: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(z, zq)
        h = self.conv_in(z)
        if self.use_dc:
            h = add(h, z.repeat_interleave(self.stem_repeats, dim=1), inplace=True)  # [B, z, h, w] -> [B, C, h, w]
        h = self.mid(h, zq)
        for level in reversed(self.up):
            h = level(h, zq)
        return self.conv_out(norm_silu(self.norm_out, h, zq, native=self.native_norm))


INFERENCE_VARIANTS: dict[type[nn.Module], type[InferenceVariant]] = {
    nn.Linear: InferenceLinear,
    nn.Conv2d: InferenceConv2d,
    VisionMlp: InferenceVisionMlp,
    VisionAttention: InferenceVisionAttention,
    ResnetBlock2d: InferenceResnetBlock2d,
    AttnBlock2d: InferenceAttnBlock2d,
    DCDownBlock2d: InferenceDCDownBlock2d,
    DCUpBlock2d: InferenceDCUpBlock2d,
    MoVQDecoder: InferenceMoVQDecoder,
}
"""Plain block type (exactly) -> its inference variant."""


def swap_inference_blocks(module: nn.Module, **kernels: bool) -> nn.Module:
    """Replace, in place and bottom-up, every block of ``module`` (and ``module`` itself) whose type is a key of
    :data:`INFERENCE_VARIANTS` by its variant; returns ``module`` or its replacement.

    Args:
        module: any module tree (a MoVQ encoder/decoder, a vision tower, a tokenizer).
        kernels: the variants' kernel switches (:data:`KERNELS`; the others take their defaults):
            ``fuse_conv`` lets them use the oneDNN fused convolution (CPU; ``False`` keeps to plain operators),
            ``pack_linear`` lets the bf16 linear layers compute from prepacked weights (CPU,
            :mod:`dualvitok.blocks.packed`), ``pack_float32`` the float32 ones, ``pack_conv`` the bf16 2D
            convolutions (:mod:`dualvitok.blocks.packed_conv`), ``winograd_conv`` lets the float32 3x3
            convolutions on large maps compute with NNPACK's Winograd algorithm (:mod:`dualvitok.blocks.winograd`),
            ``native_norm`` lets the blocks compute ``silu(norm(x))`` with the native CPU kernel
            (:mod:`dualvitok.blocks.norm_silu`), ``native_rope`` lets the vision blocks rotate their queries and keys
            with the native CPU kernel (:mod:`dualvitok.blocks.native_rope`).
    """
    switches = _kernel_switches(kernels)
    for name, child in list(module.named_children()):
        new = swap_inference_blocks(child, **switches)
        if new is not child:
            setattr(module, name, new)
    variant = INFERENCE_VARIANTS.get(type(module))
    return variant.from_module(module, **switches) if variant is not None else module
