"""Refiner training objective: denoising loss conditioned on (perturbed) DualViTok codes of the 2x-downsampled image.

The ILLUME+ reference released only the inference pipeline (its issue #6). It follows the standard
diffusers SDXL fine-tuning recipe (VAE latents x scaling factor, DDPM forward noising with uniformly drawn timesteps,
MSE on the scheduler's prediction type) with the conditioning of the reference pipeline (see ``conditioning.py``):
the tokenizer encodes the high-resolution training image downsampled 2x, so the UNet learns the 2x super-resolving
decoder. For robustness to imperfect generated tokens the codes are perturbed: 50% of the samples get 10% of their
pixel tokens and (smaller) 5% of their semantic tokens replaced by random codes. A fraction of samples
(``condition_dropout``, 10%) gets all-zero code features so that the unconditional branch used by classifier-free
guidance is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import TokenNoise, code_features
from .pipeline import UPSCALE, RefinerPipeline


@dataclass
class RefinerLossConfig:
    """Settings of :func:`refiner_loss`.

    Attributes:
        semantic_batch_rate, semantic_token_rate: semantic token perturbation (fraction of samples, then of tokens).
        pixel_batch_rate, pixel_token_rate: pixel token perturbation.
        condition_dropout: probability that a sample's code features are zeroed (trains the CFG unconditional input).
    """

    semantic_batch_rate: float = 0.5
    semantic_token_rate: float = 0.05
    pixel_batch_rate: float = 0.5
    pixel_token_rate: float = 0.1
    condition_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("semantic_batch_rate", "semantic_token_rate", "pixel_batch_rate", "pixel_token_rate",
                     "condition_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


class RefinerLossOutput(NamedTuple):
    """``loss`` (scalar), the ``timesteps [B]`` drawn and the ``dropped [B]`` mask of unconditional samples."""

    loss: Tensor
    timesteps: Tensor
    dropped: Tensor


def downsample_for_tokens(images: Tensor) -> Tensor:
    """The tokenizer input of a refiner target: bicubic antialiased 2x downsampling, clamped to [-1, 1].

    Shape: ``[B, 3, 2H, 2W]`` -> ``[B, 3, H, W]``.
    """
    h, w = images.shape[-2:]
    if h % UPSCALE or w % UPSCALE:
        raise ValueError(f"target images must have even sizes, got {w}x{h}")
    low = F.interpolate(images.float(), size=(h // UPSCALE, w // UPSCALE), mode="bicubic", align_corners=False,
                        antialias=True)
    return low.clamp(-1.0, 1.0)


def refiner_loss(
    refiner: RefinerPipeline,
    noise_scheduler,
    images: Tensor,
    config: RefinerLossConfig | None = None,
    generator: torch.Generator | None = None,
) -> RefinerLossOutput:
    """Denoising loss of the refiner UNet on target images (the tokenizer and the VAE stay frozen).

    Args:
        refiner: the pipeline whose ``unet`` is trained.
        noise_scheduler: a training scheduler with ``add_noise`` (e.g. ``DDPMScheduler.from_config(
            refiner.scheduler.config)``); its ``prediction_type`` sets the target (epsilon, v_prediction, sample).
        images: targets ``[B, 3, 2H, 2W]`` in [-1, 1], one supported output size per batch.
        config: perturbation and condition-dropout rates.
        generator: CPU generator for every random draw (default: the global RNG, captured by checkpoints).

    Returns:
        :class:`RefinerLossOutput`.
    """
    config = config or RefinerLossConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    b, _, height, width = images.shape
    index = refiner.check_output_size(height, width)
    tokenizer = refiner.tokenizer
    device = refiner.device
    with torch.no_grad():
        low = downsample_for_tokens(images).to(next(tokenizer.parameters()).device)
        was_training = tokenizer.training
        tokenizer.eval()
        try:
            semantic_indices, pixel_indices = tokenizer.encode_indices(low)
        finally:
            tokenizer.train(was_training)
        features = code_features(
            tokenizer, semantic_indices, pixel_indices,
            semantic_noise=TokenNoise(config.semantic_batch_rate, config.semantic_token_rate),
            pixel_noise=TokenNoise(config.pixel_batch_rate, config.pixel_token_rate),
            generator=generator,
        )  # [B, C, h, w]
        dropped = torch.rand(b, generator=generator) < config.condition_dropout  # [B]
        features = features * (~dropped).to(features).view(b, 1, 1, 1).to(features.device)
        latents = refiner.encode_images(images, generator=generator).to(refiner.dtype)  # [B, 4, 2H/8, 2W/8]
        noise = torch.randn(latents.shape, generator=generator).to(device=device, dtype=latents.dtype)
        num_train = int(noise_scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, num_train, (b,), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")
    prediction = refiner.unet_prediction(noisy, timesteps, features.to(device=device, dtype=refiner.dtype), index)
    loss = F.mse_loss(prediction.float(), target.float())
    return RefinerLossOutput(loss, timesteps, dropped)


def training_noise_scheduler(refiner: RefinerPipeline):
    """A ``DDPMScheduler`` with the refiner scheduler's noise schedule, for :func:`refiner_loss`."""
    from ._deps import require_diffusers

    diffusers = require_diffusers()
    return diffusers.DDPMScheduler.from_config(refiner.scheduler.config)
