"""DualViTok: the dual semantic + pixel image tokenizer of ILLUME+ (arXiv 2504.01934), built from this library's parts.

Composition follows the reference ``DualViTok`` (``vision_tokenizer/tokenizer/dualvitok_model.py``): the semantic
branch (frozen Qwen2-VL tower, head, SimVQ, semantic decoder) sees a resized, CLIP-normalised copy of the image; the
pixel branch (MoVQ encoder with DC blocks, ``pixel_quant_conv``, SimVQ) sees the image at native size. The decoder
input is ``[bicubic(semantic codes -> pixel grid); pixel codes]`` (semantic first), passed through
``pixel_post_quant_conv`` and also used as the spatial-norm condition. Module names equal the reference's, so the
released checkpoint loads after :func:`dualvitok.convert.convert_reference_state_dict`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks.movq import MoVQDecoder, MoVQEncoder
from .configuration import DualViTokConfig, MoVQConfig, QuantizerConfig
from .hub import HubMixin
from .outputs import DualViTokEncoding, DualViTokOutput
from .quantizers import Quantizer, build_quantizer, inject_token_noise
from .semantic import SemanticDecoder, SemanticEncoder, SemanticPreprocessor, semantic_grid_size
from .validation import check_codes, check_images, check_index_grids

logger = logging.getLogger(__name__)


def _build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    return build_quantizer(cfg.type, **cfg.quantizer_kwargs())  # only the options that apply to cfg.type


def _movq_kwargs(cfg: MoVQConfig) -> dict[str, Any]:
    return {
        "ch": cfg.ch,
        "ch_mult": tuple(cfg.ch_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_resolutions": tuple(cfg.attn_resolutions),
        "z_channels": cfg.z_channels,
        "dropout": cfg.dropout,
        "use_dc_up_down_blocks": cfg.use_dc_up_down_blocks,
    }


class DualViTok(HubMixin, nn.Module):
    """The DualViTok tokenizer.

    Args:
        config: :class:`DualViTokConfig` (defaults: the released ``dualvitok_anyres_max512``).

    Images are float ``[B, 3, H, W]`` in [-1, 1] with H and W multiples of 16, all of one size per batch.
    Build with :func:`dualvitok.create_model`, load with :meth:`from_pretrained` or :meth:`from_reference`.
    """

    def __init__(self, config: DualViTokConfig | None = None):
        super().__init__()
        self.config = config = config or DualViTokConfig()
        tower = config.semantic_encoder.semantic_encoder_config
        self.semantic_preprocessor = SemanticPreprocessor(tower.patch_size, tower.temporal_patch_size,
                                                          tower.spatial_merge_size)
        self.semantic_encoder = SemanticEncoder(config.semantic_encoder)
        self.semantic_quantizer = _build_quantizer(config.semantic_quantizer)
        self.semantic_decoder = SemanticDecoder(config.semantic_decoder)
        pe, pd = config.pixel_encoder, config.pixel_decoder
        self.pixel_encoder = MoVQEncoder(in_channels=pe.in_channels, double_z=pe.double_z, **_movq_kwargs(pe))
        self.pixel_quant_conv = nn.Conv2d(pe.z_channels * (2 if pe.double_z else 1), pe.embed_dim, 1)
        self.pixel_quantizer = _build_quantizer(config.pixel_quantizer)
        self.pixel_post_quant_conv = nn.Conv2d(pd.embed_dim, pd.z_channels, 1)
        self.pixel_decoder = MoVQDecoder(out_channels=pd.out_channels, zq_channels=pd.embed_dim, **_movq_kwargs(pd))
        self.downsample_factor = config.pixel_downsample_factor
        self.channels_last = False  # set by optimize_for_inference (fast path)
        self.init_weights()

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
                               exact_indices: bool = True) -> DualViTok:
        """Opt-in fast path (bf16 stages, channels_last convs, exact indices); see :mod:`dualvitok.inference`."""
        from .inference import optimize_for_inference

        return optimize_for_inference(self, dtype, channels_last, exact_indices)

    @staticmethod
    def _stage_dtype(module: nn.Module) -> torch.dtype:
        """The floating dtype a stage computes in (its first parameter's): float32, or bf16 on the fast path."""
        return next(module.parameters()).dtype

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
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        se = self.semantic_encoder
        pixel_values, grid_thw = self.semantic_preprocessor(images)
        grid = self.semantic_preprocessor.grid(*images.shape[-2:])  # (t, h, w) as ints: no host synchronisation
        tower_features, target = se.forward_tower(pixel_values, grid)  # frozen tower: bf16 on the fast path
        hs, ws = se.grid_size(grid)[1:]
        features = se.forward_head(target.to(self._stage_dtype(se.proj_in)), hs, ws)
        sem_q = self.semantic_quantizer(se.to_map(features, hs, ws).float())
        pixel_features = self.pixel_quant_conv(self.pixel_encoder(images.to(self._stage_dtype(self.pixel_encoder))))
        pixel_features = pixel_features.float()
        pix_q = self.pixel_quantizer(pixel_features)
        semantic_features, semantic_target = se.to_map(features, hs, ws).float(), se.to_map(target, hs, ws).float()
        return DualViTokEncoding(
            semantic_indices=sem_q.indices,
            pixel_indices=pix_q.indices,
            semantic_codes=sem_q.quantized,
            pixel_codes=pix_q.quantized,
            semantic_features=semantic_features,
            pixel_features=pixel_features,
            semantic_target=semantic_target,
            semantic_loss=sem_q.loss,
            pixel_loss=pix_q.loss,
            semantic_pixel_values=pixel_values,
            semantic_grid_thw=grid_thw,
        )

    def encode_indices(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images [B,3,H,W]`` -> ``(semantic_indices [B,hs,ws], pixel_indices [B,H/16,W/16])``."""
        enc = self.encode(images)
        return enc.semantic_indices, enc.pixel_indices

    def merge_codes(self, semantic_codes: Tensor, pixel_codes: Tensor) -> Tensor:
        """Decoder input: semantic codes bicubic-resized to the pixel grid, then concatenated before the pixel codes.

        Shape: ``[B, z_s, hs, ws]``, ``[B, z_p, h, w]`` -> ``[B, z_s + z_p, h, w]``. Token noise is applied to the
        pixel codes here in training when ``config.pixel_drop_rate`` is set.
        """
        if semantic_codes.shape[0] != pixel_codes.shape[0]:
            raise ValueError(f"batch sizes differ: semantic codes {tuple(semantic_codes.shape)} vs pixel codes "
                             f"{tuple(pixel_codes.shape)}")
        semantic = F.interpolate(
            semantic_codes.float(), size=pixel_codes.shape[-2:], mode="bicubic", align_corners=False
        )
        if self.training and self.config.pixel_drop_rate:
            codebook = self.pixel_quantizer.codebook if self.config.pixel_noise_type == "uniform" else None
            pixel_codes = inject_token_noise(pixel_codes, self.config.pixel_drop_batch_rate,
                                             self.config.pixel_drop_rate, self.config.pixel_noise_type, codebook)
        return torch.cat([semantic.to(pixel_codes.dtype), pixel_codes], dim=1)

    def decode(self, semantic_codes: Tensor, pixel_codes: Tensor) -> Tensor:
        """Decode codes to images.

        Args:
            semantic_codes: ``[B, z_s, hs, ws]``.
            pixel_codes: ``[B, z_p, h, w]``.

        Returns:
            ``[B, 3, 16h, 16w]``, unclamped (nominally [-1, 1]).
        """
        check_codes(semantic_codes, pixel_codes, self.semantic_quantizer.dim, self.pixel_quantizer.dim)
        merged = self.merge_codes(semantic_codes, pixel_codes)
        if self.channels_last:
            merged = merged.contiguous(memory_format=torch.channels_last)
        merged = merged.to(self._stage_dtype(self.pixel_decoder))  # bf16 on the fast path
        return self.pixel_decoder(self.pixel_post_quant_conv(merged), merged).float()

    def decode_indices(self, semantic_indices: Tensor, pixel_indices: Tensor) -> Tensor:
        """Decode integer tokens: ``[B, hs, ws]``, ``[B, h, w]`` -> images ``[B, 3, 16h, 16w]``."""
        self._check_indices(semantic_indices, pixel_indices)
        return self.decode(self.semantic_quantizer.indices_to_codes(semantic_indices),
                           self.pixel_quantizer.indices_to_codes(pixel_indices))

    def decode_semantic(self, semantic_codes: Tensor) -> Tensor:
        """Semantic decoder: ``[B, z_s, hs, ws] -> [B, C_vit, hs, ws]`` (compare with ``semantic_target``)."""
        return self.semantic_decoder(semantic_codes.to(self._stage_dtype(self.semantic_decoder))).float()

    def forward(self, images: Tensor) -> DualViTokOutput:
        """Encode and decode: images ``[B, 3, H, W]`` -> :class:`DualViTokOutput`."""
        enc = self.encode(images)
        return DualViTokOutput(
            reconstruction=self.decode(enc.semantic_codes, enc.pixel_codes),
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
