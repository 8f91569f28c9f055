"""A Qwen2-VL-compatible vision tower: patch embedding, 2D-RoPE transformer blocks and the 2x2 patch merger.

Follows Qwen2-VL (Wang et al., 2024, arXiv 2409.12191; ``Qwen2VisionTransformerPretrainedModel`` in transformers) as
loaded by ILLUME+ from ``Emova-ollm/qwen2vit600m`` (the Qwen2-VL-7B tower). Parameter names match that checkpoint
(``patch_embed.proj``, ``blocks.{i}``, ``merger.ln_q``, ``merger.mlp.{0,2}``) so its weights load unchanged.

Differences: attention runs per image as a batch (images of one grid size are stacked; no dense block-diagonal mask
is built), and the patch embedding is computed as a matrix product with the Conv3d weight (the same arithmetic as
the reference's NPU path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import VisionRotaryEmbedding, grid_positions, rotary_cos_sin
from .vit import VisionBlock


@dataclass
class Qwen2VisionConfig:
    """Configuration of the tower; defaults are the Qwen2-VL-7B tower used by the released DualViTok."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    hidden_size: int = 3584  # merger output width
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"


class PatchEmbed(nn.Module):
    """Flattened patches ``[N, C*T*P*P] -> [N, embed_dim]`` with a bias-free Conv3d-shaped weight."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, temporal_patch_size: int):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.proj.weight
        return F.linear(x.to(weight.dtype), weight.view(weight.shape[0], -1))


class PatchMerger(nn.Module):
    """LayerNorm, then each ``m x m`` block of consecutive tokens concatenated and mapped by a 2-layer GELU MLP.

    Shape: ``[N, embed_dim] -> [N / m^2, hidden_size]``.
    """

    def __init__(self, embed_dim: int, hidden_size: int, merge_size: int = 2):
        super().__init__()
        self.merged_dim = embed_dim * merge_size**2
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, hidden_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))  # [N/m^2, m^2 * C] -> [N/m^2, hidden]


class Qwen2VisionTower(nn.Module):
    """The Qwen2-VL vision transformer.

    Args:
        config: :class:`Qwen2VisionConfig`.

    Shape:
        ``pixel_values [N, C*T*P*P]`` (patches of all images, each image's patches in 2x2-merge order),
        ``grid_thw [B, 3]`` (patches per image along t, h, w) -> merged tokens ``[N / 4, hidden_size]``.
    """

    def __init__(self, config: Qwen2VisionConfig | None = None):
        super().__init__()
        self.config = config = config or Qwen2VisionConfig()
        self.patch_embed = PatchEmbed(
            config.in_channels, config.embed_dim, config.patch_size, config.temporal_patch_size
        )
        head_dim = config.embed_dim // config.num_heads
        self.rotary_pos_emb = VisionRotaryEmbedding(head_dim // 2)
        self.blocks = nn.ModuleList(
            VisionBlock(config.embed_dim, config.num_heads, config.mlp_ratio, config.hidden_act)
            for _ in range(config.depth)
        )
        self.merger = PatchMerger(config.embed_dim, config.hidden_size, config.spatial_merge_size)

    def positions(self, t: int, h: int, w: int, device=None) -> Tensor:
        """(row, col) on the patch grid of one image in sequence order, ``[t*h*w, 2]``."""
        return grid_positions(h, w, self.config.spatial_merge_size, device).repeat(t, 1)

    def forward_features(self, pixel_values: Tensor, grid_thw: Tensor | tuple[int, int, int]) -> Tensor:
        """Hidden states after the last block, before the merger: ``[N, embed_dim]``.

        ``grid_thw`` is the ``[B, 3]`` tensor of Qwen2-VL (read on the host; images may differ in size), or one
        ``(t, h, w)`` tuple shared by every image: then nothing is read from the device, so the tower compiles
        (``torch.compile(fullgraph=True)``) and exports with a dynamic number of images.
        """
        if pixel_values.ndim != 2:
            raise ValueError(f"pixel_values must be flattened patches [N, C*T*P*P], got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)  # [N, C]
        if torch.is_tensor(grid_thw):
            grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
            lengths = [t * h * w for t, h, w in grids]
            if sum(lengths) != pixel_values.shape[0]:
                raise ValueError(f"grid_thw describes {sum(lengths)} patches but pixel_values has "
                                 f"{pixel_values.shape[0]}")
            if not grids:
                raise ValueError("grid_thw is empty (no images); pass at least one image")
            if len(set(grids)) == 1:
                groups = [(grids[0], x.view(len(grids), lengths[0], -1))]  # one batch [B, L, C]
            else:
                groups = [(g, chunk.unsqueeze(0)) for g, chunk in zip(grids, x.split(lengths), strict=True)]
        else:
            t, h, w = (int(v) for v in grid_thw)
            length = t * h * w
            if length == 0 or pixel_values.shape[0] % length:
                raise ValueError(f"grid (t, h, w) = {(t, h, w)} does not divide the {pixel_values.shape[0]} patches "
                                 "of pixel_values into whole images")
            groups = [((t, h, w), x.view(-1, length, x.shape[-1]))]  # [B, L, C], B may be symbolic
        outputs = []
        for (t, h, w), tokens in groups:
            rope = rotary_cos_sin(self.rotary_pos_emb(self.positions(t, h, w, x.device)))  # 2 x [L, 1, head_dim]
            for block in self.blocks:
                tokens = block(tokens, rope)
            outputs.append(tokens.reshape(-1, tokens.shape[-1]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor | tuple[int, int, int]) -> Tensor:
        return self.merger(self.forward_features(pixel_values, grid_thw))
