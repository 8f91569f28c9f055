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


def test_outputs_loss_and_gradients_equal_independent_implementation(device):
    torch.manual_seed(0)
    vq = SimVQ(dim=16, codebook_size=300)
    with torch.no_grad():
        vq.code_transform.weight.copy_(torch.randn(16, 16) * 0.3)
    vq.to(device)
    x1 = (torch.randn(2, 16, 5, 7) * 0.3).to(device).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    weight2 = vq.code_transform.weight.detach().clone().requires_grad_()

    out = vq(x1)
    q2, idx2, loss2 = independent_simvq(x2, vq.frozen_codebook, weight2)
    assert isinstance(out, QuantizerOutput)
    assert torch.equal(out.indices, idx2)
    torch.testing.assert_close(out.quantized, q2, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, loss2, atol=1e-7, rtol=1e-5)

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
    # channel-first codes are contiguous, not a movedim view with channels_last strides (which would make the
    # convolutions after them copy their weights on every call)
    assert out.quantized.is_contiguous() and vq.indices_to_codes(out.indices).is_contiguous()


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


def _stale_case(device):
    """Issue 14.4: eval, one search (cache filled), then a new weight written through ``.data``."""
    torch.manual_seed(0)
    vq = SimVQ(dim=8, codebook_size=512).eval().to(device)
    x = torch.randn(2, 8, 8, 8, device=device)
    with torch.no_grad():
        vq(x)
        new_weight = torch.randn(8, 8, device=device)
    return vq, x, new_weight


def _fresh_indices(vq, x):
    """Indices from the current weights, computed without the module's cache (brute force)."""
    codebook = vq.frozen_codebook @ vq.code_transform.weight.detach().t()
    rows = x.movedim(1, -1).reshape(-1, vq.dim)
    return torch.cdist(rows.double(), codebook.double()).argmin(1).view(x.shape[0], *x.shape[2:])


def test_in_place_data_write_gives_fresh_indices_on_cpu():
    vq, x, new_weight = _stale_case("cpu")
    vq.code_transform.weight.data.copy_(new_weight)  # no version counter bump
    with torch.no_grad():
        got = vq(x).indices
    assert torch.equal(got, _fresh_indices(vq, x))


def test_explicit_invalidation_gives_fresh_indices(device):
    vq, x, new_weight = _stale_case(device)
    vq.code_transform.weight.data.copy_(new_weight)
    vq.invalidate_cache()
    with torch.no_grad():
        assert torch.equal(vq(x).indices, _fresh_indices(vq, x))


@pytest.mark.parametrize("update", ["no_grad_copy", "load_state_dict", "train_eval", "optimizer", "buffer",
                                    "replace_parameter"])
def test_cache_is_invalidated_by_weight_updates(update, device):
    vq, x, new_weight = _stale_case(device)
    if update == "no_grad_copy":
        with torch.no_grad():
            vq.code_transform.weight.copy_(new_weight)
    elif update == "load_state_dict":
        vq.load_state_dict({"frozen_codebook": vq.frozen_codebook.clone(), "code_transform.weight": new_weight})
    elif update == "train_eval":
        vq.train()
        vq.code_transform.weight.data.copy_(new_weight)
        vq.eval()
    elif update == "optimizer":
        opt = torch.optim.SGD(vq.parameters(), lr=10.0)
        vq.train()
        vq(x).loss.backward()
        opt.step()  # then an evaluation under no_grad without a mode switch
    elif update == "buffer":
        vq.frozen_codebook.copy_(torch.randn_like(vq.frozen_codebook))
    elif update == "replace_parameter":
        vq.code_transform.weight = torch.nn.Parameter(new_weight)
    with torch.no_grad():
        assert torch.equal(vq(x).indices, _fresh_indices(vq, x)), update


def test_cache_follows_device_and_dtype_moves():
    vq, x, _ = _stale_case("cpu")
    vq.double()
    with torch.no_grad():
        out = vq(x.double())
    assert torch.equal(out.indices, _fresh_indices(vq, x.double()))
    vq.float()
    with torch.no_grad():
        assert vq(x).quantized.dtype == torch.float32


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
