"""Fused inference kernels (conv + residual in one oneDNN call, in-place epilogues) and the blocks' variants."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from torch import nn

from dualvitok.blocks import (
    AttnBlock2d,
    DCDownBlock2d,
    DCUpBlock2d,
    MoVQDecoder,
    MoVQEncoder,
    ResnetBlock2d,
    SpatialNorm,
    fused,
)
from dualvitok.blocks.inference import INFERENCE_VARIANTS, InferenceVariant, swap_inference_blocks
from dualvitok.inference import optimize_for_inference


def _cl(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("x_cl,r_cl,kernel,stride,inplace", list(itertools.product((0, 1), (0, 1), (1, 3), (1, 2),
                                                                                     (0, 1))))
def test_conv2d_add_float32_equals_separate_ops(x_cl, r_cl, kernel, stride, inplace):
    conv = nn.Conv2d(8, 12, kernel, stride=stride, padding=kernel // 2)
    conv.weight.data = _cl(conv.weight.data, x_cl)
    x = _cl(torch.randn(2, 8, 9, 7), x_cl)
    with torch.inference_mode():
        residual = _cl(torch.randn_like(conv(x)), r_cl)
        expected = residual + conv(x)
        given = residual.clone()
        out = fused.conv2d_add(conv, x, given, inplace=bool(inplace))
    assert torch.equal(out, expected)  # the float32 accumulator is the conv output: bit-identical
    assert (out.data_ptr() == given.data_ptr()) == bool(inplace)


def test_conv2d_add_bf16_rounds_once():
    """In bf16 the fused sum is closer to the float32 result than bf16 conv followed by a bf16 add."""
    conv32 = nn.Conv2d(64, 64, 3, padding=1)
    x32, r32 = torch.randn(1, 64, 32, 32), torch.randn(1, 64, 32, 32)
    conv16 = copy.deepcopy(conv32).to(torch.bfloat16)
    x16, r16 = _cl(x32.bfloat16(), True), _cl(r32.bfloat16(), True)
    conv16.weight.data = _cl(conv16.weight.data, True)
    with torch.inference_mode():
        exact = r16.float() + nn.functional.conv2d(x16.float(), conv16.weight.float(), conv16.bias.float(), padding=1)
        separate = (r16 + conv16(x16)).float()
        fused_out = fused.conv2d_add(conv16, x16, r16).float()
    if fused._kind(x16, r16, False) in fused._refused and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("oneDNN's fused bf16 convolution needs AVX-512 (or AVX-NE-CONVERT); this CPU has neither")
    assert fused_out.dtype == torch.float32 and not fused._refused
    assert (fused_out - exact).abs().mean() < (separate - exact).abs().mean()
    assert torch.allclose(fused_out, exact, atol=0.05, rtol=0.01)


def test_conv2d_add_keeps_autograd():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x, residual = torch.randn(1, 4, 6, 6, requires_grad=True), torch.randn(1, 4, 6, 6, requires_grad=True)
    out = fused.conv2d_add(conv, x, residual, inplace=True)  # autograd on: plain, out of place
    out.sum().backward()
    assert out.data_ptr() != residual.data_ptr()
    assert torch.equal(residual.grad, torch.ones_like(residual))
    assert x.grad is not None and conv.weight.grad is not None


def test_conv2d_add_falls_back_when_onednn_refuses(monkeypatch, caplog):
    calls = []

    def refuse(inplace):
        def op(*args):
            calls.append(inplace)
            raise RuntimeError("not supported in this build")
        return op

    monkeypatch.setattr(fused, "_mkldnn_op", refuse)
    monkeypatch.setattr(fused, "_refused", set())
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x, residual = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="dualvitok.blocks.fused"):
        out = fused.conv2d_add(conv, x, residual.clone())
        again = fused.conv2d_add(conv, x, residual.clone())  # this kind is remembered: no second attempt
        inplace = fused.conv2d_add(conv, x, residual.clone(), inplace=True)  # another kind is still tried
        expected = residual + conv(x)
    assert torch.equal(out, expected) and torch.equal(again, expected) and torch.equal(inplace, expected)
    assert calls == [False, True]
    assert sum("unavailable" in r.message for r in caplog.records) == 2


def test_conv2d_add_out_of_memory_is_not_swallowed(monkeypatch):
    def oom(inplace):
        def op(*args):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")
        return op

    monkeypatch.setattr(fused, "_mkldnn_op", oom)
    monkeypatch.setattr(fused, "_refused", set())
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not enough memory"):
        fused.conv2d_add(conv, torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))
    assert not fused._refused


def _forbid_onednn(monkeypatch):
    def forbidden(inplace):
        raise AssertionError("the fused operator must not be used here")

    monkeypatch.setattr(fused, "_mkldnn_op", forbidden)


def test_conv2d_add_plain_where_fusion_does_not_apply(monkeypatch):
    _forbid_onednn(monkeypatch)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        expected = torch.randn(1, 4, 6, 6) + conv(x)  # broadcast residual: plain addition, result [2, 4, 6, 6]
        broadcast = fused.conv2d_add(conv, x, (expected - conv(x))[:1].expand(2, -1, -1, -1))
        torch.testing.assert_close(broadcast, expected)
        with torch.backends.mkldnn.flags(enabled=False):  # oneDNN switched off by the user
            residual = torch.randn(2, 4, 6, 6)
            assert torch.equal(fused.conv2d_add(conv, x, residual.clone()), residual + conv(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: bf16 conv, float32 residual keeps float32
            residual = torch.randn(2, 4, 6, 6)
            out = fused.conv2d_add(conv, x, residual.clone(), inplace=True)
            assert out.dtype == (residual + conv(x)).dtype == torch.float32


def _fused_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool, fuse_conv: bool = True) -> nn.Module:
    """A copy of ``module`` with the inference variants swapped in (as optimize_for_inference does)."""
    fast = swap_inference_blocks(copy.deepcopy(module).to(dtype), fuse_conv=fuse_conv)
    for m in fast.modules():
        if channels_last and isinstance(m, nn.Conv2d):
            m.weight.data = _cl(m.weight.data, True)
    return fast


def _randomize_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)


BLOCKS = {
    "resnet_spatial": (lambda: ResnetBlock2d(64, 64, zq_channels=8), (1, 64, 16, 16), True),
    "resnet_shortcut": (lambda: ResnetBlock2d(32, 64, zq_channels=8), (1, 32, 16, 16), True),
    "resnet_plain": (lambda: ResnetBlock2d(64, 64), (2, 64, 8, 8), False),
    "attention_spatial": (lambda: AttnBlock2d(64, zq_channels=8), (1, 64, 8, 8), True),
    "dc_up": (lambda: DCUpBlock2d(64), (1, 64, 8, 8), False),
    "dc_up_repeat": (lambda: DCUpBlock2d(64, 32), (1, 64, 8, 8), False),
    "dc_down": (lambda: DCDownBlock2d(64), (1, 64, 8, 8), False),
}


def _plain_and_fused(name: str, channels_last: bool):
    """A block of ``BLOCKS`` (random norms), its fused float32 copy, an input and the extra arguments (``zq``)."""
    make, shape, conditioned = BLOCKS[name]
    block = make().eval()
    _randomize_norms(block)
    fast = _fused_copy(block, torch.float32, channels_last)
    x, zq = torch.randn(shape), torch.randn(shape[0], 8, 4, 4)
    return block, fast, x, ((zq,) if conditioned else ())


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_blocks_match_plain_blocks_in_float32(name, channels_last):
    block, fast, x, args = _plain_and_fused(name, channels_last)
    with torch.inference_mode():
        expected = block(x, *args)
        given = _cl(x.clone(), channels_last)
        out = fast(given, *args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_fused_blocks_under_autocast_keep_the_plain_dtypes(name):
    """A fused float32 block run under bf16 autocast returns what the plain block returns (dtype and values)."""
    block, fast, x, args = _plain_and_fused(name, True)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(x, *args)
        out = fast(_cl(x.clone(), True), *args)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.05)


def test_fused_blocks_are_plain_when_autograd_is_on():
    block = ResnetBlock2d(32, 32, zq_channels=8)
    fast = _fused_copy(block, torch.float32, False)
    x, zq = torch.randn(1, 32, 8, 8, requires_grad=True), torch.randn(1, 8, 4, 4)
    x_before = x.detach().clone()
    out = fast(x, zq)
    out.square().sum().backward()
    assert torch.equal(x.detach(), x_before)  # the input is left alone while training
    assert torch.equal(out, block(x, zq))
    assert all(p.grad is not None for p in fast.parameters())


def test_fused_movq_encoder_decoder_bf16_close_to_float32():
    torch.manual_seed(0)
    kwargs = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(1,), z_channels=8)
    encoder, decoder = MoVQEncoder(**kwargs).eval(), MoVQDecoder(**kwargs, zq_channels=8).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        z32 = encoder(x)
        y32 = decoder(z32, z32)
        fast_decoder = _fused_copy(decoder, torch.bfloat16, True)
        z16 = _cl(z32.bfloat16(), True)
        y16 = fast_decoder(z16.clone(), z16)
        fast_encoder = _fused_copy(encoder, torch.float32, True)
        z_fused = fast_encoder(_cl(x, True))
    torch.testing.assert_close(z_fused, z32, rtol=1e-5, atol=1e-5)
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 0.02, rel


def test_optimize_for_inference_swaps_the_inference_variants_in(tiny_model):
    fast = optimize_for_inference(copy.deepcopy(tiny_model))
    swapped = [m for m in fast.modules() if isinstance(m, InferenceVariant)]
    plain_kinds = {type(m) for m in tiny_model.modules()} & set(INFERENCE_VARIANTS)
    assert len(swapped) == sum(type(m) in INFERENCE_VARIANTS for m in tiny_model.modules())
    assert {type(m) for m in swapped} == {INFERENCE_VARIANTS[k] for k in plain_kinds}
    assert not any(type(m) in INFERENCE_VARIANTS for m in fast.modules())  # every plain block was replaced
    assert not any(isinstance(m, InferenceVariant) for m in tiny_model.modules())  # the original is untouched
    assert list(fast.state_dict()) == list(tiny_model.state_dict())  # same keys, same order


@pytest.mark.parametrize("name", list(BLOCKS))
def test_variant_shares_parameters_and_keys(name):
    block = BLOCKS[name][0]()
    fast = swap_inference_blocks(block)
    assert isinstance(fast, InferenceVariant) and isinstance(fast, type(block))
    plain, shared = block.state_dict(), fast.state_dict()
    assert list(plain) == list(shared)
    assert all(plain[k].data_ptr() == shared[k].data_ptr() for k in plain)  # the same tensors, not copies
    with pytest.raises(TypeError, match="is built from"):
        type(fast).from_module(nn.Conv2d(1, 1, 1))


def _public_blocks():
    zq = torch.randn(1, 8, 4, 4)
    return {
        "resnet": (ResnetBlock2d(32, 32, zq_channels=8), (torch.randn(1, 32, 8, 8), zq)),
        "resnet_shortcut": (ResnetBlock2d(32, 64), (torch.randn(1, 32, 8, 8),)),
        "attention": (AttnBlock2d(32, zq_channels=8), (torch.randn(1, 32, 8, 8), zq)),
        "spatial_norm": (SpatialNorm(32, 8), (torch.randn(1, 32, 8, 8), zq)),
        "dc_down": (DCDownBlock2d(32), (torch.randn(1, 32, 8, 8),)),
        "dc_up": (DCUpBlock2d(32), (torch.randn(1, 32, 4, 4),)),
        "decoder": (MoVQDecoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(1,), z_channels=8,
                                zq_channels=8), (torch.randn(1, 8, 4, 4), zq)),
    }


@pytest.mark.parametrize("name", ["resnet", "resnet_shortcut", "attention", "spatial_norm", "dc_down", "dc_up",
                                  "decoder"])
def test_public_blocks_never_overwrite_their_inputs(name):
    """A public block means one thing: in inference mode too, its inputs are left as they were."""
    block, inputs = _public_blocks()[name]
    block.eval()
    before = [t.clone() for t in inputs]
    with torch.inference_mode():
        block(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before, strict=True))
    assert not any(hasattr(m, "fused_inference") for m in block.modules())  # no fast-path flag in public blocks


def test_cuda_plan_variants_never_call_onednn(monkeypatch):
    """fuse_conv=False (every non-CPU plan): plain operators only, same float32 results."""
    _forbid_onednn(monkeypatch)
    for name in BLOCKS:
        block, _, x, args = _plain_and_fused(name, True)
        fast = _fused_copy(block, torch.float32, True, fuse_conv=False)
        with torch.inference_mode():
            torch.testing.assert_close(fast(_cl(x.clone(), True), *args), block(x, *args), rtol=1e-5, atol=1e-5)


def test_fusion_is_a_measured_choice_cached_per_process(monkeypatch):
    """fused_conv_add_pays times the oneDNN operator against the separate ones: a slower fused operator is refused,
    and the choice is measured once per (dtype, channels)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this build")
    import time

    monkeypatch.setattr(fused, "_fusion_choices", {})
    original = fused._mkldnn_op
    calls = []

    def slow_op(inplace):
        def op(*args):
            calls.append(1)
            time.sleep(0.02)  # far slower than a 16-channel 96x96 convolution + addition
            return original(inplace)(*args)
        return op

    monkeypatch.setattr(fused, "_mkldnn_op", slow_op)
    assert fused.fused_conv_add_pays(16, torch.float32) is False
    n = len(calls)
    assert n >= 6  # warm-up + 5 rounds
    assert fused.fused_conv_add_pays(16, torch.float32) is False and len(calls) == n  # cached: not measured again
    monkeypatch.setattr(fused, "_mkldnn_op", original)
    assert fused.fused_conv_add_pays(24, torch.float32, tolerance=10.0) is True  # another key: measured, kept


def test_an_operator_refused_during_its_measurement_is_not_chosen(monkeypatch, caplog):
    """Where oneDNN refuses the fused operator while it is being timed, both timed runs were the plain operators:
    the choice is the separate operators, and the log says so (not the timing's winner)."""
    monkeypatch.setattr(fused, "_fusion_choices", {})
    monkeypatch.setattr(fused, "_refused", set())

    def refusing(inplace):
        def op(*args):
            raise RuntimeError("could not create a primitive")
        return op

    monkeypatch.setattr(fused, "_mkldnn_op", refusing)
    monkeypatch.setattr(fused, "_can_fuse", lambda *args: not fused._refused)
    with caplog.at_level(logging.INFO, logger="dualvitok.blocks.fused"):
        assert fused.fused_conv_add_pays(16, torch.float32, tolerance=10.0) is False
    assert "refused by oneDNN during its measurement; separate operators" in caplog.text
