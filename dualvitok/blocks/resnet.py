"""The taming/MoVQ residual block, with GroupNorm or the spatially conditioned norm of MoVQ.

Follows taming-transformers' ``ResnetBlock`` and MoVQGAN's conditioned variant (as in the ILLUME+ reference
``modeling_movqgan.py``): ``norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2`` plus a shortcut (a 1x1
``nin_shortcut`` when channels change). Parameter names are those of the reference checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import apply_norm, make_norm


class ResnetBlock2d(nn.Module):
    """Residual block.

    Args:
        in_channels: input channels.
        out_channels: output channels (defaults to ``in_channels``).
        zq_channels: if given, norms are :class:`SpatialNorm` conditioned on a map with this many channels.
        dropout: dropout probability before ``conv2``.

    Shape: ``x [B, C_in, H, W]`` (and ``zq [B, zq_channels, h, w]``) -> ``[B, C_out, H, W]``. ``x`` is never
    modified; the fast path's variant that writes into it is :class:`dualvitok.blocks.inference.InferenceResnetBlock2d`.
    Without autograd the block writes into its own temporaries (the norms' outputs, ``conv2``'s output; the same
    values): a forward hook on a submodule that keeps its output sees it change afterwards, as with an in-place ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, zq_channels: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = make_norm(in_channels, zq_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(out_channels, zq_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        inplace = not torch.is_grad_enabled()  # the norm outputs are temporaries of this block: activate in place
        h = self.conv1(F.silu(apply_norm(self.norm1, x, zq), inplace=inplace))
        h = self.dropout(F.silu(apply_norm(self.norm2, h, zq), inplace=inplace))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        out = self.conv2(h)
        if inplace and out.shape == x.shape and out.dtype == x.dtype:
            return out.add_(x)  # conv2's output is a temporary: add the shortcut into it (x + out, the same values)
        return x + out
