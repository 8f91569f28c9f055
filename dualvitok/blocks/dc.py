"""DC-AE space-to-channel residual blocks.

Follows "Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models" (Chen et al., 2024, arXiv
2410.10733) as used in the ILLUME+ pixel encoder/decoder: down- and up-sampling by ``pixel_unshuffle`` /
``pixel_shuffle`` of a 3x3 convolution, plus a parameter-free shortcut that averages (down) or repeats (up) channel
groups of the shuffled input. The shortcuts equal 2x2 average pooling and nearest-neighbour 2x upsampling.
Parameter names (``conv``) are those of the reference checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channel_average(x: Tensor, out_channels: int) -> Tensor:
    """Average groups of consecutive channels: ``[B, C, H, W] -> [B, out_channels, H, W]`` (C divisible)."""
    channels = x.shape[1]
    if channels % out_channels:
        raise ValueError(f"cannot average {channels} channels into {out_channels} groups")
    return x.unflatten(1, (out_channels, channels // out_channels)).mean(2)  # [B, out, group, H, W] -> [B, out, H, W]


def space_to_channel_average(x: Tensor, out_channels: int) -> Tensor:
    """The DC-down shortcut, ``channel_average(space_to_channel(x), out_channels)``: ``[B, C, H, W] ->
    [B, out_channels, H/2, W/2]``.

    With ``out_channels == C`` (every DC-down block of the released encoders) each group is one channel's 2x2
    window, so this is 2x2 average pooling. It is computed from strided views, adding the four positions in the
    order the channel mean adds them (accumulating bf16/fp16 in float32 as the mean does), so the values equal
    those of the unshuffle-and-mean (tested on CPU; a sum of four -0.0 may give -0.0 for +0.0), without
    materialising the space-to-channel copy.
    """
    if x.ndim != 4:
        raise ValueError(f"space_to_channel_average expects [B, C, H, W], got shape {tuple(x.shape)}")
    channels, height, width = x.shape[1:]
    if out_channels != channels or height % 2 or width % 2:
        return channel_average(space_to_channel(x), out_channels)
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    v = x.unflatten(2, (height // 2, 2)).unflatten(4, (width // 2, 2))  # [B, C, H/2, 2, W/2, 2]
    out = v[:, :, :, 0, :, 0].to(acc) + v[:, :, :, 0, :, 1]  # a new tensor (never a view of x)
    out += v[:, :, :, 1, :, 0]
    out += v[:, :, :, 1, :, 1]
    return out.div_(4).to(x.dtype)  # [B, C, H/2, W/2]


def space_to_channel(x: Tensor, factor: int = 2) -> Tensor:
    """``[B, C, H, W] -> [B, C*f*f, H/f, W/f]`` (``F.pixel_unshuffle``)."""
    return F.pixel_unshuffle(x, factor)


def channel_to_space(x: Tensor, factor: int = 2) -> Tensor:
    """``[B, C*f*f, H, W] -> [B, C, H*f, W*f]`` (``F.pixel_shuffle``)."""
    return F.pixel_shuffle(x, factor)


class DCDownBlock2d(nn.Module):
    """Halve the resolution: ``conv3x3(C -> C_out/4)`` then pixel-unshuffle, plus the 2x2 average shortcut.

    Args:
        in_channels: C.
        out_channels: output channels (defaults to C); must be divisible by 4, and ``4C`` by ``out_channels``.
        shortcut: add the averaging shortcut.

    Shape: ``[B, C, H, W] -> [B, C_out, H/2, W/2]``; H and W must be even.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, shortcut: bool = True):
        super().__init__()
        out_channels = out_channels or in_channels
        if out_channels % 4 or (4 * in_channels) % out_channels:
            raise ValueError(f"DCDownBlock2d needs out_channels divisible by 4 and 4*in_channels by out_channels, "
                             f"got in={in_channels}, out={out_channels}")
        self.out_channels = out_channels
        self.shortcut = shortcut
        self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"DCDownBlock2d needs even height and width, got {tuple(x.shape[-2:])}")
        h = space_to_channel(self.conv(x))  # [B, C_out, H/2, W/2]
        if self.shortcut:
            h = h + space_to_channel_average(x, self.out_channels)  # [B, C_out, H/2, W/2]
        return h


class DCUpBlock2d(nn.Module):
    """Double the resolution: ``conv3x3(C -> 4 C_out)`` then pixel-shuffle, plus the channel-repeat shortcut.

    Args:
        in_channels: C.
        out_channels: output channels (defaults to C); ``4 C_out`` must be divisible by C.
        shortcut: add the repeating shortcut (nearest-neighbour upsampling when ``C_out == C``).

    Shape: ``[B, C, H, W] -> [B, C_out, 2H, 2W]``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, shortcut: bool = True):
        super().__init__()
        out_channels = out_channels or in_channels
        if (4 * out_channels) % in_channels:
            raise ValueError(
                f"DCUpBlock2d needs 4*out_channels divisible by in_channels, got {in_channels}, {out_channels}"
            )
        self.repeats = 4 * out_channels // in_channels
        self.shortcut = shortcut
        self.conv = nn.Conv2d(in_channels, out_channels * 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = channel_to_space(self.conv(x))  # [B, 4 C_out, H, W] -> [B, C_out, 2H, 2W]
        if self.shortcut:
            if self.repeats == 4:  # C_out == C: repeat + pixel-shuffle is exactly nearest-neighbour 2x upsampling
                h = h + F.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                h = h + channel_to_space(x.repeat_interleave(self.repeats, dim=1))
        return h


class Downsample2d(nn.Module):
    """Taming/MoVQ downsampling without DC blocks: pad (0, 1, 0, 1), then a 3x3 stride-2 convolution.

    Shape: ``[B, C, H, W] -> [B, C, H/2, W/2]``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2d(nn.Module):
    """Taming/MoVQ upsampling without DC blocks: nearest 2x, then a 3x3 convolution. ``[B,C,H,W] -> [B,C,2H,2W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
