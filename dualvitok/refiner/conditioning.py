"""Conditioning of the refiner UNet: DualViTok code features, micro-conditioning ids and zero text embeddings.

Follows ILLUME+ ``vision_tokenizer/tokenizer/sdxl_decoder_pipe.py`` (``DualViTok2ImageEmbedder`` and the denoising
loop): the codes of both levels are merged as the tokenizer's decoder sees them (semantic codes bicubic-resized to the
pixel grid, concatenated before the pixel codes), then nearest-resized to the latent grid and concatenated to the
noisy latent on the channel axis. Text conditioning is all zeros in SDXL's shapes; ``add_time_ids`` are
``[0, 0, 0, 0, 0, resolution_index]``. Differences: the tokenizer is never cast or moved (the reference casts the
shared model to fp16 on CUDA), and token perturbation for training is added here (the reference released no
training code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantizers import inject_token_noise
from .configs import NUM_TIME_IDS

TEXT_SEQUENCE_LENGTH = 77
"""Length of SDXL's (here all-zero) text-encoder sequence."""


class TokenNoise(NamedTuple):
    """Token perturbation rates: a sample is perturbed with probability ``batch_rate``, then each of its tokens with
    probability ``token_rate`` (replaced by a uniformly drawn code of the same codebook)."""

    batch_rate: float
    token_rate: float


def check_token_grids(tokenizer, semantic_indices: Tensor, pixel_indices: Tensor) -> None:
    """Clear errors for token maps that are not ``[B, hs, ws]`` / ``[B, h, w]`` integer tensors of valid codes."""
    for name, idx in (("semantic_indices", semantic_indices), ("pixel_indices", pixel_indices)):
        if not torch.is_tensor(idx) or idx.ndim != 3 or idx.is_floating_point():
            raise ValueError(f"{name} must be a [B, h, w] integer tensor, got "
                             f"{tuple(idx.shape) if torch.is_tensor(idx) else type(idx).__name__}")
    if semantic_indices.shape[0] != pixel_indices.shape[0]:
        raise ValueError(f"batch sizes differ: semantic_indices {tuple(semantic_indices.shape)} vs pixel_indices "
                         f"{tuple(pixel_indices.shape)}")
    tokenizer.semantic_quantizer.check_indices(semantic_indices)
    tokenizer.pixel_quantizer.check_indices(pixel_indices)


def code_features(tokenizer, semantic_indices: Tensor, pixel_indices: Tensor,
                  semantic_noise: TokenNoise | None = None, pixel_noise: TokenNoise | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Merged code features of both token levels, as the DualViTok decoder sees them.

    Args:
        tokenizer: a :class:`dualvitok.DualViTok` (only its codebooks and ``merge_codes`` are used; it is not modified).
        semantic_indices: ``[B, hs, ws]`` int64.
        pixel_indices: ``[B, h, w]`` int64.
        semantic_noise, pixel_noise: optional token perturbation per level (training).
        generator: CPU generator for the perturbation masks and codes.

    Returns:
        ``[B, C_s + C_p, h, w]`` float32 on the tokenizer's device (64 channels for the released tokenizer).
    """
    check_token_grids(tokenizer, semantic_indices, pixel_indices)
    sem_q, pix_q = tokenizer.semantic_quantizer, tokenizer.pixel_quantizer
    device = next(tokenizer.parameters()).device
    semantic_indices, pixel_indices = semantic_indices.to(device), pixel_indices.to(device)
    semantic_codes = sem_q.indices_to_codes(semantic_indices).float()  # [B, C_s, hs, ws]
    pixel_codes = pix_q.indices_to_codes(pixel_indices).float()  # [B, C_p, h, w]
    if semantic_noise is not None and semantic_noise.batch_rate > 0 and semantic_noise.token_rate > 0:
        semantic_codes = inject_token_noise(semantic_codes, *semantic_noise, mode="uniform",
                                            codebook=sem_q.codebook.float(), generator=generator)
    if pixel_noise is not None and pixel_noise.batch_rate > 0 and pixel_noise.token_rate > 0:
        pixel_codes = inject_token_noise(pixel_codes, *pixel_noise, mode="uniform", codebook=pix_q.codebook.float(),
                                         generator=generator)
    return tokenizer.merge_codes(semantic_codes, pixel_codes).float()  # no noise of its own, in any mode


def to_latent_grid(features: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """Nearest-resize code features to the latent grid (the reference's ``F.interpolate`` default mode).

    Shape: ``[B, C, h, w]`` -> ``[B, C, H_lat, W_lat]`` (4x for the 2x refiner with a scale-8 VAE).
    """
    if tuple(features.shape[-2:]) == tuple(latent_size):
        return features
    return F.interpolate(features, size=tuple(latent_size), mode="nearest")


def time_ids(resolution_index: int | Tensor, batch_size: int, device=None, dtype=torch.float32) -> Tensor:
    """SDXL ``add_time_ids`` as the reference sets them: ``[0, 0, 0, 0, 0, resolution_index]`` per sample.

    Args:
        resolution_index: one index for the whole batch, or ``[B]`` per-sample indices.

    Returns:
        ``[B, 6]``.
    """
    ids = torch.zeros(batch_size, NUM_TIME_IDS, device=device, dtype=dtype)
    index = torch.as_tensor(resolution_index, device=device, dtype=dtype)
    ids[:, -1] = index.expand(batch_size) if index.ndim else index
    return ids


class TextConditioning(NamedTuple):
    """All-zero text conditioning: ``encoder_hidden_states [B, 77, cross_attention_dim]``, ``text_embeds [B, D]``."""

    encoder_hidden_states: Tensor
    text_embeds: Tensor


def unet_conditioning_dims(unet) -> tuple[int, int]:
    """``(cross_attention_dim, pooled_text_dim)`` of an SDXL-layout UNet, with a clear error for other layouts.

    The pooled dim is what the ``text_time`` embedding leaves after the six time ids, as the reference checks
    (``addition_time_embed_dim * 6 + 1280 == add_embedding.linear_1.in_features`` for SDXL).
    """
    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        raise ValueError(f"the refiner UNet must use addition_embed_type='text_time' (SDXL layout), got "
                         f"{cfg.addition_embed_type!r}")
    if not isinstance(cfg.cross_attention_dim, int):
        raise ValueError(f"the refiner UNet needs one integer cross_attention_dim, got {cfg.cross_attention_dim!r}")
    pooled = unet.add_embedding.linear_1.in_features - NUM_TIME_IDS * cfg.addition_time_embed_dim
    if pooled <= 0:
        raise ValueError(f"inconsistent UNet: add_embedding takes {unet.add_embedding.linear_1.in_features} features, "
                         f"not more than {NUM_TIME_IDS} time ids x {cfg.addition_time_embed_dim}")
    return int(cfg.cross_attention_dim), int(pooled)


def zero_text_conditioning(unet, batch_size: int, device=None, dtype=torch.float32) -> TextConditioning:
    """The refiner's constant text conditioning (SDXL shapes, all zeros)."""
    cross_dim, pooled_dim = unet_conditioning_dims(unet)
    return TextConditioning(
        torch.zeros(batch_size, TEXT_SEQUENCE_LENGTH, cross_dim, device=device, dtype=dtype),
        torch.zeros(batch_size, pooled_dim, device=device, dtype=dtype),
    )
