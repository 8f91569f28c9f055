"""2D rotary position embedding of the Qwen2-VL vision tower (Su et al., RoFormer; Qwen2-VL, arXiv 2409.12191).

A head of size ``d`` is rotated with ``d/4`` frequencies for the row and ``d/4`` for the column:
angles ``[row * f, col * f]`` (``d/2`` values), tiled to ``d`` and applied as ``x cos + rotate_half(x) sin`` in
float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VisionRotaryEmbedding(nn.Module):
    """Angles for 2D positions.

    Args:
        dim: number of angles per position, ``head_dim // 2``; ``dim // 2`` frequencies per axis.
        theta: frequency base.

    Shape: ``positions [L, 2]`` (row, col; integers) -> ``angles [L, dim]`` float32.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        inv_freq = self.inv_freq.float()
        pos = positions.to(device=inv_freq.device, dtype=torch.float)  # [L, 2]
        return torch.cat([torch.outer(pos[:, 0], inv_freq), torch.outer(pos[:, 1], inv_freq)], dim=-1)  # [L, dim]


def grid_positions(height: int, width: int, merge_size: int = 1, device=None) -> Tensor:
    """(row, col) of every cell of an ``height x width`` grid, ``[H*W, 2]`` int64.

    With ``merge_size = m > 1`` cells are ordered in ``m x m`` blocks (raster over blocks, raster inside a block),
    the order of the Qwen2-VL patch sequence; with ``m = 1`` plain raster order.
    """
    rows = torch.arange(height, device=device).unsqueeze(1).expand(height, width)
    cols = torch.arange(width, device=device).unsqueeze(0).expand(height, width)
    if merge_size > 1:
        m = merge_size
        # [H, W] -> [H/m, m, W/m, m] -> [H/m, W/m, m, m]
        rows = rows.reshape(height // m, m, width // m, m).permute(0, 2, 1, 3)
        cols = cols.reshape(height // m, m, width // m, m).permute(0, 2, 1, 3)
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_cos_sin(angles: Tensor) -> tuple[Tensor, Tensor]:
    """``angles [L, d/2]`` -> ``(cos, sin)``, each ``[L, 1, d]`` float32 (the half angles tiled twice).

    Compute once per forward and pass to every block (``apply_rotary``).
    """
    angles = angles.float()
    return angles.cos().repeat(1, 2).unsqueeze(-2), angles.sin().repeat(1, 2).unsqueeze(-2)


def apply_rotary(x: Tensor, rope: tuple[Tensor, Tensor] | Tensor) -> Tensor:
    """Rotate ``x [..., L, H, d]`` by ``rope`` = ``(cos, sin)`` from :func:`rotary_cos_sin` (or raw ``angles
    [L, d/2]``), in float32 (float64 for a float64 ``x``); returns the input dtype.

    ``x * cos + rotate_half(x) * sin`` computed by halves, ``[x1 c1 - x2 s1, x2 c2 + x1 s2]``, without the
    concatenated copy of ``rotate_half``: the same products and sums, so bitwise the formula's values. A bf16/fp16
    ``x`` (often a strided view of a fused qkv projection) is cast to float32 once rather than by each of the three
    products.
    """
    cos, sin = rotary_cos_sin(rope) if torch.is_tensor(rope) else rope
    cos, sin = cos.float(), sin.float()
    half = x.shape[-1] // 2
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # exact: the products' own promotion
    x1, x2 = xf[..., :half], xf[..., half:]
    out = xf * cos
    out[..., :half].sub_(x2 * sin[..., :half])
    out[..., half:].add_(x1 * sin[..., half:])
    return out.to(x.dtype)
