"""Opt-in fast inference: bfloat16 autocast with channels_last convolutions, weights cast once.

On CPUs with AMX-BF16 (and on GPUs) bfloat16 matrix and convolution kernels are several times faster than float32.
:func:`optimize_for_inference` puts a DualViTok in eval mode, disables gradients, stores the weights of its
convolution and linear layers in bfloat16 (so autocast does not re-cast ~1.3 B parameters on every call) with
channels_last layout for 2D convolutions, and makes the vision tower and semantic decoder run under autocast
(their norms in float32). The pixel decoder, most of the work, is converted to bfloat16 entirely, norms included,
and runs without autocast, which keeps its large activations in bfloat16 between layers. The quantizers keep
float32 weights and always search in float32; the RoPE tables and the semantic resize stay float32; with
``exact_indices`` the encoders in front of the quantizers stay float32 too. Outputs are returned as float32.
The float32 path stays the reference: compare with it via ``benchmarks/bench_tokenizer.py`` (quality guard).
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizers.base import Quantizer

_CAST = (nn.Linear, nn.Conv2d, nn.Conv3d)


def _exact_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that feed the quantizers and stay float32 with ``exact_indices``: the pixel encoder and
    ``pixel_quant_conv``, and the semantic head (``proj_in``, blocks, ``proj_out``); the frozen tower (most of the
    encoder's work) runs in bf16."""
    se = model.semantic_encoder
    return [model.pixel_encoder, model.pixel_quant_conv, se.proj_in, se.blocks, se.proj_out]


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, channels_last: bool = True,
                           exact_indices: bool = True):
    """Prepare ``model`` (a :class:`~dualvitok.DualViTok`) for fast inference, in place; returns it.

    Args:
        model: the tokenizer.
        dtype: compute dtype for autocast (``torch.bfloat16``, ``torch.float16`` on GPU) or ``None`` for float32.
        channels_last: store 2D convolution weights (and inputs) in channels_last layout.
        exact_indices: keep the trainable encoders in front of the quantizers (pixel encoder, semantic head) in
            float32 (about 5% of the float32 work at 256x256), so that indices agree with the float32 path except
            where the bf16 vision tower moves a semantic feature across a near tie. ``False`` runs them in bf16 too.

    The model can no longer be trained in this state; reload it for training.
    """
    model.eval().requires_grad_(False)
    keep = [q for q in model.modules() if isinstance(q, Quantizer)] + (_exact_modules(model) if exact_indices else [])
    float32_modules = {id(m) for k in keep for m in k.modules()}
    for module in model.modules():
        if not isinstance(module, _CAST):
            continue
        if dtype is not None and id(module) not in float32_modules:
            module.to(dtype)
        if channels_last and isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    if dtype is not None:
        # The pixel decoder (most of the work) runs natively in ``dtype``, norms included, without autocast: no
        # float32 round trips of its large activations between convolutions and norms.
        for module in (model.pixel_decoder, model.pixel_post_quant_conv):
            module.to(dtype)
    model.autocast_dtype = dtype
    model.channels_last = channels_last
    model.exact_indices = exact_indices
    return model
