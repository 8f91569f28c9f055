"""Winograd float32 convolutions (NNPACK on CPU): the operator against a float64 convolution, the shapes it takes,
the InferenceConv2d variant's use of it, the measured choice and the plan that scopes it to a float32 pixel
decoder."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualvitok import DualViTok, inference
from dualvitok.blocks import inference as variants
from dualvitok.blocks import winograd
from dualvitok.blocks.inference import InferenceConv2d, InferenceResnetBlock2d, swap_inference_blocks
from dualvitok.blocks.resnet import ResnetBlock2d
from dualvitok.registry import _tiny

needs_nnpack = pytest.mark.skipif(not winograd.available(), reason="NNPACK's convolution does not run here")


def _conv(c_in: int = 64, c_out: int = 64, kernel: int = 3, seed: int = 0, **kwargs: object) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, **kwargs).eval().requires_grad_(False)


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _assert_close_to_exact(out: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> float:
    """``out`` is ``conv(x)`` within 1e-4 of the accumulated ``|x||w|`` (float64 reference); returns its error."""
    bias = None if conv.bias is None else conv.bias.double()
    exact = F.conv2d(x.double(), conv.weight.double(), bias, padding=conv.padding)
    mass = F.conv2d(x.double().abs(), conv.weight.double().abs(), None, padding=conv.padding)
    assert out.shape == exact.shape and out.dtype == torch.float32
    error = (out.double() - exact).abs()
    assert (error <= 1e-4 * mass + 1e-6).all()
    return error.max().item()


@needs_nnpack
@pytest.mark.parametrize("shape, padding, bias", [
    ((1, 64, 64, 64), 1, True),
    ((3, 64, 64, 72), 1, False),  # a batch: one call per image; a width that is not a multiple of the tile
    ((1, 64, 66, 66), 0, True),   # no padding: 64x64 outputs
])
def test_winograd_conv2d_is_a_float32_convolution(shape, padding, bias):
    conv = nn.Conv2d(64, 80, 3, padding=padding, bias=bias).eval()
    x = _input(shape)
    with torch.inference_mode():
        out = winograd.winograd_conv2d(x, conv)
        direct = F.conv2d(x, conv.weight, conv.bias, padding=padding)
    assert out.is_contiguous()
    _assert_close_to_exact(out, x, conv)
    _assert_close_to_exact(direct, x, conv)  # the bound is one a direct convolution keeps too
    assert not torch.equal(out, direct)  # another algorithm: other roundings


@needs_nnpack
def test_winograd_conv2d_reads_a_channels_last_input():
    conv, x = _conv(), _input((2, 64, 64, 64))
    with torch.inference_mode():
        assert torch.equal(winograd.winograd_conv2d(x.contiguous(memory_format=torch.channels_last), conv),
                           winograd.winograd_conv2d(x, conv))


@needs_nnpack
@pytest.mark.parametrize("conv, expected", [
    (nn.Conv2d(64, 64, 3, padding=1), True),
    (nn.Conv2d(64, 64, 3, padding=1, stride=2), False),
    (nn.Conv2d(64, 64, 1), False),
    (nn.Conv2d(64, 64, 3, padding=2, dilation=2), False),
    (nn.Conv2d(64, 64, 3, padding=1, groups=2), False),
    (nn.Conv2d(64, 64, 3, padding="same"), False),
    (nn.Conv2d(64, 64, 3, padding=1, padding_mode="reflect"), False),
    (nn.Conv2d(3, 64, 3, padding=1), False),   # too few input channels (measured slower)
    (nn.Conv2d(64, 3, 3, padding=1), False),   # too few output channels
    (nn.Conv2d(64, 64, 3, padding=1).to(torch.bfloat16), False),
])
def test_winograd_takes_float32_3x3_stride_1_convolutions_only(conv, expected):
    assert winograd.can_winograd(conv) is expected


def test_winograd_is_used_on_large_maps_without_autograd_only():
    conv = _conv()
    with torch.inference_mode():
        assert winograd.usable(_input((2, 64, 64, 64)), conv)
        assert not winograd.usable(_input((8, 64, 32, 32)), conv)  # positions per image, not per batch
        assert not winograd.usable(_input((1, 64, 64, 64)).bfloat16(), conv)
        assert not winograd.usable(_input((0, 64, 64, 64)), conv)  # no image: F.conv2d
    assert not winograd.usable(_input((1, 64, 64, 64)), conv)  # autograd on


def test_winograd_is_refused_where_nnpack_is_unavailable(monkeypatch):
    monkeypatch.setattr(winograd, "_available", False)
    monkeypatch.setattr(winograd, "_choices", {})
    assert not winograd.can_winograd(_conv())
    assert winograd.winograd_conv_pays(64) is False


def test_nnpack_is_not_probed_on_x86_without_avx2(monkeypatch):
    """NNPACK logs that it cannot initialise there: nothing calls it."""
    monkeypatch.setattr(winograd, "_available", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(torch, "_nnpack_available", lambda: pytest.fail("probed"))
    assert winograd.available() is False and not winograd.can_winograd(_conv())


@needs_nnpack
def test_a_process_forked_after_nnpack_ran_does_not_use_it(forked_child):
    """NNPACK's thread pool does not survive a fork: the child computes with F.conv2d."""
    conv, x = _conv(), _input((1, 64, 64, 64))
    with torch.inference_mode():
        winograd.winograd_conv2d(x, conv)  # the pool exists in this process now
        assert winograd.usable(x, conv)
    fast = swap_inference_blocks(copy.deepcopy(conv), winograd_conv=True)
    assert forked_child(lambda: not winograd.usable(x, conv) and torch.equal(fast(x), F.conv2d(
        x, conv.weight, conv.bias, padding=1)))


@needs_nnpack
def test_inference_conv2d_uses_winograd_on_large_maps_only(monkeypatch):
    conv = _conv()
    fast = swap_inference_blocks(copy.deepcopy(conv), winograd_conv=True)
    assert isinstance(fast, InferenceConv2d) and set(fast.state_dict()) == set(conv.state_dict())
    calls = []
    real = winograd.winograd_conv2d
    monkeypatch.setattr(winograd, "winograd_conv2d", lambda *a: calls.append(1) or real(*a))
    large, small = _input((1, 64, 64, 64)), _input((1, 64, 16, 16))
    with torch.inference_mode():
        _assert_close_to_exact(fast(large), large, conv)
        assert len(calls) == 1
        assert torch.equal(fast(small), conv(small)) and len(calls) == 1  # small map: F.conv2d
        fast.winograd_conv = False
        assert torch.equal(fast(large), conv(large)) and len(calls) == 1  # switched off
    fast.winograd_conv = True
    assert torch.equal(fast(large), conv(large)) and len(calls) == 1  # autograd on: the plain block


@needs_nnpack
def test_inference_conv2d_falls_back_when_nnpack_refuses(monkeypatch, caplog):
    fast = swap_inference_blocks(_conv(), winograd_conv=True)

    def refuse(*args):
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    monkeypatch.setattr(winograd, "winograd_conv2d", refuse)
    x = _input((1, 64, 64, 64))
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        out = fast(x)
    assert torch.equal(out, F.conv2d(x, fast.weight, fast.bias, padding=1))
    assert "refused an input" in caplog.text and fast.winograd_conv is False


@needs_nnpack
def test_resnet_block_adds_its_residual_after_a_winograd_convolution(monkeypatch):
    """The fused convolution + addition has no NNPACK form: a Winograd ``conv2`` is computed, then added."""
    torch.manual_seed(0)
    block = ResnetBlock2d(64, 64).eval()
    fast = swap_inference_blocks(copy.deepcopy(block), winograd_conv=True)
    assert isinstance(fast, InferenceResnetBlock2d)
    x = _input((1, 64, 64, 64))
    with torch.inference_mode():
        expected = block(x)
        plain = swap_inference_blocks(copy.deepcopy(block))(x.clone())
        calls = []
        real = winograd.winograd_conv2d
        monkeypatch.setattr(winograd, "winograd_conv2d", lambda *a: calls.append(1) or real(*a))
        monkeypatch.setattr(variants, "conv2d_add", lambda *a, **k: pytest.fail("fused with a Winograd conv2"))
        out = fast(x.clone())
    assert torch.equal(plain, expected)
    assert len(calls) == 2  # conv1 and conv2
    assert (out - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


@needs_nnpack
def test_winograd_is_a_measured_choice_cached_per_process(monkeypatch, slowed):
    monkeypatch.setattr(winograd, "_choices", {})
    real = winograd.winograd_conv2d
    calls = slowed(winograd, "winograd_conv2d", 0.05)  # far slower than a 64-channel convolution at 16x16
    assert winograd.winograd_conv_pays(64, size=16) is False
    n = len(calls)
    assert n >= 4  # warm-up + 3 rounds
    assert winograd.winograd_conv_pays(64, size=16) is False and len(calls) == n  # cached
    monkeypatch.setattr(winograd, "winograd_conv2d", real)
    assert winograd.winograd_conv_pays(96, size=16, min_speedup=0.01) is True  # another key


@pytest.fixture(scope="module")
def model64() -> DualViTok:
    """A tiny DualViTok whose pixel decoder is 64 channels wide (wide enough for the Winograd kernel)."""
    torch.manual_seed(0)
    return DualViTok(_tiny(ch=64)).eval()


@needs_nnpack
@pytest.mark.parametrize("measured", [True, False])
def test_plan_uses_winograd_in_a_float32_pixel_decoder_only(model64, monkeypatch, caplog, cpu_like, measured):
    """Measured once at the decoder's base width unless told; only the pixel decoder branch's convolutions follow
    it, and that branch stays NCHW; a bf16 decoder never asks."""
    asked = []
    cpu_like("none")
    monkeypatch.setattr(winograd, "winograd_conv_pays",
                        lambda channels, channels_last: asked.append((channels, channels_last)) or measured)
    with caplog.at_level(logging.INFO, logger="dualvitok.inference"):
        fast = copy.deepcopy(model64).optimize_for_inference(device="cpu")
    assert f"Winograd convolutions {'on' if measured else 'off'}" in caplog.text
    assert asked == [(model64.config.pixel_decoder.ch, True)] and fast.inference_plan.winograd_conv is measured
    inside = {id(m) for m in fast.pixel_decoder_branch.modules()}
    convs = [m for m in fast.modules() if isinstance(m, InferenceConv2d)]
    assert any(id(m) not in inside for m in convs)
    assert all(m.winograd_conv is (measured and id(m) in inside) for m in convs)
    decoder_convs = [m for m in convs if id(m) in inside and m.kernel_size == (3, 3) and m.in_channels > 3]
    encoder_convs = [m for m in fast.pixel_encoder.modules() if isinstance(m, InferenceConv2d) and m.in_channels > 3]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) is not measured for m in decoder_convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in encoder_convs)
    told = copy.deepcopy(model64).optimize_for_inference(device="cpu", winograd_conv=False)
    assert not told.inference_plan.winograd_conv and len(asked) == 1  # told: not measured
    nchw = copy.deepcopy(model64).optimize_for_inference(device="cpu", channels_last=False)
    assert asked[1:] == [(model64.config.pixel_decoder.ch, False)]  # measured against NCHW direct convolutions
    assert nchw.inference_plan.winograd_conv is measured
    cpu_like("amx")
    bf16 = copy.deepcopy(model64).optimize_for_inference(device="cpu")
    assert bf16.inference_plan.stage_dtypes["pixel decoder"] == "bfloat16"
    assert not bf16.inference_plan.winograd_conv and len(asked) == 2  # a bf16 decoder: nothing to ask
    with caplog.at_level(logging.WARNING, logger="dualvitok.inference"):
        inference.use_kernels(bf16, winograd_conv=True)
    assert "not float32" in caplog.text and not bf16.inference_plan.winograd_conv
    assert not any(m.winograd_conv for m in bf16.modules() if isinstance(m, InferenceConv2d))
    inference.use_kernels(fast, winograd_conv=True)
    assert fast.inference_plan.winograd_conv and all(m.winograd_conv is (id(m) in inside) for m in convs)


def test_plan_does_not_time_winograd_for_narrow_decoders(tiny_model, monkeypatch, cpu_like):
    """The tiny model's full-resolution decoder levels are 32 channels wide, under MIN_CHANNELS: nothing is timed."""
    cpu_like("none")
    monkeypatch.setattr(winograd, "_choices", {})
    monkeypatch.setattr(winograd, "measure_choice", lambda *a, **k: pytest.fail("timed"))
    fast = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu")
    assert not fast.inference_plan.winograd_conv


@needs_nnpack
def test_winograd_decoder_keeps_the_tokens_and_the_images(model64, cpu_like):
    """End to end: winograd_conv on and off give the same tokens and images within 1e-4 of each other."""
    cpu_like("none")
    on = copy.deepcopy(model64).optimize_for_inference(device="cpu", winograd_conv=True)
    off = copy.deepcopy(model64).optimize_for_inference(device="cpu", winograd_conv=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        a, b = on.encode(x), off.encode(x)
        assert torch.equal(a.pixel_indices, b.pixel_indices) and torch.equal(a.semantic_indices, b.semantic_indices)
        images_on = on.decode(a.semantic_codes, a.pixel_codes)
        images_off = off.decode(b.semantic_codes, b.pixel_codes)
        plain = model64.decode(a.semantic_codes, a.pixel_codes)
    assert not torch.equal(images_on, images_off)  # the Winograd kernel ran
    assert (images_on - images_off).abs().max().item() < 1e-4
    assert (images_off - plain).abs().max().item() < 1e-4
