"""DualViTok: the dual semantic + pixel image tokenizer of ILLUME+ (arXiv 2504.01934), built from this library's parts.

Composition follows the reference ``DualViTok`` (``vision_tokenizer/tokenizer/dualvitok_model.py`` in
``illume-unified-mllm/ILLUME_plus``): the semantic branch (:mod:`dualvitok.semantic`: frozen Qwen2-VL tower, head,
SimVQ, semantic decoder) sees a resized, CLIP-normalised copy of the image; the pixel branch (:mod:`dualvitok.pixel`:
MoVQ encoder with DC blocks, ``pixel_quant_conv``, SimVQ) sees the image at native size. The decoder input is
``[bicubic(semantic codes -> pixel grid); pixel codes]`` (semantic first), passed through ``pixel_post_quant_conv``
and also used as the spatial-norm condition. Module names equal the reference's, so the released checkpoint loads
after :func:`dualvitok.convert.convert_reference_state_dict`. The float32 path here is the reference; the fast path
(:mod:`dualvitok.inference`) swaps inference modules in and owns every dtype/layout cast between stages.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configuration import DualViTokConfig
from .hub import HubMixin
from .inference import install_stage_casts
from .outputs import DualViTokEncoding, DualViTokOutput
from .pixel import PIXEL_DECODER_PARTS, PIXEL_ENCODER_PARTS, PixelDecoder, PixelEncoder, quantizer_from_config
from .quantizers import inject_token_noise
from .semantic import SemanticDecoder, SemanticEncoder, SemanticPreprocessor, semantic_grid_size
from .validation import check_codes, check_images, check_index_grids

logger = logging.getLogger(__name__)

_BRANCH_PARTS = {**{name: ("pixel_encoder_branch", part) for name, part in PIXEL_ENCODER_PARTS.items()},
                 **{name: ("pixel_decoder_branch", part) for name, part in PIXEL_DECODER_PARTS.items()}}


class DualViTok(HubMixin, nn.Module):
    """The DualViTok tokenizer.

    Args:
        config: :class:`DualViTokConfig` (defaults: the released ``dualvitok_anyres_max512``).

    Images are float ``[B, 3, H, W]`` in [-1, 1] with H and W multiples of 16, all of one size per batch.
    Build with :func:`dualvitok.create_model`, load with :meth:`from_pretrained` or :meth:`from_reference`.

    The branches: ``semantic_encoder`` (:class:`~dualvitok.semantic.SemanticEncoder`) with ``semantic_quantizer`` and
    ``semantic_decoder``; ``pixel_encoder_branch`` (:class:`~dualvitok.pixel.PixelEncoder`) and
    ``pixel_decoder_branch`` (:class:`~dualvitok.pixel.PixelDecoder`), whose parts are registered here under the
    checkpoint's names (``pixel_encoder``, ``pixel_quant_conv``, ``pixel_quantizer``, ``pixel_post_quant_conv``,
    ``pixel_decoder``); assigning one of those attributes updates the branch too.
    """

    def __init__(self, config: DualViTokConfig | None = None):
        super().__init__()
        self.config = config = config or DualViTokConfig()
        tower = config.semantic_encoder.semantic_encoder_config
        self.semantic_preprocessor = SemanticPreprocessor(tower.patch_size, tower.temporal_patch_size,
                                                          tower.spatial_merge_size)
        self.semantic_encoder = SemanticEncoder(config.semantic_encoder)
        self.semantic_quantizer = quantizer_from_config(config.semantic_quantizer)
        self.semantic_decoder = SemanticDecoder(config.semantic_decoder)
        # the pixel branch: its parts are registered here under the checkpoint's names (the reference's state-dict
        # keys); the branch objects keep references to them and are not registered themselves
        encoder_branch = PixelEncoder(config.pixel_encoder, config.pixel_quantizer)
        decoder_branch = PixelDecoder(config.pixel_decoder)
        object.__setattr__(self, "pixel_encoder_branch", encoder_branch)
        object.__setattr__(self, "pixel_decoder_branch", decoder_branch)
        for name, (branch, part) in _BRANCH_PARTS.items():
            self.add_module(name, getattr(self.__dict__[branch], part))
        self.downsample_factor = config.pixel_downsample_factor
        self.inference_plan = None  # set by optimize_for_inference (dualvitok.inference.InferencePlan)
        self.init_weights()
        install_stage_casts(self)  # stages in another dtype take and give float32 (forward hooks, no-ops in float32)

    # ------------------------------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Reference init of the semantic transformer parts: xavier-uniform Linear, zero bias, LayerNorm 1/0."""
        for module in (self.semantic_encoder, self.semantic_decoder):
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        part = _BRANCH_PARTS.get(name)
        if part is not None and isinstance(value, nn.Module) and part[0] in self.__dict__:
            setattr(self.__dict__[part[0]], part[1], value)  # a replaced part (e.g. an inference variant)

    def train(self, mode: bool = True) -> DualViTok:
        super().train(mode)
        for branch in ("pixel_encoder_branch", "pixel_decoder_branch"):
            self.__dict__[branch].training = mode  # their parts are children of the tokenizer, already set
        return self

    # ------------------------------------------------------------------------------------------ checks
    def check_images(self, images: Tensor) -> None:
        """Raise a clear error unless ``images`` is a float ``[B, 3, H, W]`` batch in [-1, 1], H, W multiples of 16.

        See :mod:`dualvitok.validation`: the value checks run in eager mode only and can be switched off.
        """
        check_images(images, self.downsample_factor)

    def _check_indices(self, semantic_indices: Tensor, pixel_indices: Tensor) -> None:
        f = self.downsample_factor
        shape = getattr(pixel_indices, "shape", ())
        semantic_grid = self.grid_sizes(shape[1] * f, shape[2] * f)[0] if len(shape) == 3 else (0, 0)
        check_index_grids(semantic_indices, pixel_indices, semantic_grid)
        self.semantic_quantizer.check_indices(semantic_indices)
        self.pixel_quantizer.check_indices(pixel_indices)

    # ------------------------------------------------------------------------------------------ grids
    def grid_sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((hs, ws), (h, w))``: semantic and pixel token grids of an ``height x width`` image."""
        unit = self.semantic_preprocessor.unit
        f = self.downsample_factor
        return semantic_grid_size(height, width, unit), (height // f, width // f)

    # ------------------------------------------------------------------------------------------ fast path
    def optimize_for_inference(self, dtype: torch.dtype | None = torch.bfloat16, channels_last: bool = True,
                               exact_indices: bool | None = None, *, indices: str = "guarded",
                               device: str | torch.device | None = None, compile: bool = False,
                               fuse_conv: bool | None = None, pack_linear: bool | None = None,
                               pack_float32: bool | None = None, pack_conv: bool | None = None,
                               winograd_conv: bool | None = None, native_norm: bool | None = None,
                               native_rope: bool | None = None, keep_freed_memory: bool | None = None) -> DualViTok:
        """Opt-in fast path (inference modules swapped in, bf16 stages); see :mod:`dualvitok.inference`.

        ``indices``: ``"guarded"`` (default; >= 99% of pixel indices equal the float32 path's), ``"exact"`` (equal)
        or ``"fast"``."""
        from .inference import optimize_for_inference

        return optimize_for_inference(self, dtype, channels_last, exact_indices, indices=indices, device=device,
                                      compile=compile, fuse_conv=fuse_conv, pack_linear=pack_linear,
                                      pack_float32=pack_float32, pack_conv=pack_conv, winograd_conv=winograd_conv,
                                      native_norm=native_norm, native_rope=native_rope,
                                      keep_freed_memory=keep_freed_memory)

    # ------------------------------------------------------------------------------------------ API
    def encode(self, images: Tensor) -> DualViTokEncoding:
        """Tokenize images.

        Args:
            images: ``[B, 3, H, W]`` float in [-1, 1], H and W multiples of 16.

        Returns:
            :class:`DualViTokEncoding` (semantic indices ``[B, hs, ws]``, pixel indices ``[B, H/16, W/16]``, codes,
            pre-quantization features, the semantic target and both quantizer losses).
        """
        self.check_images(images)
        pixel_values, grid_thw = self.semantic_preprocessor(images)
        grid = self.semantic_preprocessor.grid(*images.shape[-2:])  # (t, h, w) as ints: no host synchronisation
        semantic = self.semantic_encoder(pixel_values, grid)
        sem_q = self.semantic_quantizer(semantic.features)
        pixel = self.pixel_encoder_branch(images)
        return DualViTokEncoding(
            semantic_indices=sem_q.indices,
            pixel_indices=pixel.indices,
            semantic_codes=sem_q.quantized,
            pixel_codes=pixel.quantized,
            semantic_features=semantic.features,
            pixel_features=pixel.features,
            semantic_target=semantic.target,
            semantic_loss=sem_q.loss,
            pixel_loss=pixel.loss,
            semantic_pixel_values=pixel_values,
            semantic_grid_thw=grid_thw,
        )

    def encode_indices(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images [B,3,H,W]`` -> ``(semantic_indices [B,hs,ws], pixel_indices [B,H/16,W/16])``."""
        enc = self.encode(images)
        return enc.semantic_indices, enc.pixel_indices

    def merge_codes(self, semantic_codes: Tensor, pixel_codes: Tensor) -> Tensor:
        """Decoder input: semantic codes bicubic-resized to the pixel grid, then concatenated before the pixel codes.

        Shape: ``[B, z_s, hs, ws]``, ``[B, z_p, h, w]`` -> ``[B, z_s + z_p, h, w]``. No noise here: training adds
        token noise with :meth:`add_token_noise` (``forward(images, token_noise=True)``).
        """
        if semantic_codes.shape[0] != pixel_codes.shape[0]:
            raise ValueError(f"batch sizes differ: semantic codes {tuple(semantic_codes.shape)} vs pixel codes "
                             f"{tuple(pixel_codes.shape)}")
        semantic = F.interpolate(
            semantic_codes.float(), size=pixel_codes.shape[-2:], mode="bicubic", align_corners=False
        )
        return torch.cat([semantic.to(pixel_codes.dtype), pixel_codes], dim=1)

    def add_token_noise(self, pixel_codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training token noise of the config (``pixel_drop_rate``, ``pixel_drop_batch_rate``,
        ``pixel_noise_type``) applied to pixel codes ``[B, z_p, h, w]``; unchanged when ``pixel_drop_rate`` is unset.

        Training code calls this (the trainer through ``forward(images, token_noise=True)``); the decode path never
        adds noise by itself, whatever the module's mode.
        """
        cfg = self.config
        if not cfg.pixel_drop_rate:
            return pixel_codes
        codebook = self.pixel_quantizer.codebook if cfg.pixel_noise_type == "uniform" else None
        return inject_token_noise(pixel_codes, cfg.pixel_drop_batch_rate, cfg.pixel_drop_rate, cfg.pixel_noise_type,
                                  codebook, generator=generator)

    def decode(self, semantic_codes: Tensor, pixel_codes: Tensor) -> Tensor:
        """Decode codes to images.

        Args:
            semantic_codes: ``[B, z_s, hs, ws]``.
            pixel_codes: ``[B, z_p, h, w]``.

        Returns:
            ``[B, 3, 16h, 16w]``, unclamped (nominally [-1, 1]).
        """
        check_codes(semantic_codes, pixel_codes, self.semantic_quantizer.dim, self.pixel_quantizer.dim)
        return self.pixel_decoder_branch(self.merge_codes(semantic_codes, pixel_codes))

    def decode_indices(self, semantic_indices: Tensor, pixel_indices: Tensor) -> Tensor:
        """Decode integer tokens: ``[B, hs, ws]``, ``[B, h, w]`` -> images ``[B, 3, 16h, 16w]``."""
        self._check_indices(semantic_indices, pixel_indices)
        return self.decode(self.semantic_quantizer.indices_to_codes(semantic_indices),
                           self.pixel_quantizer.indices_to_codes(pixel_indices))

    def decode_semantic(self, semantic_codes: Tensor) -> Tensor:
        """Semantic decoder: ``[B, z_s, hs, ws] -> [B, C_vit, hs, ws]`` (compare with ``semantic_target``)."""
        return self.semantic_decoder(semantic_codes)

    def forward(self, images: Tensor, token_noise: bool = False) -> DualViTokOutput:
        """Encode and decode: images ``[B, 3, H, W]`` -> :class:`DualViTokOutput`.

        ``token_noise``: decode pixel codes with the config's training token noise (:meth:`add_token_noise`); the
        trainer passes it, nothing else does.
        """
        enc = self.encode(images)
        pixel_codes = self.add_token_noise(enc.pixel_codes) if token_noise else enc.pixel_codes
        return DualViTokOutput(
            reconstruction=self.decode(enc.semantic_codes, pixel_codes),
            semantic_reconstruction=self.decode_semantic(enc.semantic_codes),
            encoding=enc,
        )

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_reference(
        cls,
        config: dict | str | os.PathLike,
        weights: dict[str, Tensor] | str | os.PathLike,
        use_ema: bool = False,
        strict: bool = True,
        check_weights: bool = True,
    ) -> DualViTok:
        """Build from a reference-layout config and weights in reference key names.

        Args:
            config: reference config (nested dict, or path to a JSON file).
            weights: a state dict, or a path to ``.safetensors`` / ``.bin`` / ``.pt`` (loaded with
                ``weights_only=True``); a ``model`` / ``ema`` / ``state_dict`` wrapper is unwrapped.
            use_ema: take the ``ema`` weights of a training checkpoint.
            strict: raise on missing or unexpected keys (with a readable report).
            check_weights: refuse NaN/Inf values and non-float weights.
        """
        from .convert import load_reference

        return load_reference(cls, config, weights, use_ema=use_ema, strict=strict, check_weights=check_weights)
