"""Architecture configs of the refiner's diffusers components: the SDXL layout and tiny test variants.

The SDXL values are those of ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/config.json``,
``vae/config.json``, ``scheduler/scheduler_config.json``). The ILLUME+ decoder (``ILLUME-MLLM/dualvitok-sdxl-decoder``)
keeps this UNet layout except ``in_channels = 4 + 64`` (latent + merged DualViTok codes) [inferred from the reference
pipeline, see docs/refiner.md]; its exact scheduler is in its Hub repo and not visible in the reference code.
The tiny variants keep the structure (SDXL block types, ``text_time`` additional embedding, six time ids) with
few channels so that tests run on a CPU in seconds.
"""

from __future__ import annotations

from typing import Any

from ._deps import require_diffusers

NUM_TIME_IDS = 6
"""SDXL micro-conditioning count; the refiner fills it with ``[0, 0, 0, 0, 0, resolution_index]``."""


def sdxl_unet_config(code_channels: int = 64, latent_channels: int = 4) -> dict[str, Any]:
    """SDXL-base UNet config with ``in_channels = latent_channels + code_channels`` (68 for the released decoder)."""
    return {
        "sample_size": 128,
        "in_channels": latent_channels + code_channels,
        "out_channels": latent_channels,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 pooled text
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def sdxl_vae_config() -> dict[str, Any]:
    """The SDXL VAE (scale factor 8, 4 latent channels, ``scaling_factor`` 0.13025)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def sdxl_scheduler_config() -> dict[str, Any]:
    """SDXL-base's EulerDiscreteScheduler settings (the usual SDXL default)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def tiny_unet_config(code_channels: int = 16, latent_channels: int = 4) -> dict[str, Any]:
    """A tiny UNet in the SDXL layout for tests (about 0.2 M parameters)."""
    return {
        "sample_size": 8,
        "in_channels": latent_channels + code_channels,
        "out_channels": latent_channels,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 16,
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": NUM_TIME_IDS * 8 + 16,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def tiny_vae_config() -> dict[str, Any]:
    """A tiny AutoencoderKL with SDXL's scale factor 8 (four levels of 8 channels)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


ARCHITECTURES = {"sdxl": (sdxl_unet_config, sdxl_vae_config), "tiny": (tiny_unet_config, tiny_vae_config)}


def build_components(architecture: str, code_channels: int, scheduler_config: dict[str, Any] | None = None):
    """Randomly initialised ``(unet, vae, scheduler)`` of a named architecture (``"sdxl"`` or ``"tiny"``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown refiner architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    diffusers = require_diffusers()
    unet_fn, vae_fn = ARCHITECTURES[architecture]
    vae = diffusers.AutoencoderKL(**vae_fn())
    unet = diffusers.UNet2DConditionModel(**unet_fn(code_channels, vae.config.latent_channels))
    scheduler = diffusers.EulerDiscreteScheduler(**(scheduler_config or sdxl_scheduler_config()))
    return unet, vae, scheduler
