"""Prepacked convolution weights (oneDNN on CPU): the operators against F.conv2d, the InferenceConv2d variant and the
fused convolution + addition on a packed weight, the measured choice and the plan that scopes it to the pixel
decoder."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualvitok import inference
from dualvitok.blocks import fused, packed_conv
from dualvitok.blocks import inference as variants
from dualvitok.blocks.inference import InferenceConv2d, InferenceResnetBlock2d, swap_inference_blocks
from dualvitok.blocks.resnet import ResnetBlock2d

PACKS = packed_conv.can_pack_conv(nn.Conv2d(1, 1, 1).to(torch.bfloat16))
needs_onednn = pytest.mark.skipif(not PACKS, reason="oneDNN's convolution packing operators do not run here")


def _conv(c_in: int, c_out: int, kernel: int = 3, seed: int = 0, dtype=torch.bfloat16, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, **kwargs)
    return conv.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def _input(shape, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)


def _assert_bf16_conv(out: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> None:
    """``out`` is ``conv(x)`` within bf16 rounding of float32 math: half an ulp of the output plus a few ulps of the
    accumulated |x||w|."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    bias = None if conv.bias is None else conv.bias.float()
    exact = F.conv2d(x.float(), conv.weight.float(), bias, *args)
    mass = F.conv2d(x.float().abs(), conv.weight.float().abs(), None if bias is None else bias.abs(), *args)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert ((out.float() - exact).abs() <= 2**-8 * exact.abs() + 2**-12 * mass + 1e-6).all()


@needs_onednn
@pytest.mark.parametrize("kernel, kwargs, packed_for, run", [
    (3, {}, (1, 48, 8, 8), (1, 48, 8, 8)),
    (1, {}, (1, 48, 8, 8), (2, 48, 5, 7)),  # packed for one shape, run on another
    (3, {"stride": 2}, (1, 48, 8, 8), (1, 48, 8, 8)),
    (3, {"groups": 2, "bias": False}, (1, 48, 6, 6), (1, 48, 6, 6)),
])
def test_packed_conv2d_is_f_conv2d_in_bf16(kernel, kwargs, packed_for, run):
    conv = _conv(48, 64, kernel, **kwargs)
    x = _input(run)
    with torch.inference_mode():
        out = packed_conv.packed_conv2d(x, packed_conv.pack_conv_weight(conv, packed_for), conv)
        plain = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_bf16_conv(out, x, conv)
    _assert_bf16_conv(plain, x, conv)  # the bound is one F.conv2d keeps too


@needs_onednn
def test_inference_conv2d_uses_the_packed_copy_and_follows_the_weight(monkeypatch):
    conv = _conv(32, 48)
    fast = swap_inference_blocks(copy.deepcopy(conv), pack_conv=True)
    assert isinstance(fast, InferenceConv2d) and set(fast.state_dict()) == set(conv.state_dict())
    calls = []
    real = packed_conv.packed_conv2d
    monkeypatch.setattr(packed_conv, "packed_conv2d", lambda *a: calls.append(1) or real(*a))
    x = _input((1, 32, 8, 8))
    with torch.inference_mode():
        out = fast(x)  # the first call packs for its shape
        assert calls and fast._packed is not None
        _assert_bf16_conv(out, x, conv)
        first = fast._packed[1]
        fast(x)
        assert fast._packed[1] is first  # packed once
    other = _conv(32, 48, seed=5)
    fast.load_state_dict(other.state_dict())  # new values in the same storage: packed again on the next call
    with torch.inference_mode():
        out = fast(x)
    assert fast._packed[1] is not first
    _assert_bf16_conv(out, x, other)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(fast)))  # the opaque copy is neither copied nor pickled
    assert clone._packed is None
    with torch.inference_mode():
        assert torch.equal(clone(x), fast(x))


@needs_onednn
def test_inference_conv2d_uses_its_packed_copy_for_one_shape_only(monkeypatch):
    """The first call packs for its shape, and that copy serves that shape only (another shape's oneDNN layout can be
    far slower): other shapes compute from the plain weight until one repeats, which then gets its own copy;
    alternating shapes never pack again."""
    conv = swap_inference_blocks(_conv(16, 24), pack_conv=True)
    packs = []
    real = packed_conv.pack_conv_weight
    monkeypatch.setattr(packed_conv, "pack_conv_weight", lambda c, shape: packs.append(shape) or real(c, shape))
    computed, compute = [], packed_conv.packed_conv2d
    monkeypatch.setattr(packed_conv, "packed_conv2d",
                        lambda x, w, c: computed.append(tuple(x.shape)) or compute(x, w, c))
    small, large = _input((1, 16, 4, 4)), _input((1, 16, 8, 8), seed=2)
    with torch.inference_mode():
        conv(small)
        assert packs == [(1, 16, 4, 4)]
        copy_small = conv._packed[1]
        for x in (large, small, large, small, small):  # alternating: the 4x4 copy stays, 8x8 computes plain
            out = conv(x)
            assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, padding=1)) or x is small
            _assert_bf16_conv(out, x, conv)
        assert packs == [(1, 16, 4, 4)] and conv._packed[1] is copy_small
        assert computed == [(1, 16, 4, 4)] * 4  # the packed copy computed the 4x4 calls only
        conv(large), conv(large)  # 8x8 twice in a row: packed for it
        assert packs == [(1, 16, 4, 4), (1, 16, 8, 8)]
        _assert_bf16_conv(conv(large), large, conv)


@needs_onednn
def test_inference_conv2d_is_plain_where_packing_does_not_apply(monkeypatch):
    """Off, autograd on, float32, a contiguous input, or a map above MAX_PACKED_POSITIONS: the plain operator."""
    monkeypatch.setattr(packed_conv, "packed_conv2d", lambda *a: pytest.fail("the packed path ran"))
    x = _input((1, 16, 8, 8))
    with torch.inference_mode():
        off = swap_inference_blocks(_conv(16, 16), pack_conv=False)
        assert torch.equal(off(x), F.conv2d(x, off.weight, off.bias, padding=1))
        fp32 = swap_inference_blocks(_conv(16, 16, dtype=torch.float32), pack_conv=True)
        assert torch.equal(fp32(x.float()), F.conv2d(x.float(), fp32.weight, fp32.bias, padding=1))
        on = swap_inference_blocks(_conv(16, 16), pack_conv=True)
        contiguous = x.contiguous()
        assert torch.equal(on(contiguous), F.conv2d(contiguous, on.weight, on.bias, padding=1))
        side = int(packed_conv.MAX_PACKED_POSITIONS**0.5) + 1
        large = _input((1, 16, side, side))
        assert torch.equal(on(large), F.conv2d(large, on.weight, on.bias, padding=1))
        assert on._packed is None
    grad = swap_inference_blocks(_conv(16, 16), pack_conv=True).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    grad(xg).sum().backward()  # autograd on: the plain operator, with gradients
    assert xg.grad is not None and grad.weight.grad is not None


@needs_onednn
@pytest.mark.parametrize("operator, message", [("pack_conv_weight", "prepacking a (24, 16, 3, 3) convolution"),
                                               ("packed_conv2d", "refused an input (1, 16, 4, 4)")])
def test_inference_conv2d_falls_back_when_onednn_refuses(monkeypatch, caplog, operator, message):
    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for this layout")

    monkeypatch.setattr(packed_conv, operator, refuse)
    fast = swap_inference_blocks(_conv(16, 24), pack_conv=True)
    x = _input((1, 16, 4, 4))
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        assert torch.equal(fast(x), F.conv2d(x, fast.weight, fast.bias, padding=1))
    assert message in caplog.text and not fast.pack_conv and fast._packed is None


@needs_onednn
def test_fused_convolution_and_addition_compute_from_the_packed_weight(monkeypatch):
    """A ResNet block's conv2 + residual (the oneDNN binary post-op) takes conv2's packed weight; the block's
    output stays within bf16 roundings of the plain block's."""
    torch.manual_seed(0)
    block = ResnetBlock2d(32, 32).to(dtype=torch.bfloat16, memory_format=torch.channels_last).eval()
    fast = swap_inference_blocks(copy.deepcopy(block), pack_conv=True)
    assert isinstance(fast, InferenceResnetBlock2d) and isinstance(fast.conv2, InferenceConv2d)
    weights = []
    real = variants.conv2d_add
    monkeypatch.setattr(variants, "conv2d_add", lambda *a, packed_weight=None, **k: weights.append(packed_weight)
                        or real(*a, packed_weight=packed_weight, **k))
    x = _input((1, 32, 8, 8))
    with torch.inference_mode():
        out, plain = fast(x.clone()), block(x.clone())
    assert len(weights) == 1 and weights[0] is fast.conv2._packed[1]
    assert ((out.float() - plain.float()).abs() <= 2**-6 * plain.float().abs() + 2**-6).all()
    with torch.inference_mode():  # the fused operator on a packed weight against the same on the plain one
        h, residual = _input((1, 32, 8, 8), seed=2), _input((1, 32, 8, 8), seed=3)
        a = fused.conv2d_add(block.conv2, h, residual.clone())
        b = fused.conv2d_add(block.conv2, h, residual.clone(),
                             packed_weight=packed_conv.pack_conv_weight(block.conv2, h.shape))
    assert ((a.float() - b.float()).abs() <= 2**-7 * a.float().abs() + 1e-6).all()


@needs_onednn
def test_packing_convolutions_is_a_measured_choice_cached_per_process(monkeypatch, slowed):
    monkeypatch.setattr(packed_conv, "_choices", {})
    real = packed_conv.packed_conv2d
    calls = slowed(packed_conv, "packed_conv2d", 0.02)  # far slower than a 32-channel convolution at 8x8
    assert packed_conv.packed_conv_pays(32, torch.bfloat16, size=8) is False
    n = len(calls)
    assert n >= 6  # warm-up + 5 rounds
    assert packed_conv.packed_conv_pays(32, torch.bfloat16, size=8) is False and len(calls) == n  # cached
    monkeypatch.setattr(packed_conv, "packed_conv2d", real)
    assert packed_conv.packed_conv_pays(48, torch.bfloat16, size=8, tolerance=10.0) is True  # another key


def test_packing_convolutions_is_refused_where_onednn_is_off(monkeypatch):
    monkeypatch.setattr(packed_conv, "_choices", {})
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not packed_conv.can_pack_conv(_conv(8, 8))
    assert packed_conv.packed_conv_pays(32, torch.bfloat16, size=8) is False
    assert not packed_conv.can_pack_conv(_conv(8, 8, dtype=torch.float32))  # nor float32, ever
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    assert not packed_conv.can_pack_conv(_conv(8, 8, dtype=torch.float32))


@pytest.mark.parametrize("measured", [True, False])
def test_plan_packs_only_the_pixel_decoders_convolutions(tiny_model, monkeypatch, caplog, measured, cpu_like):
    """Measured once at the decoder's widest level unless told; only the pixel decoder branch's convolutions follow
    the choice (the encoders', which decide the indices, never pack); use_kernels switches it and frees the
    copies."""
    asked = []
    cpu_like("amx")
    monkeypatch.setattr(packed_conv, "can_pack_conv", lambda conv: conv.weight.dtype == torch.bfloat16)
    monkeypatch.setattr(packed_conv, "packed_conv_pays",
                        lambda channels, dtype: asked.append((channels, dtype)) or measured)
    with caplog.at_level(logging.INFO, logger="dualvitok.inference"):
        fast = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu")
    assert f"prepacked convolution weights {'on' if measured else 'off'}" in caplog.text
    decoder = tiny_model.config.pixel_decoder
    assert asked == [(decoder.ch * max(decoder.ch_mult), torch.bfloat16)]
    assert fast.inference_plan.pack_conv is measured
    inside = {id(m) for m in fast.pixel_decoder_branch.modules()}
    convs = [m for m in fast.modules() if isinstance(m, InferenceConv2d)]
    assert any(id(m) not in inside for m in convs)  # the pixel encoder's are variants too
    assert all(m.pack_conv is (measured and id(m) in inside) for m in convs)
    told = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", pack_conv=False)
    assert not told.inference_plan.pack_conv and len(asked) == 1  # told: not measured
    plain32 = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", dtype=None)
    assert not plain32.inference_plan.pack_conv and len(asked) == 1  # a float32 decoder: nothing to pack
    layout = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", channels_last=False)
    assert not layout.inference_plan.pack_conv and len(asked) == 1  # contiguous inputs never pack


@needs_onednn
def test_packed_decoder_keeps_the_tokens_and_the_images(tiny_model, cpu_like):
    """End to end on the tiny model: pack_conv on and off give the same tokens, images within bf16 roundings of
    each other, and use_kernels(pack_conv=False) frees the decoder's copies."""
    cpu_like("amx")
    on = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", pack_conv=True)
    off = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", pack_conv=False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        a, b = on.encode(x), off.encode(x)
        assert torch.equal(a.pixel_indices, b.pixel_indices) and torch.equal(a.semantic_indices, b.semantic_indices)
        images_on = on.decode(a.semantic_codes, a.pixel_codes)
        images_off = off.decode(b.semantic_codes, b.pixel_codes)
    convs = [m for m in on.pixel_decoder_branch.modules() if isinstance(m, InferenceConv2d)]
    assert any(m._packed is not None for m in convs)
    assert (images_on - images_off).abs().max().item() < 0.05
    inference.use_kernels(on, pack_conv=False)
    assert not on.inference_plan.pack_conv and all(not m.pack_conv and m._packed is None for m in convs)
