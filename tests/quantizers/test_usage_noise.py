"""Codebook usage statistics and token-noise injection."""

from __future__ import annotations

import math

import pytest
import torch

from dualvitok.quantizers import CodebookUsage, inject_token_noise, token_noise_mask


def test_usage_statistics_closed_form():
    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 1, 1], [2, 2, 2]]))
    assert usage.histogram().tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert usage.utilisation == 3 / 8
    p = torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    assert usage.perplexity == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    other = CodebookUsage(8)
    other.update(torch.tensor([7]))
    usage.merge(other)
    assert usage.used_codes == 4 and usage.total == 7
    with pytest.raises(ValueError, match="outside"):
        usage.update(torch.tensor([8]))


_WORKER = """
import sys, torch, torch.distributed as dist
from dualvitok.quantizers import CodebookUsage
rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
usage = CodebookUsage(4)
usage.update(torch.tensor([rank, rank, 3]))
usage.all_reduce()
print("HIST", usage.histogram().tolist(), flush=True)
dist.destroy_process_group()
"""


def test_usage_all_reduce_across_two_processes():
    # Separate interpreters running a script (not mp.spawn of a function of this module, which needs this test
    # module importable by name in the children: another installed package may own the name ``tests``).
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(rank), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    hists = [next(line for line in out.splitlines() if line.startswith("HIST")) for out, _ in outs]
    assert hists[0] == hists[1] == "HIST [2, 2, 0, 2]"


def test_noise_fractions_statistically():
    gen = torch.Generator().manual_seed(0)
    keep = token_noise_mask(4000, (16, 16), batch_rate=0.3, token_rate=0.2, generator=gen)
    corrupted_samples = (~keep).flatten(1).any(1).float().mean().item()
    assert abs(corrupted_samples - 0.3) < 0.03
    per_token = (~keep).float().mean().item()
    assert abs(per_token - 0.3 * 0.2) < 0.005


def test_mask_draws_follow_the_reference_order():
    torch.manual_seed(123)
    keep = token_noise_mask(3, (4, 5), 0.5, 0.4)
    torch.manual_seed(123)
    batch_mask = (torch.rand(3, 1, 1, 1) > 0.5).float()
    mask = (torch.rand(3, 1, 4, 5) > 0.4).float()
    expected = batch_mask + (1 - batch_mask) * mask
    assert torch.equal(keep.float(), expected)


def test_random_mode_uses_previous_sample_and_leaves_batch_of_one():
    codes = torch.arange(3 * 2 * 4 * 4, dtype=torch.float).reshape(3, 2, 4, 4)
    out = inject_token_noise(codes, 1.0, 1.0, "random")
    assert torch.equal(out, torch.cat([codes[-1:], codes[:-1]]))
    single = codes[:1]
    assert torch.equal(inject_token_noise(single, 1.0, 1.0, "random"), single)


def test_zero_and_uniform_modes():
    codes = torch.randn(2, 3, 4, 4)
    assert torch.equal(inject_token_noise(codes, 1.0, 1.0, "zero"), torch.zeros_like(codes))
    codebook = torch.randn(10, 3)
    out = inject_token_noise(codes, 1.0, 1.0, "uniform", codebook=codebook)
    rows = out.permute(0, 2, 3, 1).reshape(-1, 3)
    assert all(any(torch.equal(r, c) for c in codebook) for r in rows)
    assert torch.equal(inject_token_noise(codes, 0.0, 1.0, "zero"), codes)
    with pytest.raises(ValueError, match="codebook"):
        inject_token_noise(codes, 1.0, 1.0, "uniform")
    with pytest.raises(ValueError, match="unknown noise mode"):
        inject_token_noise(codes, 1.0, 1.0, "bogus")
