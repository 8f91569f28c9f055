"""VectorQuantizer: loss formula, straight-through gradients, EMA update, dead-code restart, l2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualvitok.quantizers import VectorQuantizer


def test_loss_and_gradients_match_hand_computation():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=10, beta=0.25).eval()
    with torch.no_grad():
        vq.embedding.copy_(torch.randn(10, 4))
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(x)
    rows = x.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    idx = torch.cdist(rows, vq.embedding.detach()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), idx)
    q = vq.embedding.detach()[idx]
    expected_loss = 1.25 * ((q - rows) ** 2).mean()
    torch.testing.assert_close(out.loss, expected_loss)
    out.loss.backward()
    # d/dx of beta * mse(x, sg q) = 2 beta (x - q) / numel ; codebook gets 2 (q - x) / numel summed per code
    expected_grad = (2 * 0.25 * (rows - q) / rows.numel()).reshape(2, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(x.grad, expected_grad)
    expected_code_grad = torch.zeros(10, 4).index_add_(0, idx, 2 * (q - rows) / rows.numel())
    torch.testing.assert_close(vq.embedding.grad, expected_code_grad)


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(dim=3, codebook_size=5).eval()
    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    vq(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=3, ema_decay=0.9, channel_first=False).train()
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]]))
        vq.ema_embed_sum.copy_(vq.embedding)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # two go to code 0, one to code 1
    out = vq(x)
    assert out.indices.tolist() == [[0, 0, 1]]
    cluster = 0.9 * torch.ones(3) + 0.1 * torch.tensor([2.0, 1.0, 0.0])
    embed_sum = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]]) + 0.1 * torch.tensor(
        [[1.0, 1.0], [9.0, 9.0], [0.0, 0.0]])
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + 3e-5) * n
    torch.testing.assert_close(vq.cluster_size, cluster)
    torch.testing.assert_close(vq.embedding, embed_sum / smoothed[:, None])
    # with EMA the loss is only the commitment term
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]])
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(x[0], q))


def test_dead_codes_are_restarted_from_batch_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=4, dead_code_threshold=0.95, channel_first=False).train()
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]]))
    x = torch.randn(1, 16, 2) * 0.1
    vq(x)
    emb = vq.embedding.detach()
    # after one step the unused codes 1-3 have running usage 0.99 >= 0.95: not restarted yet
    assert torch.equal(emb[1:], torch.tensor([[100.0, 100.0], [200.0, 200.0], [300.0, 300.0]]))
    for _ in range(5):  # usage of unused codes decays below the threshold: 0.99**6 < 0.95
        vq(x)
    emb = vq.embedding.detach()
    for row in emb[1:]:
        assert any(torch.allclose(row, v) for v in x[0]), "restarted codes must come from the batch"


def test_l2_normalised_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=32, l2_normalize=True).eval()
    x = torch.randn(2, 8, 4, 4) * 7
    out = vq(x)
    norms = out.quantized.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    cos = F.normalize(x.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1) @ F.normalize(vq.embedding, dim=-1).t()
    assert torch.equal(out.indices.reshape(-1), cos.argmax(1))


def test_usage_statistics_stay_out_of_the_state_dict():
    vq = VectorQuantizer(dim=4, codebook_size=8).eval()
    usage = vq.enable_usage_tracking()
    keys = set(vq.state_dict())
    vq(torch.randn(2, 4, 3, 3))
    assert usage.total == 18
    assert set(vq.state_dict()) == keys
