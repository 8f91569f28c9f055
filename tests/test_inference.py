"""The opt-in fast path: bf16 where it is safe, float32 where indices are decided; quality guard on real photos;
device plans, the never-slower rule and the save refusal."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

from dualvitok import ImageProcessor, create_model, inference
from dualvitok.blocks import fused
from dualvitok.blocks.inference import InferenceVariant


def _optimized(model, support: str = "amx", speedup=6.0, **kwargs):
    """A fast copy of ``model`` as prepared on a CPU with the given bf16 support and measured bf16 speedup (the
    rule's inputs; ``speedup`` may be the measuring function itself)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "cpu_bf16_support", lambda: support)
        mp.setattr(inference, "low_precision_speedup", speedup if callable(speedup) else lambda dtype: speedup)
        return copy.deepcopy(model).optimize_for_inference(**kwargs)


@pytest.fixture(scope="module")
def models(reference_model, device):
    """The float32 reference and its fast path (bf16 stages, whatever this machine's CPU), on the matrix ``device``."""
    if device.type != "cpu":
        reference_model = copy.deepcopy(reference_model).to(device)
    return reference_model, _optimized(reference_model)


def test_weights_and_layouts(models):
    _, fast = models
    assert fast.semantic_encoder.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert fast.pixel_decoder.conv_in.weight.dtype == torch.bfloat16
    assert fast.pixel_decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # float32: quantizers, the semantic head and the pixel encoder's residual stream ("guarded" indices)
    assert fast.pixel_quantizer.code_transform.weight.dtype == torch.float32
    encoder = fast.pixel_encoder
    assert encoder.conv_in.weight.dtype == torch.float32 and encoder.conv_out.weight.dtype == torch.float32
    for level, dtype in ((0, torch.bfloat16), (1, torch.float32)):  # GUARDED_LEVELS = 1
        block = encoder.down[level].block[0]
        assert block.conv1.weight.dtype == block.conv2.weight.dtype == block.norm2.weight.dtype == dtype
        assert block.norm1.weight.dtype == torch.float32  # it reads the float32 stream
    assert fast.semantic_encoder.proj_out[0].weight.dtype == torch.float32
    assert fast.semantic_encoder.model.blocks[0].norm1.weight.dtype == torch.bfloat16  # tower natively bf16
    # the pixel decoder runs natively in bf16, norms included
    assert fast.pixel_decoder.norm_out.norm_layer.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in fast.parameters())


def _quality_guard(reference, fast, paths, exact_pixels: bool = True) -> None:
    """Fast vs float32 on real photos: mean PSNR >= 40 dB, >= 99% equal indices (pixel indices all equal)."""
    processor = ImageProcessor(size=(256, 256))
    psnrs, equal, total, pixel_equal, pixel_total = [], 0, 0, 0, 0
    for path in paths:
        x = processor(path).to(next(reference.parameters()).device)
        with torch.inference_mode():
            a, b = reference(x), fast(x)
        assert b.reconstruction.dtype == torch.float32 and b.reconstruction.shape == a.reconstruction.shape
        mse = (a.reconstruction - b.reconstruction).pow(2).mean().item()
        psnrs.append(10 * math.log10(4.0 / mse))
        for level in ("semantic_indices", "pixel_indices"):
            ia, ib = getattr(a.encoding, level), getattr(b.encoding, level)
            equal += int((ia == ib).sum())
            total += ia.numel()
        pixel_equal += int((a.encoding.pixel_indices == b.encoding.pixel_indices).sum())
        pixel_total += a.encoding.pixel_indices.numel()
    assert sum(psnrs) / len(psnrs) >= 40.0, psnrs
    assert equal / total >= 0.99
    if exact_pixels:
        assert pixel_equal == pixel_total  # the pixel encoder stays float32: identical pixel tokens
    else:
        assert pixel_equal / pixel_total >= 0.99


def test_quality_guard_on_real_photos(models, sample_image_paths):
    _quality_guard(*models, sample_image_paths, exact_pixels=False)


def test_exact_indices_keep_the_pixel_tokens(reference_model, sample_image_paths):
    """``indices="exact"``: the pixel encoder stays float32 in the float32 layout, so pixel tokens are identical."""
    fast = _optimized(reference_model, indices="exact")
    assert fast.pixel_encoder.conv_in.weight.is_contiguous()  # the float32 path's layout and kernels
    assert fast.pixel_encoder.down[0].block[0].conv1.weight.dtype == torch.float32
    assert fast.inference_plan.kept_float32["pixel encoder"] == "indices='exact'"
    _quality_guard(reference_model, fast, sample_image_paths, exact_pixels=True)


def _pixel_guard(reference, fast, images) -> tuple[float, float]:
    """(share of pixel indices equal, mean reconstruction PSNR in dB) of ``fast`` against ``reference``."""
    equal = total = 0
    psnrs = []
    for x in images:
        with torch.inference_mode():
            a, b = reference(x), fast(x)
        equal += int((a.encoding.pixel_indices == b.encoding.pixel_indices).sum())
        total += a.encoding.pixel_indices.numel()
        psnrs.append(10 * math.log10(4.0 / (a.reconstruction - b.reconstruction).pow(2).mean().item()))
    return equal / total, sum(psnrs) / len(psnrs)


def test_guarded_pixel_encoder_on_conformance_weights(reference_model, conformance_dir, sample_image_paths):
    """The quality guard of the guarded plan (bf16 residual branches in the pixel encoder): on the conformance
    weights (the reference's own cases and the bundled photos), >= 99% of pixel indices equal float32's and the
    reconstructions are >= 40 dB apart from float32's. The plan is taken as on a CPU with AMX (every stage in bf16)."""
    from safetensors.torch import load_file

    fast = _optimized(reference_model)
    assert fast.inference_plan.stage_dtypes[inference.PIXEL_BRANCHES] == "bfloat16"
    images = [load_file(str(p))["image"] for p in sorted(conformance_dir.glob("case*.safetensors"))]
    processor = ImageProcessor(size=(256, 256))
    images += [processor(p) for p in sample_image_paths]
    equal, psnr = _pixel_guard(reference_model, fast, images)
    assert equal >= 0.99, f"only {equal:.2%} of pixel indices equal float32's"
    assert psnr >= 40.0, psnr
    exact = _optimized(reference_model, indices="exact")
    assert _pixel_guard(reference_model, exact, images[:1])[0] == 1.0  # the guard can tell the modes apart: exact


@pytest.mark.slow
def test_guarded_pixel_encoder_on_the_released_architecture(sample_image_paths):
    """The same guard on the released architecture (1.35 B parameters) with seeded random weights, at 256x256."""
    torch.manual_seed(0)
    reference = create_model("dualvitok_anyres_max512").eval().requires_grad_(False)
    fast = _optimized(reference)
    processor = ImageProcessor(size=(256, 256))
    equal, psnr = _pixel_guard(reference, fast, [processor(p) for p in sample_image_paths[:4]])
    assert equal >= 0.99, f"only {equal:.2%} of pixel indices equal float32's"
    assert psnr >= 40.0, psnr


def test_indices_mode_is_checked(tiny_model):
    with pytest.raises(ValueError, match="indices='approximate'.*guarded, exact, fast"):
        _optimized(tiny_model, indices="approximate")
    with pytest.warns(DeprecationWarning, match="indices='exact'"):
        plan = _optimized(tiny_model, exact_indices=True).inference_plan
    assert plan.indices == "exact" and inference.PIXEL_BRANCHES not in plan.stage_dtypes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quality_guard_on_cuda(reference_model, sample_image_paths):
    """The CUDA plan (bf16, channels_last, SDPA, plain operators) holds the same guard (TF32 off for the reference)."""
    reference = copy.deepcopy(reference_model).cuda()
    fast = copy.deepcopy(reference_model).cuda().optimize_for_inference()
    assert fast.inference_plan.device_type == "cuda" and not fast.inference_plan.fuse_conv
    with torch.backends.cudnn.flags(allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            # float32 convolution kernels differ between devices in the last bits: near-tie pixel indices may flip
            _quality_guard(reference, fast, sample_image_paths, exact_pixels=False)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def test_fast_path_without_exact_indices_runs(reference_model):
    fast = _optimized(reference_model, indices="fast", channels_last=False)
    assert fast.pixel_encoder.conv_in.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        out = fast(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert out.reconstruction.dtype == torch.float32 and out.encoding.semantic_target.dtype == torch.float32


def _forbid_onednn(monkeypatch):
    def forbidden(inplace):
        raise AssertionError("the oneDNN fused operator must not be used by this plan")

    monkeypatch.setattr(fused, "_mkldnn_op", forbidden)


def test_cuda_plan_uses_plain_operators_bf16_and_channels_last(tiny_model, monkeypatch):
    """The CUDA plan, selected on CPU: bf16 stages, channels_last, in-place variants without the oneDNN operator."""
    fast = _optimized(tiny_model, support="none", device="cuda", indices="exact")  # the CPU rule does not apply
    plan = fast.inference_plan
    assert plan.device_type == "cuda" and not plan.fuse_conv and not plan.kept_float32.keys() - {
        "semantic head", "pixel encoder"}
    guarded = _optimized(tiny_model, support="none", device="cuda").inference_plan
    assert guarded.stage_dtypes[inference.PIXEL_BRANCHES] == "bfloat16"
    assert fast.pixel_decoder.conv_in.weight.dtype == torch.bfloat16
    assert fast.pixel_decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    variants = [m for m in fast.modules() if isinstance(m, InferenceVariant)]
    assert variants and not any(m.fuse_conv for m in variants)
    _forbid_onednn(monkeypatch)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        out, ref = fast(x), tiny_model(x)
    assert out.reconstruction.dtype == torch.float32
    assert torch.equal(out.encoding.pixel_indices, ref.encoding.pixel_indices)  # the pixel encoder stays float32
    torch.testing.assert_close(out.reconstruction, ref.reconstruction, atol=0.05, rtol=0.05)


def test_cuda_plan_in_float32_equals_the_float32_path(tiny_model, monkeypatch):
    _forbid_onednn(monkeypatch)
    fast = _optimized(tiny_model, device="cuda", dtype=None)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        out, ref = fast(x), tiny_model(x)
    torch.testing.assert_close(out.reconstruction, ref.reconstruction, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.encoding.semantic_indices, ref.encoding.semantic_indices)


def test_cpu_plan_uses_onednn_fusion(tiny_model, monkeypatch):
    calls = []
    original = fused._mkldnn_op
    monkeypatch.setattr(fused, "_mkldnn_op", lambda inplace: calls.append(inplace) or original(inplace))
    fast = _optimized(tiny_model, device="cpu", fuse_conv=True)
    assert fast.inference_plan.fuse_conv
    with torch.inference_mode():
        fast(torch.rand(1, 3, 64, 64) * 2 - 1)
    if torch.backends.mkldnn.is_available():
        assert calls


def test_cpu_plan_keeps_freed_memory_unless_told_not_to(tiny_model, monkeypatch, caplog):
    """The CPU plan applies the process-wide allocator setting by default (and records whether it applied);
    ``keep_freed_memory=False`` and other plans leave the allocator alone."""
    import dualvitok.devices

    calls = []
    monkeypatch.setattr(dualvitok.devices, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    with caplog.at_level(logging.INFO, logger="dualvitok.inference"):
        assert _optimized(tiny_model, device="cpu").inference_plan.keep_freed_memory and calls == [1]
    assert "freed buffers kept for reuse (process-wide) on" in caplog.text
    assert _optimized(tiny_model, device="cpu", keep_freed_memory=True).inference_plan.keep_freed_memory
    assert calls == [1, 1]
    assert not _optimized(tiny_model, device="cpu", keep_freed_memory=False).inference_plan.keep_freed_memory
    assert not _optimized(tiny_model, device="cuda").inference_plan.keep_freed_memory
    assert calls == [1, 1]
    monkeypatch.setattr(dualvitok.devices, "keep_freed_cpu_memory", lambda: calls.append(1) or False)
    assert not _optimized(tiny_model, device="cpu").inference_plan.keep_freed_memory  # refused (not glibc): recorded


@pytest.mark.parametrize("support, expect_bf16", [("amx", True), ("avx512_bf16", False), ("unknown", False),
                                                  ("none", False)])
def test_small_models_stay_float32_without_amx(tiny_model, caplog, support, expect_bf16):
    """Never slower than float32: the demo-sized model (width 32/64) keeps float32 where bf16 would be slower."""
    with caplog.at_level(logging.INFO, logger="dualvitok.inference"):
        fast = _optimized(tiny_model, support=support)
    dtypes = fast.inference_plan.stage_dtypes
    converted = {n for n, d in dtypes.items() if d != "float32"}
    assert converted == ({"vision tower", "semantic decoder", "pixel decoder", inference.PIXEL_BRANCHES}
                         if expect_bf16 else set())
    assert (fast.pixel_decoder.conv_in.weight.dtype == torch.bfloat16) == expect_bf16
    if not expect_bf16:
        assert "pixel decoder (" in caplog.text and "float32" in caplog.text  # says what it kept, and why
        assert all(isinstance(m, InferenceVariant) for m in (fast.pixel_decoder,))  # variants still swapped in


@pytest.mark.parametrize("support", ["amx", "avx512_bf16", "unknown"])
def test_bf16_measured_slower_keeps_every_stage_float32(support, caplog):
    """The flags alone do not convert: where bf16 products measure under MIN_LOW_PRECISION_SPEEDUP (e.g. AMX hidden
    from oneDNN), even the released architecture's wide stages stay float32, with the measurement as the reason."""
    meta = create_model("dualvitok_anyres_max512", device="meta")
    slow = inference.MIN_LOW_PRECISION_SPEEDUP * 0.9
    with caplog.at_level(logging.INFO, logger="dualvitok.inference"):
        plan = _optimized(meta, support=support, speedup=slow, device="cpu").inference_plan
    assert not plan.low_precision and set(plan.stage_dtypes.values()) == {"float32"}
    assert plan.low_precision_speedup == slow
    assert plan.kept_float32["pixel decoder"].startswith(f"torch.bfloat16 matrix products measured {slow:.2f}x")
    assert f"matrix products {slow:.1f}x float32" in caplog.text
    fast = _optimized(meta, support=support, speedup=inference.MIN_LOW_PRECISION_SPEEDUP, device="cpu")
    assert fast.inference_plan.stage_dtypes["pixel decoder"] == "bfloat16"  # at the threshold: converted


def test_bf16_is_measured_only_where_the_rule_gets_that_far(tiny_model):
    """The plan records the measurement it used; it measures nothing for other devices, float32, CPUs without bf16
    instructions, or stages too narrow for bf16 without AMX (the demo-sized model on AVX-512-BF16)."""
    assert _optimized(tiny_model, speedup=4.0, device="cpu").inference_plan.low_precision_speedup == 4.0

    def must_not_measure(dtype):
        raise AssertionError("measured where the rule had already decided")

    for kwargs in ({"device": "cpu", "dtype": None}, {"device": "cpu", "dtype": torch.float32}, {"device": "cuda"},
                   {"device": "cpu", "support": "none"}, {"device": "cpu", "support": "avx512_bf16"}):
        plan = _optimized(tiny_model, speedup=must_not_measure, **kwargs).inference_plan
        assert plan.low_precision_speedup is None, kwargs
    assert inference.low_precision_reason(8, "cpu", None) is None  # nothing to decide: no measurement
    assert inference.low_precision_reason(8, "cpu", torch.float32) is None


def test_ranks_take_rank_0s_bf16_measurement_before_converting(monkeypatch):
    """Under torchrun only rank 0 measures; the others take its number, so near the threshold every rank still
    converts the same stages."""
    import torch.distributed as dist

    from dualvitok import cpu
    from dualvitok._utils import distributed

    monkeypatch.setattr(cpu, "_speedups", {})
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(inference, "cpu_bf16_support", lambda: "amx")
    monkeypatch.setattr(inference, "low_precision_speedup", lambda dtype: pytest.fail("rank 1 measured"))
    sent = []
    monkeypatch.setattr(distributed, "all_gather_json", lambda obj: sent.append(obj) or [1.4, obj])
    inference.agree_on_low_precision(torch.bfloat16, "cpu")
    assert sent == [None]
    assert cpu.low_precision_speedup(torch.bfloat16) == 1.4  # taken, not measured (it would take a while)
    for args in ((torch.float32, "cpu"), (None, "cpu"), (torch.bfloat16, "cuda")):  # nothing to agree on
        inference.agree_on_low_precision(*args)
    assert sent == [None]
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(inference, "low_precision_speedup", lambda dtype: 5.5)
    inference.agree_on_low_precision(torch.bfloat16, "cpu")
    assert sent == [None, 5.5]  # rank 0 sends its measurement


def test_released_architecture_uses_bf16_on_avx512_bf16(cpu_like):
    """The wide stages of the released architecture clear the width rule on CPUs without AMX."""
    meta = create_model("dualvitok_anyres_max512", device="meta")
    plan = _optimized(meta, support="avx512_bf16", device="cpu").inference_plan
    assert plan.stage_dtypes == {"vision tower": "bfloat16", "semantic head": "float32", "pixel encoder": "float32",
                                 "semantic decoder": "bfloat16", "pixel decoder": "bfloat16",
                                 inference.PIXEL_BRANCHES: "bfloat16"}  # pixel encoder width 128: wide enough
    assert plan.kept_float32 == {"semantic head": "indices='guarded'", "pixel encoder": "indices='guarded'"}
    rule = inference.low_precision_reason
    cpu_like("avx512_bf16")
    assert rule(inference.MIN_BF16_WIDTH, "cpu", torch.bfloat16) is None
    assert "base width" in rule(inference.MIN_BF16_WIDTH - 1, "cpu", torch.bfloat16)
    assert rule(8, "cuda", torch.bfloat16) is None


def test_compile_option_compiles_the_stages(tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    fast = _optimized(tiny_model, device="cuda", compile=True)
    assert fast.inference_plan.compiled and not fast.inference_plan.fuse_conv
    assert sorted(compiled) == sorted(["Qwen2VisionTower", "SemanticDecoder", "MoVQEncoder", "PixelDecoder"])


def test_second_call_does_nothing(tiny_model):
    fast = _optimized(tiny_model)
    hooks = len(fast.pixel_decoder_branch._forward_pre_hooks)
    assert fast.optimize_for_inference() is fast
    assert len(fast.pixel_decoder_branch._forward_pre_hooks) == hooks


def test_save_pretrained_refuses_rounded_weights(tiny_model, tmp_path):
    fast = _optimized(tiny_model)
    with pytest.raises(RuntimeError, match="optimize_for_inference.*rounded"):
        fast.save_pretrained(tmp_path / "fast")
    assert not (tmp_path / "fast" / "model.safetensors").exists()
    exact = _optimized(tiny_model, dtype=None)  # float32 variants and channels_last only: the weights are exact
    exact.save_pretrained(tmp_path / "exact")
    from dualvitok import DualViTok

    loaded = DualViTok.from_pretrained(tmp_path / "exact")
    original = tiny_model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("measured", [True, False])
def test_cpu_fusion_follows_the_measured_choice(tiny_model, monkeypatch, measured):
    """The CPU plan asks the one-time measurement (at the pixel decoder's width and dtype) unless told."""
    asked = []
    monkeypatch.setattr(fused, "fused_conv_add_pays", lambda ch, dtype: asked.append((ch, dtype)) or measured)
    fast = _optimized(tiny_model, device="cpu")
    assert asked == [(tiny_model.config.pixel_decoder.ch, torch.bfloat16)]
    assert fast.inference_plan.fuse_conv is measured
    assert all(m.fuse_conv is measured for m in fast.modules() if isinstance(m, InferenceVariant))
    forced = _optimized(tiny_model, device="cpu", fuse_conv=False)
    assert not forced.inference_plan.fuse_conv and len(asked) == 1  # told: not measured


def test_ranks_agree_on_the_measured_kernel_choices(tiny_model, monkeypatch, cpu_like):
    """Under torchrun each rank measures its kernels once; encode and evaluate make every rank use rank 0's
    choices (inference.agree_on_kernels)."""
    from dualvitok._utils import distributed
    from dualvitok.blocks import native_rope, norm_silu, packed, packed_conv
    from dualvitok.blocks.inference import InferenceConv2d, InferenceLinear

    cpu_like("amx")  # bf16 stages whatever this CPU
    monkeypatch.setattr(norm_silu, "native_available", lambda: True)
    monkeypatch.setattr(native_rope, "native_available", lambda: True)
    model = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", fuse_conv=True, pack_linear=True,
                                                             pack_float32=True, pack_conv=True, native_norm=True,
                                                             native_rope=True)
    gathered = []
    plain = dict.fromkeys(inference.KERNEL_CHOICES, False)  # rank 0 uses the plain operators
    rank0 = {"kernels": plain, "stage_dtypes": dict(model.inference_plan.stage_dtypes)}
    monkeypatch.setattr(distributed, "all_gather_json", lambda obj: gathered.append(obj) or [rank0, obj])
    inference.agree_on_kernels(model)
    assert gathered == [{"kernels": {"fuse_conv": True, "native_norm": True, "native_rope": True,
                                     "pack_linear": packed.can_pack(torch.zeros(1, dtype=torch.bfloat16)),
                                     "pack_float32": packed.can_pack(torch.zeros(1)),
                                     "pack_conv": packed_conv.can_pack_conv(nn.Conv2d(1, 1, 1).to(torch.bfloat16)),
                                     "winograd_conv": False},  # a bf16 decoder
                         "stage_dtypes": model.inference_plan.stage_dtypes}]
    assert not any(getattr(model.inference_plan, name) for name in inference.KERNEL_CHOICES)
    variants = [m for m in model.modules() if isinstance(m, InferenceVariant)]
    assert variants and not any(getattr(m, name) for m in variants for name in inference.KERNEL_CHOICES)
    assert any(isinstance(m, InferenceLinear) for m in variants) and any(isinstance(m, InferenceConv2d)
                                                                         for m in variants)


def test_a_rank_with_other_stage_dtypes_than_rank_0_warns(tiny_model, monkeypatch, caplog):
    """Stage dtypes cannot be taken from rank 0 (the weights are rounded, or bf16 would be slower here): the rank
    says which stages differ and why, and what gives every rank the same tokens."""
    from dualvitok._utils import distributed

    here = _optimized(tiny_model, support="avx512_bf16", device="cpu")  # width 32: float32 without AMX
    rank0 = {"kernels": {name: getattr(here.inference_plan, name) for name in inference.KERNEL_CHOICES},
             "stage_dtypes": dict(_optimized(tiny_model, device="cpu").inference_plan.stage_dtypes)}  # AMX: bf16
    monkeypatch.setattr(distributed, "all_gather_json", lambda obj: [rank0, obj])
    with caplog.at_level(logging.WARNING, logger="dualvitok.inference"):
        inference.agree_on_kernels(here)
    assert "pixel decoder in float32" in caplog.text and "pixel decoder in bfloat16" in caplog.text
    assert "base width 32" in caplog.text and "--dtype float32" in caplog.text
    caplog.clear()
    rank0["stage_dtypes"] = dict(here.inference_plan.stage_dtypes)
    with caplog.at_level(logging.WARNING, logger="dualvitok.inference"):
        inference.agree_on_kernels(here)
    assert not caplog.text  # the same stage dtypes: nothing to say


def test_agreeing_alone_changes_nothing(tiny_model):
    """In a single process rank 0 is this process; an unprepared model has no choices to agree on."""
    fast = _optimized(tiny_model, device="cpu", fuse_conv=True, pack_linear=False)
    inference.agree_on_kernels(fast)
    assert fast.inference_plan.fuse_conv is True and fast.inference_plan.pack_linear is False
    plain = copy.deepcopy(tiny_model)
    inference.agree_on_kernels(plain)
    assert getattr(plain, "inference_plan", None) is None
