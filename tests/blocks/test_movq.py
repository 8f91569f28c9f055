"""MoVQ blocks against naive re-implementations; encoder/decoder shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualvitok.blocks import AttnBlock2d, MoVQDecoder, MoVQEncoder, ResnetBlock2d, SpatialNorm


def test_spatial_norm_matches_formula():
    torch.manual_seed(0)
    norm = SpatialNorm(32, 4)
    x, zq = torch.randn(2, 32, 8, 8), torch.randn(2, 4, 2, 2)
    zq_up = zq.repeat_interleave(4, -1).repeat_interleave(4, -2)  # nearest 4x
    mean = x.view(2, 32, -1).mean(-1).view(2, 32, 1, 1)
    var = x.view(2, 32, -1).var(-1, unbiased=False).view(2, 32, 1, 1)
    gn = (x - mean) / torch.sqrt(var + 1e-6) * norm.norm_layer.weight.view(1, -1, 1, 1) + norm.norm_layer.bias.view(
        1, -1, 1, 1)
    expected = gn * norm.conv_y(zq_up) + norm.conv_b(zq_up)
    torch.testing.assert_close(norm(x, zq), expected, atol=1e-5, rtol=1e-5)


def test_attention_block_matches_naive_softmax():
    torch.manual_seed(0)
    block = AttnBlock2d(32)
    x = torch.randn(2, 32, 4, 5)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, N]
    weights = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)  # [B, N, N], softmax over keys
    out = (v @ weights.transpose(1, 2)).view(2, 32, 4, 5)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


def test_attention_output_keeps_the_input_layout():
    """A channels_last-strided attention output in a contiguous model would make proj_out copy its weight per call;
    in the fast path's channels_last model the output stays channels_last (no copy)."""
    torch.manual_seed(0)
    block = AttnBlock2d(32).eval()
    x = torch.randn(2, 32, 4, 6)
    with torch.no_grad():
        plain = block.attend(x)
        cl = block.attend(x.contiguous(memory_format=torch.channels_last))
    assert plain.is_contiguous()
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(plain, cl, atol=1e-6, rtol=0)


def test_resnet_block_shortcut_and_conditioning():
    torch.manual_seed(0)
    block = ResnetBlock2d(32, 64)
    x = torch.randn(1, 32, 6, 6)
    h = block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), block.nin_shortcut(x) + h)
    cond = ResnetBlock2d(32, 32, zq_channels=4)
    assert cond(x, torch.randn(1, 4, 3, 3)).shape == (1, 32, 6, 6)
    with pytest.raises(ValueError, match="pass zq"):
        cond(x)


@pytest.mark.parametrize("size", [(32, 32), (48, 80)])
def test_encoder_decoder_shapes(size):
    enc = MoVQEncoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(2,), z_channels=8)
    dec = MoVQDecoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(2,), z_channels=8, zq_channels=8)
    x = torch.randn(1, 3, *size)
    z = enc(x)
    assert z.shape == (1, 8, size[0] // 4, size[1] // 4)
    assert dec(z, z).shape == (1, 3, *size)
    assert len(enc.down[2].attn) == 1 and len(enc.down[0].attn) == 0  # level index 2 has attention
    assert len(dec.up[2].attn) == 2  # num_res_blocks + 1 in the decoder


def test_encoder_output_shortcut_and_decoder_stem():
    torch.manual_seed(0)
    enc = MoVQEncoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8)
    for conv in (enc.conv_out,):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    x = torch.randn(1, 3, 16, 16)
    h = enc.conv_in(x)
    for level in enc.down:
        h = level(h)
    h = F.silu(enc.norm_out(enc.mid(h)))
    torch.testing.assert_close(enc(x), h.view(1, 8, 8, 8, 8).mean(2))  # 64 channels averaged in groups of 8
    plain = MoVQEncoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                        use_dc_up_down_blocks=False)
    assert plain(x).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("zq_size, x_size, channels_last", [((2, 3), (8, 12), True), ((3, 3), (8, 8), False)])
def test_spatial_norm_upsampling_paths_match_interpolation(zq_size, x_size, channels_last):
    torch.manual_seed(0)
    norm = SpatialNorm(32, 4)
    x, zq = torch.randn(2, 32, *x_size), torch.randn(2, 4, *zq_size)
    zq_up = F.interpolate(zq, size=x_size, mode="nearest")
    expected = norm.norm_layer(x) * norm.conv_y(zq_up) + norm.conv_b(zq_up)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(norm(x, zq), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zq_size", [8, 4, 3])  # same size, integer upsampling, interpolation
def test_blocks_writing_into_their_temporaries_give_the_autograd_values(zq_size):
    """Without autograd SpatialNorm modulates its GroupNorm output in place and ResnetBlock2d adds its shortcut into
    conv2's output: bit for bit the values of the out-of-place computation (autograd on, nothing requiring grad)."""
    torch.manual_seed(0)
    x, zq = torch.randn(2, 32, 9 if zq_size == 3 else 8, 9 if zq_size == 3 else 8), torch.randn(2, 8, zq_size, zq_size)
    for block in (SpatialNorm(32, 8), ResnetBlock2d(32, 32, zq_channels=8), ResnetBlock2d(32, 64, zq_channels=8)):
        block.eval().requires_grad_(False)
        with torch.enable_grad():
            expected = block(x, zq)
        with torch.inference_mode():
            got = block(x, zq)
        assert torch.equal(got, expected)


def test_resnet_block_under_autocast_keeps_the_type_promotion():
    """A bf16 conv2 output under autocast is not a place for the float32 shortcut: the sum stays float32."""
    torch.manual_seed(0)
    block = ResnetBlock2d(32, 32).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block.requires_grad_(False)(x)
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out, expected)
