"""Normalisation layers of the MoVQ blocks: GroupNorm and the spatially conditioned norm of MoVQ.

``SpatialNorm`` follows "MoVQ: Modulating Quantized Vectors for High-Fidelity Image Generation" (Zheng et al., 2022):
``GroupNorm(f) * conv_y(zq) + conv_b(zq)`` with ``zq`` resized (nearest) to the feature map. Parameter names
(``norm_layer``, ``conv_y``, ``conv_b``) are those of the ILLUME+ checkpoint. Difference: the 1x1 convolutions run
on ``zq`` at its own size and their outputs are resized (the same values, since a 1x1 convolution commutes with
nearest-neighbour resizing), which saves most of their work at high resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """The GroupNorm of taming/MoVQ: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=eps, affine=True)


class SpatialNorm(nn.Module):
    """GroupNorm modulated by a conditioning map.

    Args:
        channels: feature channels f.
        zq_channels: channels of the conditioning map.

    Shape: ``x [B, f, H, W]``, ``zq [B, zq_channels, h, w]`` -> ``[B, f, H, W]``.
    """

    def __init__(self, channels: int, zq_channels: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm_layer = group_norm(channels, num_groups, eps)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        # without autograd the GroupNorm output is this call's temporary: modulate it in place (the same values)
        return self.modulate(self.norm_layer(x), zq, inplace=not torch.is_grad_enabled())

    def modulate(self, normed: Tensor, zq: Tensor, inplace: bool = False) -> Tensor:
        """``normed * conv_y(zq) + conv_b(zq)``, the maps resized (nearest) to ``normed``'s size.

        ``inplace`` writes the result into ``normed`` (the fast path's variant does, on its own temporary) where that
        keeps the dtype type promotion would give.
        """
        y, b = self.conv_y(zq), self.conv_b(zq)  # 1x1 convs commute with nearest resizing: run them on the small map
        inplace = inplace and normed.dtype == y.dtype == b.dtype
        (height, width), (h, w) = normed.shape[-2:], y.shape[-2:]
        if (height, width) == (h, w):
            return torch.addcmul(b, normed, y, out=normed if inplace else None)  # GN(x) * y + b in one pass
        if height % h == 0 and width % w == 0:
            # integer nearest upsampling as a broadcast: [B, C, h, s, w, t] views, nothing materialised at full size
            sh, sw = height // h, width // w
            normed6 = normed.unflatten(2, (h, sh)).unflatten(4, (w, sw))  # [B, C, h, sh, w, sw]
            out = torch.addcmul(b[:, :, :, None, :, None], normed6, y[:, :, :, None, :, None],
                                out=normed6 if inplace else None)
            return out.flatten(4, 5).flatten(2, 3)  # [B, C, H, W]
        y = F.interpolate(y, size=(height, width), mode="nearest")  # copies values: exact in any dtype
        b = F.interpolate(b, size=(height, width), mode="nearest")
        return torch.addcmul(b, normed, y)


def make_norm(channels: int, zq_channels: int | None = None) -> nn.Module:
    """GroupNorm, or :class:`SpatialNorm` conditioned on ``zq_channels`` channels when given."""
    return group_norm(channels) if zq_channels is None else SpatialNorm(channels, zq_channels)


def apply_norm(norm: nn.Module, x: Tensor, zq: Tensor | None) -> Tensor:
    """Call a norm made by :func:`make_norm`, passing ``zq`` to a :class:`SpatialNorm` (where it is required)."""
    if isinstance(norm, SpatialNorm):
        if zq is None:
            raise ValueError("this block uses a spatially conditioned norm (MoVQ decoder): pass zq")
        return norm(x, zq)
    return norm(x)
