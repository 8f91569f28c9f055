"""The native GroupNorm + modulation + SiLU kernel (dualvitok/_native/norm_silu.c) against float64 PyTorch, its
fallbacks, and its use by the fast path's decoder."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
import torch.nn.functional as F

from dualvitok.blocks import SpatialNorm, norm_silu
from dualvitok.blocks.inference import InferenceVariant

needs_native = pytest.mark.skipif(not norm_silu.native_available(),
                                  reason="the native kernel is unavailable here (no C compiler, or it failed to build)")


@pytest.fixture
def any_size(monkeypatch):
    """Let the kernel serve maps of any size (the tests' maps are small)."""
    monkeypatch.setattr(norm_silu, "MIN_NATIVE_ELEMENTS", 0)


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reached the kernel (and returned its result)."""
    counter = {"native": 0}
    real = norm_silu._native_norm_silu

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        counter["native"] += out is not None
        return out

    monkeypatch.setattr(norm_silu, "_native_norm_silu", spy)
    return counter


def _norm(channels: int, zq_channels: int = 8, seed: int = 0, groups: int = 32) -> SpatialNorm:
    generator = torch.Generator().manual_seed(seed)
    norm = SpatialNorm(channels, zq_channels, num_groups=groups)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        norm.norm_layer.weight.add_(1.0)
    return norm.bfloat16().eval()


def _inputs(batch, channels, height, width, cells, zq_channels=8, mean=0.0, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator) * 2 + mean
    zq = torch.randn(batch, zq_channels, *cells, generator=generator)
    return (x.bfloat16().contiguous(memory_format=torch.channels_last),
            zq.bfloat16().contiguous(memory_format=torch.channels_last))


def _reference(norm: SpatialNorm, x, zq):
    """float64 ``silu(GroupNorm(x) * y + b)`` from the same bf16 inputs, with the modulation maps ``y``, ``b`` of
    the module's own bf16 1x1 convolutions (both paths use those) upsampled to the map's size."""
    with torch.no_grad():
        y, b = (F.interpolate(conv(zq).double(), size=x.shape[-2:], mode="nearest")
                for conv in (norm.conv_y, norm.conv_b))
        gn = norm.norm_layer
        normed = F.group_norm(x.double(), gn.num_groups, gn.weight.double(), gn.bias.double(), gn.eps)
        return F.silu(normed * y + b)


@needs_native
@pytest.mark.parametrize("batch,channels,groups,height,width,cells", [
    (1, 64, 32, 16, 16, (4, 4)),    # 64 channels: the vector loops only
    (2, 96, 32, 24, 40, (3, 5)),    # 96: a block of 64 channels + 32 in the sums' remainder loop
    (1, 40, 8, 12, 8, (12, 8)),     # 40 (8 groups): 16-lane loop + 8 scalar channels; no upsampling
    (3, 128, 32, 32, 32, (1, 1)),   # one cell: a per-image modulation
])
def test_kernel_matches_float64_as_closely_as_pytorch_bf16(any_size, calls, batch, channels, groups, height, width,
                                                           cells):
    norm = _norm(channels, groups=groups)
    x, zq = _inputs(batch, channels, height, width, cells)
    with torch.inference_mode():
        native = norm_silu.norm_silu(norm, x, zq, native=True)
        plain = norm_silu.norm_silu(norm, x, zq, native=False)
    assert calls["native"] == 1
    assert native.dtype == torch.bfloat16 and native.shape == x.shape
    assert native.is_contiguous(memory_format=torch.channels_last)
    want = _reference(norm, x, zq)
    native_error = (native.double() - want).abs()
    plain_error = (plain.double() - want).abs()
    # no worse than PyTorch's bf16 operators, which round after each of their three steps
    assert native_error.max() <= plain_error.max() * 1.05 + 1e-6
    assert native_error.mean() <= plain_error.mean() * 1.05 + 1e-6
    assert (native_error <= want.abs() * 2 ** -8 + 1e-3).all()  # one rounding to bf16 (2^-9) and float32 sums
    # and mostly the correctly rounded value itself (the exp is accurate to 1.5e-7, the statistics to float32's)
    assert (native == want.to(torch.bfloat16)).float().mean() >= 0.99


@needs_native
def test_kernel_statistics_hold_for_a_large_mean(any_size):
    """Shifted sums: a mean of 300 against a spread of 2 (E[x^2] - E[x]^2 in float would lose the variance), and a
    first pixel far from the rest (the shift is a mean over rows spread through the map, not one pixel)."""
    norm = _norm(64)
    x, zq = _inputs(1, 64, 32, 32, (4, 4), mean=300.0)
    x[:, :, 0, 0] = -300.0
    with torch.inference_mode():
        native = norm_silu.norm_silu(norm, x, zq, native=True)
    want = _reference(norm, x, zq)
    assert ((native.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()


@needs_native
def test_kernel_handles_extreme_activations(any_size):
    """SiLU of large negative and positive values: ~0 and ~x (the exp is clamped, the reciprocal refined)."""
    norm = _norm(32)
    with torch.no_grad():  # make the modulation produce values from about -200 to 200
        norm.conv_y.weight.zero_()
        norm.conv_y.bias.fill_(100.0)
        norm.conv_b.weight.zero_()
        norm.conv_b.bias.zero_()
    x, zq = _inputs(1, 32, 16, 16, (2, 2))
    with torch.inference_mode():
        native = norm_silu.norm_silu(norm, x, zq, native=True)
    want = _reference(norm, x, zq)
    assert torch.isfinite(native).all()
    assert ((native.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()


@needs_native
def test_plain_operators_run_where_the_kernel_does_not_apply(any_size, calls):
    norm = _norm(32)
    x, zq = _inputs(1, 32, 12, 12, (4, 4))
    zq5 = _inputs(1, 32, 12, 12, (5, 5))[1]  # 12 is not a multiple of 5

    def plain(*args):
        return F.silu(norm(*args))

    cases = {
        "grad enabled": lambda: norm_silu.norm_silu(norm, x, zq, native=True),
        "contiguous layout": lambda: norm_silu.norm_silu(norm, x.contiguous(), zq, native=True),
        "float32 map": lambda: norm_silu.norm_silu(norm.float(), x.float(), zq.float(), native=True),
        "not a multiple of the cells": lambda: norm_silu.norm_silu(norm, x, zq5, native=True),
        "plain GroupNorm": lambda: norm_silu.norm_silu(norm.norm_layer, x, native=True),
        "not asked": lambda: norm_silu.norm_silu(norm, x, zq, native=False),
    }
    for name, run in cases.items():
        norm.bfloat16()
        if name == "grad enabled":
            with torch.enable_grad():
                got = run()
        else:
            with torch.inference_mode():
                got = run()
        assert calls["native"] == 0, name
        assert torch.isfinite(got).all() and got.shape == x.shape, name
    norm.bfloat16()
    seen = []
    handle = norm.norm_layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.inference_mode():  # a hook on the norm: it must run, so PyTorch's operators do
        norm_silu.norm_silu(norm, x, zq, native=True)
    handle.remove()
    assert calls["native"] == 0 and seen == [x.shape]
    with torch.inference_mode():  # the float32 fallback is PyTorch's result exactly
        norm.float()
        assert torch.equal(norm_silu.norm_silu(norm, x.float(), zq.float(), native=True), plain(x.float(), zq.float()))


@needs_native
def test_small_maps_take_the_plain_operators(calls):
    norm = _norm(32)
    x, zq = _inputs(1, 32, 16, 16, (4, 4))  # 8,192 elements per image
    assert x[0].numel() < norm_silu.MIN_NATIVE_ELEMENTS
    with torch.inference_mode():
        norm_silu.norm_silu(norm, x, zq, native=True)
    assert calls["native"] == 0


@needs_native
def test_kernel_uses_the_thread_count(any_size, monkeypatch):
    """One thread and three threads give the same values: the statistics are per block of 256 rows (9 blocks here,
    split 9 / 3+3+3), added in block order."""
    norm = _norm(64)
    x, zq = _inputs(2, 64, 48, 48, (4, 4))
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        with torch.inference_mode():
            results.append(norm_silu.norm_silu(norm, x, zq, native=True))
    assert torch.equal(results[0], results[1])


@needs_native
def test_a_failed_self_check_disables_the_kernel(monkeypatch, caplog):
    monkeypatch.setattr(norm_silu, "_functions", None)  # load again, with a kernel that returns wrong values
    monkeypatch.setattr(norm_silu, "_native_norm_silu", lambda norm, x, *args, **kwargs: torch.zeros_like(x))
    with caplog.at_level("WARNING"):
        assert not norm_silu.native_available()
    assert "failed its self-check" in caplog.text
    assert not norm_silu.native_norm_silu_pays(64, torch.bfloat16)


def test_unavailable_kernel_means_plain_operators(monkeypatch):
    monkeypatch.setattr(norm_silu, "_functions", {})
    norm = _norm(32)
    x, zq = _inputs(1, 32, 8, 8, (2, 2))
    with torch.inference_mode():
        got = norm_silu.norm_silu(norm, x, zq, native=True)
        want = norm_silu.norm_silu(norm, x, zq, native=False)
    assert torch.equal(got, want)
    assert not norm_silu.native_available()
    assert not norm_silu.native_norm_silu_pays(32, torch.bfloat16)


@needs_native
def test_fast_decoder_with_the_kernel(tiny_model, any_size, calls, monkeypatch, caplog, cpu_like):
    """The plan's choice reaches the decoder's blocks; the kernel changes no index and decodes within bf16 noise."""
    from dualvitok import inference

    cpu_like("amx")
    on = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_norm=True)
    off = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_norm=False)
    assert on.inference_plan.native_norm and not off.inference_plan.native_norm
    variants = [m for m in on.modules() if isinstance(m, InferenceVariant)]
    assert variants and all(m.native_norm for m in variants)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        enc_on, enc_off = on.encode(images), off.encode(images)
        assert torch.equal(enc_on.pixel_indices, enc_off.pixel_indices)  # the encoder's norms are not the kernel's
        assert torch.equal(enc_on.semantic_indices, enc_off.semantic_indices)
        assert calls["native"] == 0
        out_on = on.decode_indices(enc_on.semantic_indices, enc_on.pixel_indices)
        out_off = off.decode_indices(enc_off.semantic_indices, enc_off.pixel_indices)
    assert calls["native"] > 0
    mse = (out_on - out_off).pow(2).mean().item()
    assert mse > 0 and 10 * torch.log10(torch.tensor(4.0 / mse)) > 40  # images in [-1, 1]
    inference.use_kernels(on, native_norm=False)
    assert not on.inference_plan.native_norm and all(not m.native_norm for m in variants)
    monkeypatch.setattr(norm_silu, "native_available", lambda: False)  # e.g. rank 0's choice on a rank without it
    with caplog.at_level("WARNING"):
        inference.use_kernels(on, native_norm=True)
    assert not on.inference_plan.native_norm and all(not m.native_norm for m in variants)
    assert "unavailable in this process" in caplog.text


def test_plan_measures_the_kernel_once_and_obeys_the_flag(tiny_model, monkeypatch, cpu_like):

    cpu_like("amx")
    monkeypatch.setattr(norm_silu, "native_available", lambda: True)
    asked = []
    monkeypatch.setattr(norm_silu, "native_norm_silu_pays", lambda ch, dtype: asked.append((ch, dtype)) or False)
    measured = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu")
    assert asked == [(tiny_model.config.pixel_decoder.ch, torch.bfloat16)] and not measured.inference_plan.native_norm
    told = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_norm=True)
    assert told.inference_plan.native_norm and len(asked) == 1
    off = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_norm=False)
    assert not off.inference_plan.native_norm and len(asked) == 1
    float32 = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", dtype=None, native_norm=True)
    assert not float32.inference_plan.native_norm and len(asked) == 1  # a float32 decoder: the kernel never applies
    monkeypatch.setattr(norm_silu, "native_available", lambda: False)
    missing = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_norm=True)
    assert not missing.inference_plan.native_norm  # asked for, but there is no kernel: plain operators


def _has_avx512() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512f" in flags and "avx512bw" in flags


@needs_native
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not _has_avx512(),
                    reason="an x86 CPU with AVX-512: the intrinsics loops against the portable ones")
def test_portable_loops_agree_with_the_avx512_ones(any_size, monkeypatch, tmp_path):
    """The C source's portable loops (CPUs without AVX-512) against its intrinsics (where this CPU has them)."""
    from dualvitok import _native

    norm = _norm(96)
    x, zq = _inputs(2, 96, 24, 16, (3, 2))
    with torch.inference_mode():
        default = norm_silu.norm_silu(norm, x, zq, native=True)
        default_build = _native.build("norm_silu")
        monkeypatch.setenv("DUALVITOK_CACHE", str(tmp_path))
        monkeypatch.setattr(_native, "_loaded", {})
        monkeypatch.setattr(_native, "FLAGS", (*_native.FLAGS, "-mno-avx512f"))
        monkeypatch.setattr(norm_silu, "_functions", None)
        assert norm_silu.native_available()
        assert _native.build("norm_silu") != default_build  # another library: the portable loops
        portable = norm_silu.norm_silu(norm, x, zq, native=True)
    want = _reference(norm, x, zq)
    assert ((portable.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()
    assert ((portable.double() - default.double()).abs() <= default.double().abs() * 2 ** -7 + 1e-3).all()
    assert (portable == default).float().mean() > 0.99


@needs_native
def test_kernel_works_in_a_forked_child(any_size, monkeypatch, forked_child):
    """After a fork the child starts its own pool threads (the parent's do not exist there)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # a pool of 2 in the parent and in the child
    norm = _norm(64)
    x, zq = _inputs(1, 64, 16, 16, (4, 4))
    with torch.inference_mode():
        parent = norm_silu.norm_silu(norm, x, zq, native=True)  # the pool and its threads exist now
    assert forked_child(lambda: torch.equal(norm_silu.norm_silu(norm, x, zq, native=True), parent))


@needs_native
def test_more_fallbacks_and_layouts(any_size, calls):
    """Modulation maps of another dtype or batch fall back; a contiguous zq is converted (the result is the same)."""
    norm = _norm(64)
    x, zq = _inputs(2, 64, 16, 16, (4, 4))
    with torch.inference_mode():
        want = norm_silu.norm_silu(norm, x, zq, native=True)
        assert calls["native"] == 1
        assert torch.equal(norm_silu.norm_silu(norm, x, zq.contiguous(), native=True), want)  # [B, C, h, w] zq
        assert calls["native"] == 2
        mixed = copy.deepcopy(norm)
        mixed.conv_y.float(), mixed.conv_b.float()  # float32 modulation maps from a bf16 map
        norm_silu.norm_silu(mixed, x, zq.float(), native=True)
        norm_silu.norm_silu(norm, x, zq[:1], native=True)  # one conditioning map for two images: broadcast
    assert calls["native"] == 2


@needs_native
def test_default_dtype_does_not_reach_the_kernels_buffers(any_size):
    norm = _norm(64)
    x, zq = _inputs(1, 64, 16, 16, (4, 4))
    with torch.inference_mode():
        want = norm_silu.norm_silu(norm, x, zq, native=True)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = norm_silu.norm_silu(norm, x, zq, native=True)
        finally:
            torch.set_default_dtype(previous)
    assert torch.equal(got, want)


@needs_native
def test_a_global_hook_at_first_use_does_not_disable_the_kernel(monkeypatch, any_size, calls):
    monkeypatch.setattr(norm_silu, "_functions", None)  # first use happens under the hook
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert norm_silu.native_available()
        calls["native"] = 0  # (the self-check's own call)
        norm = _norm(64)
        x, zq = _inputs(1, 64, 16, 16, (4, 4))
        with torch.inference_mode():
            norm_silu.norm_silu(norm, x, zq, native=True)
        assert calls["native"] == 0  # the hook must run: PyTorch's operators
    finally:
        handle.remove()
    with torch.inference_mode():
        norm_silu.norm_silu(norm, x, zq, native=True)
    assert calls["native"] == 1  # the kernel, once the hook is gone
