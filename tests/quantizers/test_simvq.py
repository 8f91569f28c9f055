"""SimVQ against an independent implementation written from the reference spec (cdist + argmin, STE)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualvitok.quantizers import QuantizerOutput, SimVQ


def independent_simvq(x, frozen, weight):
    """Straight from the spec: C = frozen @ W^T; idx = argmin cdist; loss = mse(sg x, q) + .25 mse(x, sg q); STE."""
    b, d, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, d)
    codebook = frozen @ weight.t()
    with torch.no_grad():
        idx = torch.cdist(rows, codebook.unsqueeze(0).expand(b, -1, -1)).argmin(-1)  # [B, L]
    q = codebook[idx]
    loss = F.mse_loss(rows.detach(), q) + 0.25 * F.mse_loss(rows, q.detach())
    q = (q - rows).detach() + rows
    return q.reshape(b, h, w, d).permute(0, 3, 1, 2), idx.reshape(b, h, w), loss


def test_outputs_loss_and_gradients_equal_independent_implementation():
    torch.manual_seed(0)
    vq = SimVQ(dim=16, codebook_size=300)
    with torch.no_grad():
        vq.code_transform.weight.copy_(torch.randn(16, 16) * 0.3)
    x1 = (torch.randn(2, 16, 5, 7) * 0.3).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    weight2 = vq.code_transform.weight.detach().clone().requires_grad_()

    out = vq(x1)
    q2, idx2, loss2 = independent_simvq(x2, vq.frozen_codebook, weight2)
    assert isinstance(out, QuantizerOutput)
    assert torch.equal(out.indices, idx2)
    torch.testing.assert_close(out.quantized, q2, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, loss2, atol=1e-7, rtol=1e-6)

    upstream = torch.randn_like(q2)
    ((out.quantized * upstream).sum() + out.loss).backward()
    ((q2 * upstream).sum() + loss2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vq.code_transform.weight.grad, weight2.grad, atol=1e-6, rtol=1e-5)
    assert vq.frozen_codebook.grad is None


def test_state_dict_keys_and_init():
    torch.manual_seed(0)
    vq = SimVQ(dim=32, codebook_size=4096)
    assert set(vq.state_dict()) == {"frozen_codebook", "code_transform.weight"}
    assert vq.code_transform.bias is None
    std = vq.frozen_codebook.std().item()
    assert abs(std - 32**-0.5) < 0.01  # randn * dim**-0.5
    vq.enable_usage_tracking()
    vq(torch.randn(1, 32, 4, 4))
    assert set(vq.state_dict()) == {"frozen_codebook", "code_transform.weight"}  # usage stays out


def test_indices_to_codes_round_trip_and_layouts():
    torch.manual_seed(0)
    vq = SimVQ(dim=8, codebook_size=64).eval()
    x = torch.randn(2, 8, 3, 4)
    out = vq(x)
    torch.testing.assert_close(vq.indices_to_codes(out.indices), out.quantized, atol=1e-6, rtol=0)

    vq_last = SimVQ(dim=8, codebook_size=64, channel_first=False)
    vq_last.load_state_dict(vq.state_dict())
    out_last = vq_last(x.permute(0, 2, 3, 1))
    assert torch.equal(out_last.indices, out.indices)
    torch.testing.assert_close(out_last.quantized, out.quantized.permute(0, 2, 3, 1))

    seq = vq(torch.randn(2, 8, 10))  # channel-first sequence [B, D, N]
    assert seq.indices.shape == (2, 10) and seq.quantized.shape == (2, 8, 10)


def test_search_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    vq = SimVQ(dim=8, codebook_size=512).eval()
    x = torch.randn(4, 8, 6, 6)
    expected = vq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vq(x)
    assert got.quantized.dtype == torch.float32
    assert torch.equal(got.indices, expected.indices)


def test_inference_codebook_cache_follows_weight_updates():
    torch.manual_seed(0)
    vq = SimVQ(dim=4, codebook_size=32).eval()
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        before = vq(x).quantized
        vq.code_transform.weight.mul_(2.0)
        after = vq(x).quantized
    idx = vq(x).indices
    torch.testing.assert_close(after, vq.indices_to_codes(idx).detach())
    assert not torch.allclose(before, after)


def test_rotation_trick_forward_value_and_gradient_flow():
    torch.manual_seed(0)
    plain = SimVQ(dim=8, codebook_size=64)
    rot = SimVQ(dim=8, codebook_size=64, rotation_trick=True)
    rot.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    a, b = plain(x), rot(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.quantized, a.quantized, atol=1e-5, rtol=1e-5)
    b.quantized.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the rotation gradient is not the identity (straight-through) gradient
    assert not torch.allclose(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bad, match", [(torch.randn(8, 4), "batch"), (torch.randn(1, 5, 4, 4), "channels")])
def test_bad_inputs(bad, match):
    vq = SimVQ(dim=8, codebook_size=16)
    with pytest.raises(ValueError, match=match):
        vq(bad)
    with pytest.raises(ValueError, match="out of range"):
        vq.indices_to_codes(torch.tensor([[16]]))
    with pytest.raises(TypeError, match="integer"):
        vq.indices_to_codes(torch.tensor([[1.0]]))
