"""2D RoPE, vision transformer block and the Qwen2-VL tower against naive formulations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualvitok.blocks import (
    Qwen2VisionConfig,
    Qwen2VisionTower,
    VisionBlock,
    VisionRotaryEmbedding,
    apply_rotary,
    grid_positions,
    rotary_cos_sin,
)


def test_grid_positions_merge_order():
    pos = grid_positions(4, 4, merge_size=2)
    # first 2x2 block then the next block to the right
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_rope_frequencies_and_relative_property():
    rope = VisionRotaryEmbedding(40)
    assert torch.allclose(rope.inv_freq, 1.0 / 10000 ** (torch.arange(0, 40, 2).float() / 40))
    head_dim = 80
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(p, r):
        angles = rope(torch.tensor([p, r]))  # [2, 40]
        qr = apply_rotary(q.view(1, 1, -1).expand(2, 1, -1), angles)
        kr = apply_rotary(k.view(1, 1, -1).expand(2, 1, -1), angles)
        return (qr[0, 0] @ kr[1, 0]).item()

    # q.k after rotation depends only on the relative 2D offset
    assert abs(score([1, 2], [3, 5]) - score([4, 0], [6, 3])) < 1e-3
    assert abs(score([1, 2], [3, 5]) - score([1, 2], [3, 6])) > 1e-3


def _rotate_naive(t, cos, sin):
    """The reference's formula: ``t * cos + rotate_half(t) * sin`` with the halves concatenated."""
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-t2, t1], -1) * sin


def test_apply_rotary_equals_the_concatenated_formula():
    torch.manual_seed(0)
    cos, sin = rotary_cos_sin(VisionRotaryEmbedding(20)(grid_positions(6, 6, 2)))  # [36, 1, 40]
    x = torch.randn(2, 36, 3, 4, 40)[:, :, :2]  # strided q, k of a qkv tensor: [B, L, 2, H, hd]
    rope = (cos.unsqueeze(1), sin.unsqueeze(1))
    # float32: bitwise the reference's values (the float32 path gives the reference's indices)
    assert torch.equal(apply_rotary(x, rope), _rotate_naive(x, *rope))
    # bf16 inputs: computed in float32 and rounded once, bitwise as the formula on x.float()
    xb = x.bfloat16()
    out = apply_rotary(xb, rope)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _rotate_naive(xb.float(), *rope).bfloat16())
    # strided bf16 / fp16 views (q, k of a low-precision qkv projection), cast once: the same values, input untouched
    for dtype in (torch.bfloat16, torch.float16):
        qkv = torch.randn(2, 36, 3, 4, 40).to(dtype)
        before = qkv.clone()
        out = apply_rotary(qkv[:, :, :2], rope)
        assert out.dtype == dtype
        assert torch.equal(out, _rotate_naive(qkv[:, :, :2].float(), *rope).to(dtype))
        assert torch.equal(qkv, before)
    # any (cos, sin), not only tiled ones: both halves of sin are used
    own = (torch.randn_like(rope[0]), torch.randn_like(rope[1]))
    assert torch.equal(apply_rotary(x, own), _rotate_naive(x, *own))
    # gradients flow as through the formula (the semantic encoder's blocks are trained)
    xg, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    (apply_rotary(xg, rope) * g).sum().backward()
    (_rotate_naive(xn, *rope) * g).sum().backward()
    torch.testing.assert_close(xg.grad, xn.grad, atol=1e-6, rtol=0)


def naive_block(block: VisionBlock, x, angles):
    b, n, c = x.shape
    heads = block.attn.num_heads
    hd = c // heads
    h = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias, 1e-6)
    qkv = h @ block.attn.qkv.weight.t() + block.attn.qkv.bias
    q, k, v = qkv.view(b, n, 3, heads, hd).unbind(2)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rot(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rot(q), rot(k)
    att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, c)
    x = x + out @ block.attn.proj.weight.t() + block.attn.proj.bias
    h = F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias, 1e-6)
    h = h @ block.mlp.fc1.weight.t() + block.mlp.fc1.bias
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ block.mlp.fc2.weight.t() + block.mlp.fc2.bias


def test_vision_block_matches_naive_implementation():
    torch.manual_seed(0)
    block = VisionBlock(64, num_heads=4)
    x = torch.randn(2, 12, 64)
    angles = VisionRotaryEmbedding(8)(grid_positions(3, 4))
    torch.testing.assert_close(block(x, rotary_cos_sin(angles)), naive_block(block, x, angles), atol=1e-5, rtol=1e-5)


def test_tower_batches_equal_single_images_and_mixed_grids():
    torch.manual_seed(0)
    tower = Qwen2VisionTower(Qwen2VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=48))
    a, b = torch.randn(16, 1176), torch.randn(16, 1176)
    grid = torch.tensor([[1, 4, 4]])
    both = tower(torch.cat([a, b]), torch.cat([grid, grid]))
    assert both.shape == (8, 48)
    torch.testing.assert_close(both[:4], tower(a, grid), atol=1e-5, rtol=1e-5)
    c = torch.randn(24, 1176)
    mixed = tower(torch.cat([a, c]), torch.tensor([[1, 4, 4], [1, 4, 6]]))
    torch.testing.assert_close(mixed[4:], tower(c, torch.tensor([[1, 4, 6]])), atol=1e-5, rtol=1e-5)


def test_patch_embed_equals_conv3d():
    torch.manual_seed(0)
    tower = Qwen2VisionTower(Qwen2VisionConfig(depth=1, embed_dim=32, num_heads=2, hidden_size=48))
    patches = torch.randn(5, 3, 2, 14, 14)
    conv = tower.patch_embed.proj(patches).view(5, 32)
    torch.testing.assert_close(tower.patch_embed(patches.view(5, -1)), conv, atol=1e-5, rtol=1e-5)
