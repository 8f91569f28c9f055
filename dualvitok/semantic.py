"""The semantic branch of DualViTok: input scaling, frozen vision tower + trainable head, and semantic decoder.

Follows the ILLUME+ reference (``ScalingLayerForQwen2ViT``, ``Qwen2VLSemanticEncoder``-style head and the semantic
decoder in ``dualvitok_model.py``): images in [-1, 1] are resized (bicubic, antialiased) to multiples of 28 with the
reference's resolution mapping, normalised with the OpenAI-CLIP statistics and patchified in the 2x2-merge order of
Qwen2-VL; the tower's merger output is LayerNorm'd (no affine) into the regression target, projected, run through
transformer blocks with raster 2D RoPE on the merged grid, and projected to the code dimension.

Differences: the head's ``proj_in`` is a ``Linear`` (the reference stores a 1x1 Conv2d weight and applies it as a
linear map; :mod:`dualvitok.convert` reshapes it), the frozen tower runs without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks.qwen2_vit import Qwen2VisionTower
from .blocks.rope import VisionRotaryEmbedding, grid_positions, rotary_cos_sin
from .blocks.vit import VisionBlock
from .configuration import SemanticDecoderConfig, SemanticEncoderConfig
from .outputs import SemanticEncoderOutput

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESOLUTION_MAPPING: dict[tuple[int, int], tuple[int, int]] = {
    (256, 256): (252, 252),
    (512, 512): (504, 504),
    (512, 384): (448, 336),
    (384, 512): (336, 448),
    (768, 384): (728, 364),
    (384, 768): (364, 728),
    (1024, 256): (1008, 252),
    (256, 1024): (252, 1008),
    (384, 576): (336, 504),
    (576, 384): (504, 336),
    (960, 320): (924, 308),
    (320, 960): (308, 924),
}
"""Reference mapping from image size (H, W) to the semantic branch's input size; others floor to multiples of 28."""


def semantic_input_size(height: int, width: int, unit: int = 28) -> tuple[int, int]:
    """Size the semantic branch resizes an ``height x width`` image to (the reference's rule).

    ``RESOLUTION_MAPPING`` when the pair is a key, else each side floored to a multiple of ``unit`` (at least ``unit``).
    """
    if unit == 28 and (height, width) in RESOLUTION_MAPPING:
        return RESOLUTION_MAPPING[(height, width)]
    return max(unit, height // unit * unit), max(unit, width // unit * unit)


def semantic_grid_size(height: int, width: int, unit: int = 28) -> tuple[int, int]:
    """Semantic token grid ``(hs, ws)`` of an ``height x width`` image."""
    hs, ws = semantic_input_size(height, width, unit)
    return hs // unit, ws // unit


class SemanticPreprocessor(nn.Module):
    """Images in [-1, 1] -> the vision tower's flattened patches (the reference's ``ScalingLayerForQwen2ViT``).

    Shape: ``[B, 3, H, W]`` -> ``(pixel_values [B*gh*gw, 3*T*P*P], grid_thw [B, 3])`` with ``gh = Hs/P``.
    """

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
        super().__init__()
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def unit(self) -> int:
        return self.patch_size * self.merge_size

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = images.shape
        hs, ws = semantic_input_size(h, w, self.unit)
        x = (images + 1) / 2
        x = F.interpolate(x.float(), size=(hs, ws), mode="bicubic", align_corners=False, antialias=True)
        x = x.to(images.dtype).clamp(0, 1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        p, t, m = self.patch_size, self.temporal_patch_size, self.merge_size
        gh, gw = hs // p, ws // p
        x = x.unsqueeze(1).expand(b, t, c, hs, ws)  # the single frame repeated over the temporal patch
        x = x.reshape(b, t, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [B, gh/m, gw/m, m, m, C, T, P, P]
        pixel_values = x.reshape(b * gh * gw, c * t * p * p)
        grid_thw = torch.tensor([[1, gh, gw]], dtype=torch.long).repeat(b, 1)  # [B, 3]; b may be symbolic (export)
        return pixel_values, grid_thw

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``(t, gh, gw)``: the patch grid every ``height x width`` image gets (the rows of ``grid_thw``), as ints.

        Pass it instead of ``grid_thw`` to the tower where no host synchronisation may happen (compile, export).
        """
        hs, ws = semantic_input_size(int(height), int(width), self.unit)
        return 1, hs // self.patch_size, ws // self.patch_size


def _projection(kind: str, in_dim: int, out_dim: int, eps: float = 1e-5) -> nn.Sequential:
    """``Sequential(Linear)`` ('linear') or ``Sequential(Linear, LayerNorm)`` ('linear_norm'), reference indices."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    if kind == "linear_norm":
        layers.append(nn.LayerNorm(out_dim, eps=eps))
    elif kind != "linear":
        raise ValueError(f"unknown proj_layer {kind!r}; use 'linear' or 'linear_norm'")
    return nn.Sequential(*layers)


class _RopeTransformer(nn.Module):
    """Vision blocks with raster 2D RoPE on an ``h x w`` token grid (the batch form of the reference)."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.rotary_pos_emb = VisionRotaryEmbedding((dim // num_heads) // 2)
        self.blocks = nn.ModuleList(VisionBlock(dim, num_heads, mlp_ratio) for _ in range(num_blocks))

    def run_blocks(self, x: Tensor, height: int, width: int) -> Tensor:
        """``x [B, h*w, dim]`` in raster order -> ``[B, h*w, dim]``."""
        rope = rotary_cos_sin(self.rotary_pos_emb(grid_positions(height, width)))  # 2 x [h*w, 1, head_dim]
        for block in self.blocks:
            x = block(x, rope)
        return x


def build_vision_tower(config: SemanticEncoderConfig) -> nn.Module:
    """The semantic branch's vision tower: the Qwen2-VL ViT, or a timm model when ``config.timm_model`` is set
    (same interface, see :mod:`dualvitok.timm_tower`): ``(pixel_values [N, 1176], grid_thw [B, 3]) -> [N/4, C_vit]``.
    """
    if config.timm_model:
        from .timm_tower import TimmVisionTower

        return TimmVisionTower(config.timm_model, config.semantic_encoder_config)
    return Qwen2VisionTower(config.semantic_encoder_config)


class SemanticEncoder(_RopeTransformer):
    """Frozen Qwen2-VL tower, LayerNorm target and trainable transformer head.

    Shape: ``pixel_values [N, 1176]``, ``grid_thw [B, 3]`` -> :class:`SemanticEncoderOutput` with
    ``features [B, z, hs, ws]`` and ``target [B, C_vit, hs, ws]``; all images must share one grid.
    """

    def __init__(self, config: SemanticEncoderConfig):
        super().__init__(config.embed_dim, config.num_blocks, config.num_heads, config.mlp_ratio)
        tower = config.semantic_encoder_config
        self.config = config
        self.model = build_vision_tower(config)
        self.model.requires_grad_(False)
        self.merge_size = tower.spatial_merge_size
        if config.target_mlp == "norm":
            self.target_mlp = nn.Sequential(nn.LayerNorm(tower.hidden_size, eps=1e-6, elementwise_affine=False))
        else:
            self.target_mlp = nn.Sequential()
        self.proj_in = nn.Linear(tower.hidden_size, config.embed_dim)
        self.proj_out = _projection(config.proj_layer, config.embed_dim, config.z_channels)

    def grid_size(self, grid_thw: Tensor | tuple[int, int, int]) -> tuple[int, int, int]:
        """``(B, hs, ws)`` of the merged token grid; all images must share one grid.

        ``grid_thw`` is the ``[B, 3]`` tensor of the preprocessor (read on the host), or one ``(t, h, w)`` tuple
        shared by every image (no host synchronisation; ``B`` is then returned as -1, any number of images).
        """
        if not torch.is_tensor(grid_thw):
            t, h, w = (int(v) for v in grid_thw)
            return -1, h // self.merge_size, w // self.merge_size
        grids = grid_thw.tolist()
        if any(g != grids[0] for g in grids):
            raise ValueError(f"all images of a batch must have the same semantic grid, got {grids}; group by size")
        if not grids:
            raise ValueError("grid_thw is empty (no images); pass at least one image")
        return len(grids), grids[0][1] // self.merge_size, grids[0][2] // self.merge_size

    def forward_tower(self, pixel_values: Tensor, grid_thw: Tensor | tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """Frozen tower, no autograd: ``(tower_features, target)``, each ``[B, hs*ws, C_vit]``.

        ``grid_thw``: ``[B, 3]`` tensor or one ``(t, h, w)`` tuple shared by all images (see :meth:`grid_size`).
        """
        _, hs, ws = self.grid_size(grid_thw)
        with torch.no_grad():
            tower_features = self.model(pixel_values, grid_thw)  # [B*hs*ws, C_vit]
            target = self.target_mlp(tower_features)
        return tower_features.view(-1, hs * ws, tower_features.shape[-1]), target.view(-1, hs * ws, target.shape[-1])

    def forward_head(self, target: Tensor, height: int, width: int) -> Tensor:
        """Trainable head: ``target [B, hs*ws, C_vit]`` -> features ``[B, hs*ws, z]``."""
        x = self.proj_in(target)  # [B, hs*ws, embed]
        return self.proj_out(self.run_blocks(x, height, width))  # [B, hs*ws, z]

    @staticmethod
    def to_map(tokens: Tensor, height: int, width: int) -> Tensor:
        """``[B, h*w, C] -> [B, C, h, w]`` (raster order)."""
        return tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> SemanticEncoderOutput:
        _, hs, ws = self.grid_size(grid_thw)
        tower_features, target = self.forward_tower(pixel_values, grid_thw)
        features = self.forward_head(target, hs, ws)
        return SemanticEncoderOutput(*(self.to_map(t, hs, ws) for t in (features, target, tower_features)))


class SemanticDecoder(_RopeTransformer):
    """Semantic codes back to the tower's feature space.

    Shape: ``[B, z, hs, ws] -> [B, output_channels, hs, ws]``.
    """

    def __init__(self, config: SemanticDecoderConfig):
        super().__init__(config.embed_dim, config.num_blocks, config.num_heads, config.mlp_ratio)
        self.config = config
        self.proj_in = nn.Linear(config.z_channels, config.embed_dim)
        self.proj_out = _projection(config.proj_layer, config.embed_dim, config.output_channels)

    def forward(self, codes: Tensor) -> Tensor:
        b, _, h, w = codes.shape
        x = self.proj_in(codes.flatten(2).transpose(1, 2))  # [B, h*w, embed]
        x = self.proj_out(self.run_blocks(x, h, w))  # [B, h*w, out]
        return x.transpose(1, 2).reshape(b, -1, h, w)
