"""Pre-LayerNorm vision transformer block with 2D RoPE, in the batch form of the ILLUME+ semantic branch.

Follows Qwen2-VL's vision block (``Qwen2VLVisionBlock``, arXiv 2409.12191) and the reference's
``Qwen2VLBatchVisionBlock``: ``x += proj(attn(rope(qkv(norm1(x)))))``, ``x += fc2(act(fc1(norm2(x))))`` with
LayerNorm eps 1e-6 and quick-GELU. Attention is full over the sequence of each batch element (no mask), computed with
``F.scaled_dot_product_attention``. Parameter names (``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``) are
those of the reference checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rotary, rotary_cos_sin

QUICK_GELU_ALPHA = 1.702
"""The slope inside quick-GELU's sigmoid."""


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)`` (the activation of CLIP and the Qwen2-VL vision tower)."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def get_activation(name: str):
    """Activation function by name: ``quick_gelu``, ``gelu`` or ``silu``."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; available: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class VisionMlp(nn.Module):
    """``fc2(act(fc1(x)))``. Shape: ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str = "quick_gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = get_activation(hidden_act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE on queries and keys.

    Shape: ``x [B, L, dim]``, ``rope`` = ``(cos, sin)`` each ``[L, 1, head_dim]`` -> ``[B, L, dim]``.
    """

    def __init__(self, dim: int, num_heads: int = 16):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def rotate(self, qkv: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """The rotated queries and keys ``[B, L, 2, H, hd]`` of ``qkv [B, L, 3, H, hd]`` in ``qkv``'s dtype, both
        together (one set of element-wise passes, float32 arithmetic); ``rope`` = ``(cos, sin)``, each
        ``[L, 1, hd]``."""
        cos, sin = rope
        return apply_rotary(qkv[:, :, :2], (cos.unsqueeze(1), sin.unsqueeze(1)))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, attn_mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [B, L, 3, H, hd]
        if rope is not None:
            q, k = self.rotate(qkv, rotary_cos_sin(rope) if torch.is_tensor(rope) else rope).unbind(2)  # [B, L, H, hd]
        else:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        v = qkv[:, :, 2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionBlock(nn.Module):
    """Transformer block of the Qwen2-VL vision tower and of the ILLUME+ semantic encoder head / decoder.

    Args:
        dim: token width.
        num_heads: attention heads (16 in the reference, whatever the width).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        hidden_act: MLP activation (``quick_gelu`` in the reference).

    Shape: ``x [B, L, dim]``, ``rope`` = ``(cos, sin)`` from :func:`~dualvitok.blocks.rope.rotary_cos_sin`
    -> ``[B, L, dim]``.
    """

    def __init__(self, dim: int, num_heads: int = 16, mlp_ratio: float = 4.0, hidden_act: str = "quick_gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = VisionMlp(dim, int(dim * mlp_ratio), hidden_act)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, attn_mask)
        return x + self.mlp(self.norm2(x))
