"""Opt-in fast inference: bfloat16 stages with channels_last convolutions, float32 where indices are decided.

On CPUs with AMX-BF16 (and on GPUs) bfloat16 matrix and convolution kernels are several times faster than float32
(here: 2,130 vs 337 GFLOP/s for a 2048^2 GEMM). :func:`optimize_for_inference` converts, once and in place, the
stages that do most of the work to bfloat16 *natively* (weights and norms, no autocast, so no float32 round trips of
large activations between layers):

* the frozen Qwen2-VL vision tower (its RoPE is still applied in float32),
* the pixel decoder with ``pixel_post_quant_conv``, and the semantic decoder.

The convolutional blocks switch to their inference kernels (:mod:`dualvitok.blocks.fused`): residual additions
fused into the preceding convolution as a oneDNN post-op, and in-place epilogues on temporaries, which removes most
of the full-resolution element-wise passes and freshly allocated outputs of the decoder.

With ``exact_indices`` (default) the trainable encoders in front of the quantizers (the pixel encoder with
``pixel_quant_conv``, and the semantic head) stay float32, so pixel indices equal the float32 path's and semantic
indices differ only where the bf16 tower moves a feature across a near tie. The quantizers always search in float32
with their cached codebook. 2D convolution weights and activations use channels_last. Outputs are float32.
The float32 path stays the reference: ``benchmarks/bench_tokenizer.py`` measures both side by side, with the quality
guard (bf16 vs float32 reconstructions and indices on real photos).
"""

from __future__ import annotations

import torch
from torch import nn


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, channels_last: bool = True,
                           exact_indices: bool = True):
    """Prepare ``model`` (a :class:`~dualvitok.DualViTok`) for fast inference, in place; returns it.

    Args:
        model: the tokenizer.
        dtype: compute dtype of the converted stages (``torch.bfloat16``; ``torch.float16`` on GPU) or ``None``
            to keep float32 (channels_last only).
        channels_last: store 2D convolution weights (and inputs) in channels_last layout.
        exact_indices: keep the pixel encoder and the semantic head in float32 (about 5% of the float32 work at
            256x256); ``False`` converts them too (faster, but some indices then differ from the float32 path).

    The model can no longer be trained in this state; reload it for training.
    """
    model.eval().requires_grad_(False)
    if dtype is not None:
        stages: list[nn.Module] = [model.semantic_encoder.model, model.semantic_decoder, model.pixel_decoder,
                                   model.pixel_post_quant_conv]
        if not exact_indices:
            se = model.semantic_encoder
            stages += [model.pixel_encoder, model.pixel_quant_conv, se.proj_in, se.blocks, se.proj_out]
        for stage in stages:
            stage.to(dtype)
    for module in model.modules():
        if hasattr(module, "fused_inference"):  # fused conv + residual kernels, in-place epilogues (blocks.fused)
            module.fused_inference = True
        if channels_last and isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    model.channels_last = channels_last
    return model
