"""The diffusion refiner pipeline: DualViTok tokens -> images at 2x the token image size.

Follows ILLUME+ ``vision_tokenizer/tokenizer/sdxl_decoder_pipe.py`` (``StableDiffusionXLDecoderPipeline``, weights
``ILLUME-MLLM/dualvitok-sdxl-decoder``): an SDXL-layout ``UNet2DConditionModel`` whose input is the noisy latent
concatenated with the merged DualViTok code features (nearest-resized to the latent grid), an ``AutoencoderKL`` and
any diffusers scheduler; zero text conditioning; ``add_time_ids = [0, 0, 0, 0, 0, resolution_index]``; classifier-free
guidance with all-zero code features as the unconditional input, batch ordered ``[uncond; cond]``, skipped when
``guidance_scale <= 1``. Differences: written from scratch on diffusers' components rather than as a
``DiffusionPipeline`` subclass (loading and saving use the same folder layout), the output size follows from the
token grid (2x) instead of ``height``/``width`` arguments, the supported-size list is configurable, and the tokenizer
passed in is never cast to fp16 or moved.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._deps import require_diffusers
from .conditioning import code_features, time_ids, to_latent_grid, zero_text_conditioning
from .configs import build_components
from .resolutions import format_resolutions, normalize_resolutions, resolution_index

logger = logging.getLogger(__name__)

MODEL_INDEX_NAME = "model_index.json"
REFERENCE_PIPELINE_CLASS = "StableDiffusionXLDecoderPipeline"
"""``_class_name`` written to ``model_index.json``, as in the released ``ILLUME-MLLM/dualvitok-sdxl-decoder``."""
SETTINGS_KEY = "_dualvitok_refiner"
"""Private ``model_index.json`` key holding this library's settings (diffusers ignores keys starting with ``_``)."""
COMPONENTS = ("unet", "vae", "scheduler")
UPSCALE = 2
"""The refiner decodes tokens of an ``H x W`` image to a ``2H x 2W`` image."""


def rescale_guidance(guided: Tensor, conditional: Tensor, guidance_rescale: float) -> Tensor:
    """Rescale a CFG prediction toward the conditional prediction's standard deviation (Lin et al. 2023, eq. 15-16).

    Shape: ``[B, C, H, W]`` (both inputs) -> ``[B, C, H, W]``.
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


class RefinerPipeline:
    """Diffusion decoder from DualViTok tokens to images at twice the token image size.

    Args:
        unet: SDXL-layout ``UNet2DConditionModel`` with ``in_channels = latent channels + merged code channels``
            (4 + 64 = 68 for the released decoder) and ``addition_embed_type="text_time"``.
        vae: ``AutoencoderKL``.
        scheduler: a diffusers scheduler (``EulerDiscreteScheduler`` by default when built from scratch).
        tokenizer: the :class:`dualvitok.DualViTok` whose codebooks turn indices into code features (not saved with the
            refiner, never modified).
        resolutions: supported output sizes as ``(width, height)``; the position is the micro-conditioning index.
            Defaults to the reference's 12 sizes (:data:`REFERENCE_RESOLUTIONS`).

    Call it with token maps: ``images = refiner(semantic_indices, pixel_indices, num_inference_steps=50,
    guidance_scale=2.0, generator=g)``.
    """

    def __init__(self, unet, vae, scheduler, tokenizer, resolutions: Sequence[Sequence[int]] | None = None):
        require_diffusers()
        if tokenizer is None or not hasattr(tokenizer, "merge_codes"):
            raise TypeError("tokenizer must be a dualvitok.DualViTok (its codebooks turn indices into code features); "
                            "load one with dualvitok.DualViTok.from_pretrained(...)")
        self.unet, self.vae, self.scheduler, self.tokenizer = unet, vae, scheduler, tokenizer
        self.resolutions = normalize_resolutions(resolutions)
        self.code_channels = tokenizer.semantic_quantizer.dim + tokenizer.pixel_quantizer.dim
        self.latent_channels = int(vae.config.latent_channels)
        expected = self.latent_channels + self.code_channels
        if unet.config.in_channels != expected:
            raise ValueError(
                f"UNet in_channels is {unet.config.in_channels} but the refiner feeds {self.latent_channels} latent + "
                f"{self.code_channels} code channels = {expected} (semantic {tokenizer.semantic_quantizer.dim} + pixel "
                f"{tokenizer.pixel_quantizer.dim}); use a UNet built for this tokenizer")
        if unet.config.out_channels != self.latent_channels:
            raise ValueError(f"UNet out_channels {unet.config.out_channels} != VAE latent channels "
                             f"{self.latent_channels}")
        zero_text_conditioning(unet, 1, device="meta")  # validates the SDXL conditioning layout early
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_architecture(cls, tokenizer, architecture: str = "sdxl",
                          resolutions: Sequence[Sequence[int]] | None = None,
                          scheduler_config: dict[str, Any] | None = None) -> RefinerPipeline:
        """A randomly initialised refiner (``"sdxl"`` layout, or ``"tiny"`` for tests) sized for ``tokenizer``."""
        code_channels = tokenizer.semantic_quantizer.dim + tokenizer.pixel_quantizer.dim
        unet, vae, scheduler = build_components(architecture, code_channels, scheduler_config)
        return cls(unet, vae, scheduler, tokenizer, resolutions)

    # ------------------------------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> RefinerPipeline:
        """Move the UNet and the VAE (not the tokenizer, which may be shared) to ``device`` / ``dtype``."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            for module in (self.unet, self.vae):
                module.to(**kwargs)
        return self

    # ------------------------------------------------------------------------------------------ sizes
    def output_size(self, pixel_grid: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of the refiner output for a pixel token grid ``(h, w)``: ``2 * 16h x 2 * 16w``."""
        f = self.tokenizer.downsample_factor
        return UPSCALE * f * int(pixel_grid[0]), UPSCALE * f * int(pixel_grid[1])

    def check_output_size(self, height: int, width: int) -> int:
        """The micro-conditioning index of an output size, or a ValueError listing the supported sizes."""
        index = resolution_index(height, width, self.resolutions)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"output {width}x{height} is not a multiple of the VAE scale factor "
                             f"{self.vae_scale_factor}")
        return index

    @property
    def supported_token_image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of the token images the refiner accepts (half the supported output sizes)."""
        return [(h // UPSCALE, w // UPSCALE) for w, h in self.resolutions]

    # ------------------------------------------------------------------------------------------ pieces
    def code_features(self, semantic_indices: Tensor, pixel_indices: Tensor) -> Tensor:
        """Merged code features ``[B, C_s + C_p, h, w]`` on the UNet's device and dtype."""
        features = code_features(self.tokenizer, semantic_indices, pixel_indices)
        return features.to(device=self.device, dtype=self.dtype)

    def unet_prediction(self, latents: Tensor, timestep: Tensor | int, features: Tensor, index: int | Tensor) -> Tensor:
        """One UNet evaluation: ``[B, 4, H/8, W/8]`` latents (already scaled by the scheduler) + code features
        ``[B, C, h, w]`` -> the model output ``[B, 4, H/8, W/8]`` (noise, velocity or sample per the scheduler)."""
        b = latents.shape[0]
        text = zero_text_conditioning(self.unet, b, device=latents.device, dtype=latents.dtype)
        sample = torch.cat([latents, to_latent_grid(features, latents.shape[-2:]).to(latents.dtype)], dim=1)
        added = {"text_embeds": text.text_embeds,
                 "time_ids": time_ids(index, b, device=latents.device, dtype=latents.dtype)}
        return self.unet(sample, timestep, encoder_hidden_states=text.encoder_hidden_states,
                         added_cond_kwargs=added).sample

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """VAE latents of images ``[B, 3, H, W]`` in [-1, 1], scaled for diffusion: ``[B, 4, H/8, W/8]``."""
        posterior = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=latents.device).view(1, -1, 1, 1)
            return (latents - mean) * cfg.scaling_factor / std
        return latents * cfg.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, 4, h, w]`` -> images ``[B, 3, 8h, 8w]`` in [-1, 1] (SDXL's decode path)."""
        cfg = self.vae.config
        upcast = self.vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
        vae_dtype = self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        try:
            latents = latents.to(self.vae.dtype)
            if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
                mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, -1, 1, 1).to(latents.dtype)
                std = torch.tensor(cfg.latents_std, device=latents.device).view(1, -1, 1, 1).to(latents.dtype)
                latents = latents * std / cfg.scaling_factor + mean
            else:
                latents = latents / cfg.scaling_factor
            images = self.vae.decode(latents).sample
        finally:
            if upcast:
                self.vae.to(vae_dtype)
        return images.float().clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        semantic_indices: Tensor,
        pixel_indices: Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        guidance_rescale: float = 0.0,
        progress: bool = True,
    ) -> Tensor:
        """Decode DualViTok tokens to images at twice the token image size.

        Args:
            semantic_indices: ``[B, hs, ws]`` int64 semantic tokens.
            pixel_indices: ``[B, h, w]`` int64 pixel tokens of an ``16h x 16w`` image.
            num_inference_steps: denoising steps (reference default 50; its demos use 20).
            guidance_scale: classifier-free guidance scale; all-zero code features are the unconditional input.
                ``<= 1`` runs the conditional branch only (reference default 2.0).
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            latents: optional initial noise ``[B, 4, 32h/8, 32w/8]`` (before ``init_noise_sigma`` scaling).
            guidance_rescale: optional CFG rescale factor (0 disables it, the reference default).
            progress: show a progress bar over the denoising steps.

        Returns:
            Images ``[B, 3, 32h, 32w]`` float32 in [-1, 1] on the UNet's device (convert to PIL with
            ``dualvitok.ImageProcessor().postprocess``).
        """
        from diffusers.utils.torch_utils import randn_tensor
        from tqdm.auto import tqdm

        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        features = self.code_features(semantic_indices, pixel_indices)  # [B, C, h, w]
        height, width = self.output_size(tuple(pixel_indices.shape[-2:]))
        index = self.check_output_size(height, width)
        expected_sem = self.tokenizer.grid_sizes(height // UPSCALE, width // UPSCALE)[0]
        if tuple(semantic_indices.shape[-2:]) != tuple(expected_sem):
            logger.warning("semantic grid %s differs from the tokenizer's %s for %dx%d images; decoding anyway",
                           tuple(semantic_indices.shape[-2:]), expected_sem, width // UPSCALE, height // UPSCALE)
        b = features.shape[0]
        shape = (b, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents.to(device=self.device, dtype=self.dtype) * self.scheduler.init_noise_sigma
        use_cfg = guidance_scale > 1.0
        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in step_params else {}  # e.g. PNDM takes none
        if use_cfg:
            features = torch.cat([torch.zeros_like(features), features])  # [uncond; cond]
        for t in tqdm(self.scheduler.timesteps, desc="refiner", disable=not progress):
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            prediction = self.unet_prediction(model_in, t, features, index)
            if use_cfg:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
                if guidance_rescale > 0:
                    prediction = rescale_guidance(prediction, cond, guidance_rescale)
            latents = self.scheduler.step(prediction, t, latents, return_dict=False, **step_kwargs)[0]
        return self.decode_latents(latents)

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the diffusers folder layout: ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``.

        Each component is first written to a temporary folder and then moved into place, so an interrupted save
        never leaves a half-written component. The tokenizer is not saved (pass it again to :meth:`from_pretrained`).
        """
        diffusers = require_diffusers()
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".refiner-", dir=directory))
        try:
            self.unet.save_pretrained(staging / "unet", safe_serialization=True)
            self.vae.save_pretrained(staging / "vae", safe_serialization=True)
            self.scheduler.save_pretrained(staging / "scheduler")
            index = {
                "_class_name": REFERENCE_PIPELINE_CLASS,
                "_diffusers_version": diffusers.__version__,
                "force_zeros_for_empty_prompt": True,
                "scheduler": ["diffusers", type(self.scheduler).__name__],
                "unet": ["diffusers", type(self.unet).__name__],
                "vae": ["diffusers", type(self.vae).__name__],
                SETTINGS_KEY: {"resolutions": [list(r) for r in self.resolutions], "code_channels": self.code_channels},
            }
            (staging / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            for name in COMPONENTS:
                target = directory / name
                if target.exists():
                    old = staging / f"old-{name}"
                    os.replace(target, old)
                os.replace(staging / name, target)
            os.replace(staging / MODEL_INDEX_NAME, directory / MODEL_INDEX_NAME)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        tokenizer,
        *,
        dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | None = None,
        local_files_only: bool | None = None,
        scheduler=None,
        resolutions: Sequence[Sequence[int]] | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> RefinerPipeline:
        """Load a refiner saved by :meth:`save_pretrained` or the released ``ILLUME-MLLM/dualvitok-sdxl-decoder``.

        Args:
            pretrained_model_name_or_path: a folder with ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``,
                or a Hub repo id (downloaded with ``huggingface_hub``; offline it must be in the local cache).
            tokenizer: the :class:`dualvitok.DualViTok` providing the codebooks, or a spec accepted by
                :func:`dualvitok.loading.load_model` (folder, Hub id, ``"demo"``).
            dtype: load the UNet and VAE in this dtype (e.g. ``torch.float16`` on GPU); ``torch_dtype`` is a
                deprecated alias (the library's one dtype keyword is ``dtype``).
            variant: weights variant (e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``).
            scheduler: a diffusers scheduler to use instead of the saved one.
            resolutions: override the supported ``(width, height)`` output sizes.
        """
        from .._weights import dtype_keyword

        torch_dtype = dtype_keyword(dtype, torch_dtype, "RefinerPipeline.from_pretrained")
        diffusers = require_diffusers()
        if isinstance(tokenizer, (str, os.PathLike)):
            from ..loading import load_model

            tokenizer = load_model(tokenizer)
        folder = _resolve_folder(pretrained_model_name_or_path, revision, cache_dir, token, local_files_only)
        index_path = folder / MODEL_INDEX_NAME
        index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
        missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{pretrained_model_name_or_path!s} is not a refiner folder: missing {missing}; "
                                    "expected model_index.json, unet/, vae/ and scheduler/ (see docs/refiner.md)")
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        if variant is not None:
            kwargs["variant"] = variant
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # diffusers would only warn and fall back to this
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs)
        vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs)
        if scheduler is None:
            scheduler = _load_scheduler(diffusers, folder / "scheduler")
        if resolutions is None:
            resolutions = index.get(SETTINGS_KEY, {}).get("resolutions")
        return cls(unet.eval(), vae.eval(), scheduler, tokenizer, resolutions)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(unet in_channels={self.unet.config.in_channels}, "
                f"scheduler={type(self.scheduler).__name__}, outputs={format_resolutions(self.resolutions)})")


def _load_scheduler(diffusers, folder: Path):
    config_path = folder / "scheduler_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no scheduler_config.json in {folder}")
    name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name", "EulerDiscreteScheduler")
    scheduler_cls = getattr(diffusers, str(name), None)
    if scheduler_cls is None or not issubclass(scheduler_cls, diffusers.SchedulerMixin):
        raise ValueError(f"{config_path} names scheduler {name!r}, which is not a diffusers scheduler; pass "
                         "scheduler=... to from_pretrained")
    return scheduler_cls.from_pretrained(folder)


def _resolve_folder(source: str | os.PathLike, revision, cache_dir, token, local_files_only) -> Path:
    from .._hubfiles import snapshot_folder

    return snapshot_folder(source, what="the refiner", revision=revision, cache_dir=cache_dir, token=token,
                           local_files_only=local_files_only,
                           allow_patterns=[MODEL_INDEX_NAME, "unet/*", "vae/*", "scheduler/*"])
