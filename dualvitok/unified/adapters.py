"""Continuous image input of the unified MLLM: the dual vision tower and the two MLP adapters.

Follows ILLUME+ (``illume/model/multimodal_encoder/dual_encoder.py`` ``DualVisionTower`` and
``illume/model/multimodal_projector`` ``MixedProjector`` in ``illume-unified-mllm/ILLUME_plus``): the tower keeps only
DualViTok's Qwen2-VL vision transformer (its merger output, one vector per 28x28 region, before DualViTok's target
norm and head) and its MoVQ pixel encoder (output before ``pixel_quant_conv``, stride 16); each goes through
``Linear -> GELU -> Linear`` into the LLM's width. Parameter names equal the reference's (``vision_tower.
semantic_encoder.*``, ``vision_tower.pixel_encoder.*``, ``mm_projector.projector_{1,2}.{0,2}.*``). Difference:
``semantic_feature="target"`` optionally uses DualViTok's LayerNorm'd target instead of the raw merger output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..configuration import DualViTokConfig
from ..model import DualViTok
from ..pixel import movq_encoder
from ..semantic import SemanticPreprocessor, build_vision_tower


@dataclass
class VisionFeatures:
    """Continuous features of a batch: ``semantic [B, C_vit, hs, ws]`` and ``pixel [B, z, H/16, W/16]``."""

    semantic: Tensor
    pixel: Tensor


class DualVisionTower(nn.Module):
    """DualViTok's two encoders without quantizers or decoders.

    Args:
        config: the :class:`DualViTokConfig` of the vision tokenizer.
        semantic_feature: ``"tower"`` (the reference: raw merger output) or ``"target"`` (LayerNorm'd, no affine).

    Shape: images ``[B, 3, H, W]`` in [-1, 1] -> :class:`VisionFeatures`.
    """

    def __init__(self, config: DualViTokConfig, semantic_feature: str = "tower"):
        super().__init__()
        if semantic_feature not in ("tower", "target"):
            raise ValueError(f"semantic_feature must be 'tower' or 'target', got {semantic_feature!r}")
        tower = config.semantic_encoder.semantic_encoder_config
        pe = config.pixel_encoder
        self.semantic_feature = semantic_feature
        self.semantic_preprocessor = SemanticPreprocessor(tower.patch_size, tower.temporal_patch_size,
                                                          tower.spatial_merge_size)
        self.semantic_encoder = build_vision_tower(config.semantic_encoder)  # Qwen2-VL, or the timm tower option
        self.pixel_encoder = movq_encoder(pe)
        self.semantic_dim = tower.hidden_size
        self.pixel_dim = self.pixel_encoder.out_channels

    @classmethod
    def from_dualvitok(cls, model: DualViTok, semantic_feature: str = "tower") -> DualVisionTower:
        """A tower initialised with (copies of) a DualViTok's encoder weights."""
        tower = cls(model.config, semantic_feature)
        tower.semantic_encoder.load_state_dict(model.semantic_encoder.model.state_dict())
        tower.pixel_encoder.load_state_dict(model.pixel_encoder.state_dict())
        return tower.to(next(model.parameters()).device)

    def forward(self, images: Tensor) -> VisionFeatures:
        b = images.shape[0]
        pixel_values, grid_thw = self.semantic_preprocessor(images)
        merge = self.semantic_preprocessor.merge_size
        hs, ws = int(grid_thw[0, 1]) // merge, int(grid_thw[0, 2]) // merge
        dtype = next(self.semantic_encoder.parameters()).dtype
        semantic = self.semantic_encoder(pixel_values.to(dtype), grid_thw.to(images.device))  # [B*hs*ws, C_vit]
        if self.semantic_feature == "target":
            semantic = F.layer_norm(semantic, semantic.shape[-1:], eps=1e-6)
        semantic = semantic.reshape(b, hs, ws, -1).permute(0, 3, 1, 2)  # [B, C_vit, hs, ws]
        pixel = self.pixel_encoder(images.to(next(self.pixel_encoder.parameters()).dtype))  # [B, z, H/16, W/16]
        return VisionFeatures(semantic, pixel)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class MixedProjector(nn.Module):
    """Two MLP adapters (depth 2, no pre-norm): semantic ``C_vit -> D`` (``projector_1``), pixel ``z -> D``
    (``projector_2``).

    Shape: ``[..., C_vit] -> [..., D]`` and ``[..., z] -> [..., D]``.
    """

    def __init__(self, semantic_dim: int, pixel_dim: int, hidden_size: int):
        super().__init__()
        self.projector_1 = _mlp(semantic_dim, hidden_size)
        self.projector_2 = _mlp(pixel_dim, hidden_size)

    def forward(self, features: VisionFeatures) -> tuple[Tensor, Tensor]:
        """-> ``(semantic [B, hs*ws, D], pixel [B, h*w, D])`` in raster order."""
        semantic = self.projector_1(features.semantic.flatten(2).transpose(1, 2))  # [B, hs*ws, D]
        pixel = self.projector_2(features.pixel.flatten(2).transpose(1, 2))  # [B, h*w, D]
        return semantic, pixel

