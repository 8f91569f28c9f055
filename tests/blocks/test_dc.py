"""DC-AE blocks: shortcuts equal average pooling / nearest upsampling, shapes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualvitok.blocks import (
    DCDownBlock2d,
    DCUpBlock2d,
    channel_average,
    channel_to_space,
    space_to_channel,
    space_to_channel_average,
)


def test_space_channel_round_trip():
    x = torch.randn(2, 3, 8, 6)
    assert torch.equal(channel_to_space(space_to_channel(x)), x)
    assert space_to_channel(x).shape == (2, 12, 4, 3)


def test_down_shortcut_is_average_pooling():
    block = DCDownBlock2d(8)
    torch.nn.init.zeros_(block.conv.weight)
    torch.nn.init.zeros_(block.conv.bias)
    x = torch.randn(2, 8, 6, 10)
    torch.testing.assert_close(block(x), F.avg_pool2d(x, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_down_shortcut_from_views_is_bitwise_the_unshuffle_mean(dtype, channels_last):
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 12, 20) * 10).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = space_to_channel_average(x, 16)
    assert out.dtype == dtype and out.shape == (2, 16, 6, 10)
    assert torch.equal(out, channel_average(space_to_channel(x), 16))
    # other groupings (out_channels != C) take the unshuffle-and-mean route
    assert torch.equal(space_to_channel_average(x, 32), channel_average(space_to_channel(x), 32))


def test_down_shortcut_from_views_leaves_its_input_and_passes_gradients():
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    before = x.detach().clone()
    space_to_channel_average(x, 4).sum().backward()
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.25))


def test_up_shortcut_is_nearest_upsampling():
    block = DCUpBlock2d(8)
    torch.nn.init.zeros_(block.conv.weight)
    torch.nn.init.zeros_(block.conv.bias)
    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(block(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_main_paths_and_shapes():
    x = torch.randn(1, 16, 8, 8)
    down = DCDownBlock2d(16, shortcut=False)
    torch.testing.assert_close(down(x), F.pixel_unshuffle(down.conv(x), 2))
    assert DCDownBlock2d(16, 32)(x).shape == (1, 32, 4, 4)
    assert DCUpBlock2d(16)(x).shape == (1, 16, 16, 16)
    assert DCUpBlock2d(16, 8)(x).shape == (1, 8, 16, 16)


def test_channel_average():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_average(x, 2).flatten().tolist() == [1.5, 5.5]
    with pytest.raises(ValueError):
        channel_average(x, 3)


def test_odd_sizes_are_refused():
    with pytest.raises(ValueError, match="even"):
        DCDownBlock2d(8)(torch.randn(1, 8, 5, 4))
