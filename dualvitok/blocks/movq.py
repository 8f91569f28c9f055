"""MoVQ encoder and decoder with DC-AE down/up blocks, as in the ILLUME+ DualViTok pixel branch.

Follows MoVQGAN (Zheng et al., 2022; the ``modeling_movqgan.py`` of the ILLUME+ reference) with ILLUME+'s changes:
DC-AE space-to-channel down/up blocks (``use_dc_up_down_blocks``), an averaging output shortcut on the encoder
(``conv_out(h) + mean of channel groups of h``) and a repeating input stem on the decoder
(``conv_in(z) + repeat_interleave(z)``). Every decoder norm is a :class:`SpatialNorm` conditioned on ``zq``.
``attn_resolutions`` holds *level indices* (as the reference interprets them), not pixel sizes.
Module and parameter names match the reference checkpoint (``down.{i}.block.{j}``, ``mid.attn_1``, ``up.{i}``...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttnBlock2d
from .dc import DCDownBlock2d, DCUpBlock2d, Downsample2d, Upsample2d, channel_average
from .norm import apply_norm, make_norm
from .resnet import ResnetBlock2d


class _Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution."""

    def __init__(self, channels: int, zq_channels: int | None, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock2d(channels, channels, zq_channels, dropout)
        self.attn_1 = AttnBlock2d(channels, zq_channels)
        self.block_2 = ResnetBlock2d(channels, channels, zq_channels, dropout)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x, zq), zq), zq)


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampling."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x, zq)
            if len(self.attn):
                x = self.attn[i](x, zq)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


class MoVQEncoder(nn.Module):
    """Convolutional encoder with stride ``2**(len(ch_mult)-1)``.

    Args:
        in_channels: image channels.
        ch: base channels; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: channel multipliers per level.
        num_res_blocks: residual blocks per level.
        attn_resolutions: level indices that get an attention block after each residual block.
        z_channels: output channels (doubled if ``double_z``).
        use_dc_up_down_blocks: DC-AE downsampling and the averaging output shortcut (ILLUME+), else taming convs.

    Shape: ``[B, in_channels, H, W] -> [B, z_channels, H/s, W/s]`` with ``s = 2**(len(ch_mult)-1)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        z_channels: int = 32,
        double_z: bool = False,
        dropout: float = 0.0,
        use_dc_up_down_blocks: bool = True,
    ):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.downsample_factor = 2 ** (self.num_levels - 1)
        self.use_dc = use_dc_up_down_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_levels):
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock2d(block_in, block_out, None, dropout))
                block_in = block_out
                if level in attn_resolutions:
                    attn.append(AttnBlock2d(block_in))
            resample = None
            if level != self.num_levels - 1:
                resample = DCDownBlock2d(block_in) if self.use_dc else Downsample2d(block_in)
            self.down.append(_Level(blocks, attn, resample, "downsample"))
        self.mid = _Mid(block_in, None, dropout)
        self.norm_out = make_norm(block_in)
        self.out_channels = 2 * z_channels if double_z else z_channels
        if self.use_dc and block_in % self.out_channels:
            raise ValueError(f"the DC output shortcut needs {block_in} channels divisible by {self.out_channels}")
        self.conv_out = nn.Conv2d(block_in, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = F.silu(apply_norm(self.norm_out, self.mid(h), None))
        out = self.conv_out(h)
        if self.use_dc:
            out = out + channel_average(h, self.out_channels)  # [B, C, h, w] -> [B, z, h, w]
        return out


class MoVQDecoder(nn.Module):
    """Convolutional decoder conditioned on ``zq`` through spatial norms, with upsampling ``2**(len(ch_mult)-1)``.

    Args:
        out_channels: image channels.
        ch: base channels; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: channel multipliers per level.
        num_res_blocks: the decoder has ``num_res_blocks + 1`` residual blocks per level.
        attn_resolutions: level indices with attention after each residual block.
        z_channels: channels of the decoder input ``z``.
        zq_channels: channels of the conditioning map ``zq`` (the reference's ``embed_dim``).
        use_dc_up_down_blocks: DC-AE upsampling and the repeating input stem (ILLUME+), else taming convs.

    Shape: ``z [B, z_channels, h, w]``, ``zq [B, zq_channels, h, w]`` -> ``[B, out_channels, h*s, w*s]``.
    """

    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 384,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        z_channels: int = 64,
        zq_channels: int = 64,
        dropout: float = 0.0,
        use_dc_up_down_blocks: bool = True,
    ):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.upsample_factor = 2 ** (self.num_levels - 1)
        self.use_dc = use_dc_up_down_blocks
        block_in = ch * ch_mult[-1]
        if self.use_dc and block_in % z_channels:
            raise ValueError(f"the DC input stem needs {block_in} channels divisible by z_channels={z_channels}")
        self.stem_repeats = block_in // z_channels
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, zq_channels, dropout)
        levels: list[nn.Module] = []
        for level in reversed(range(self.num_levels)):
            block_out = ch * ch_mult[level]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock2d(block_in, block_out, zq_channels, dropout))
                block_in = block_out
                if level in attn_resolutions:
                    attn.append(AttnBlock2d(block_in, zq_channels))
            resample = None
            if level != 0:
                resample = DCUpBlock2d(block_in) if self.use_dc else Upsample2d(block_in)
            levels.insert(0, _Level(blocks, attn, resample, "upsample"))
        self.up = nn.ModuleList(levels)  # up[i] is level i; executed from the last level down to 0
        self.norm_out = make_norm(block_in, zq_channels)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor, zq: Tensor) -> Tensor:
        h = self.conv_in(z)
        if self.use_dc:
            stem = z.repeat_interleave(self.stem_repeats, dim=1)  # [B, z, h, w] -> [B, C, h, w]
            h = h + stem
        h = self.mid(h, zq)
        for level in reversed(self.up):
            h = level(h, zq)
        return self.conv_out(F.silu(apply_norm(self.norm_out, h, zq)))
