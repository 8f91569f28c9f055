"""The opt-in fast path: bf16 where it is safe, float32 where indices are decided; quality guard on real photos."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dualvitok import ImageProcessor


@pytest.fixture(scope="module")
def models(reference_model, device):
    """The float32 reference and its fast path, both on the matrix ``device``."""
    if device.type != "cpu":
        reference_model = copy.deepcopy(reference_model).to(device)
    fast = copy.deepcopy(reference_model).optimize_for_inference()
    return reference_model, fast


def test_weights_and_layouts(models):
    _, fast = models
    assert fast.semantic_encoder.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert fast.pixel_decoder.conv_in.weight.dtype == torch.bfloat16
    assert fast.pixel_decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # float32: quantizers and (exact_indices) the encoders in front of the quantizers
    assert fast.pixel_quantizer.code_transform.weight.dtype == torch.float32
    assert fast.pixel_encoder.conv_in.weight.dtype == torch.float32
    assert fast.semantic_encoder.proj_out[0].weight.dtype == torch.float32
    assert fast.semantic_encoder.model.blocks[0].norm1.weight.dtype == torch.bfloat16  # tower natively bf16
    # the pixel decoder runs natively in bf16, norms included
    assert fast.pixel_decoder.norm_out.norm_layer.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in fast.parameters())


def test_quality_guard_on_real_photos(models, sample_image_paths):
    reference, fast = models
    processor = ImageProcessor(size=(256, 256))
    psnrs, equal, total, pixel_equal, pixel_total = [], 0, 0, 0, 0
    for path in sample_image_paths:
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
    assert pixel_equal == pixel_total  # the pixel encoder stays float32: identical pixel tokens


def test_fast_path_without_exact_indices_runs(reference_model):
    fast = copy.deepcopy(reference_model).optimize_for_inference(exact_indices=False, channels_last=False)
    assert fast.pixel_encoder.conv_in.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        out = fast(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert out.reconstruction.dtype == torch.float32 and out.encoding.semantic_target.dtype == torch.float32
