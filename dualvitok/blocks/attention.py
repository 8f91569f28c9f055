"""Single-head spatial self-attention block of taming/MoVQ (``AttnBlock``), with GroupNorm or SpatialNorm.

``norm -> q, k, v (1x1 convs) -> softmax(q k^T / sqrt(C)) v -> proj_out (1x1) -> residual``, computed with
``F.scaled_dot_product_attention``. Parameter names are those of the ILLUME+ reference checkpoint.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layout import to_layout_of
from .norm import apply_norm, make_norm


class AttnBlock2d(nn.Module):
    """Spatial self-attention over all H*W positions, one head of C channels.

    Args:
        channels: C.
        zq_channels: if given, the norm is a :class:`SpatialNorm` conditioned on ``zq``.

    Shape: ``x [B, C, H, W]`` (and ``zq``) -> ``[B, C, H, W]``; ``x`` is never modified (the fast path's variant,
    :class:`dualvitok.blocks.inference.InferenceAttnBlock2d`, writes into it).
    """

    def __init__(self, channels: int, zq_channels: int | None = None):
        super().__init__()
        self.norm = make_norm(channels, zq_channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        return x + self.proj_out(self.attend(x, zq))

    def attend(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        """The attention output before ``proj_out`` and the residual: ``[B, C, H, W]``."""
        b, c, h, w = x.shape
        hn = apply_norm(self.norm, x, zq)
        q, k, v = (conv(hn).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))  # [B,1,HW,C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # [B, C, H, W], a view with channels_last strides
        return to_layout_of(out, x)  # a channels_last input would make a contiguous proj_out copy its weight
