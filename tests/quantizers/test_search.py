"""Bounded-memory nearest-code search against brute force."""

from __future__ import annotations

import pytest
import torch

from dualvitok.quantizers import nearest_code
from dualvitok.quantizers.base import _search_tiles, resolve_search_plan

PLANS = ["cache", "large"]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("budget", [64, 4096, 10**6, 2**28])
def test_equals_brute_force_for_any_budget(budget, plan, device):
    torch.manual_seed(0)
    x, codebook = torch.randn(300, 16), torch.randn(1000, 16)
    dist = torch.cdist(x.double(), codebook.double())
    found = nearest_code(x.to(device), codebook.to(device), memory_budget=budget, plan=plan)
    assert torch.equal(found.indices.cpu(), dist.argmin(1))
    torch.testing.assert_close(found.distances.double().cpu(), dist.min(1).values.pow(2), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("plan", PLANS + ["auto"])
def test_ties_keep_the_first_index_across_blocks(plan, device):
    codebook = torch.zeros(70000, 2)
    codebook[:] = 5.0
    codebook[40000] = 0.0
    codebook[69999] = 0.0  # same distance, later block
    codebook[10] = 1.0
    found = nearest_code(torch.zeros(3, 2, device=device), codebook.to(device), memory_budget=2**20, plan=plan)
    assert found.indices.tolist() == [40000] * 3


@pytest.mark.parametrize("budget", [2**12, 2**20, 2**28])
def test_both_plans_give_equal_indices_with_many_ties(budget, device):
    """Integer-valued data: many exact ties, which every plan must break towards the lowest index."""
    torch.manual_seed(0)
    x = torch.randint(-2, 3, (500, 4)).float()
    codebook = torch.randint(-2, 3, (3000, 4)).float()
    expected = torch.cdist(x.double(), codebook.double()).argmin(1)  # argmin: first index of the minimum
    for plan in PLANS:
        got = nearest_code(x.to(device), codebook.to(device), memory_budget=budget, plan=plan).indices.cpu()
        assert torch.equal(got, expected), plan


def test_tiles_respect_the_budget():
    for n, k, budget in [(1024, 98304, 2**20), (32768, 98304, 256 * 2**20), (5, 7, 8), (10**6, 10, 10**5)]:
        rows, codes = _search_tiles(n, k, budget)
        assert rows * codes * 8 <= max(budget, 8)
        assert rows * codes * 4 <= 2 * 2**20
        rows, codes = _search_tiles(n, k, budget, plan="large")
        assert rows * codes * 8 <= max(budget, 8)


def test_large_plan_takes_the_largest_tiles_that_fit():
    # the whole codebook in one tile when a row of it fits, as many rows as fit
    assert _search_tiles(32768, 98304, 256 * 2**20, plan="large") == (256 * 2**20 // 8 // 98304, 98304)
    assert _search_tiles(100, 1000, 2**28, plan="large") == (100, 1000)  # one tile: one GEMM + one min
    assert _search_tiles(100, 1000, 8 * 500, plan="large") == (1, 500)  # not even a row fits: split the codes
    assert _search_tiles(32768, 98304, 256 * 2**20, plan="cache") == (256, 2048)  # today's cache-sized tiles


def test_plan_is_chosen_by_device():
    assert resolve_search_plan("auto", "cpu") == "cache"
    assert resolve_search_plan("auto", "cuda") == "large"
    assert resolve_search_plan("auto", torch.device("mps")) == "large"
    assert resolve_search_plan("cache", "cuda") == "cache"
    with pytest.raises(ValueError, match="unknown search plan"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), plan="fast")


def test_half_precision_inputs_are_searched_in_float32():
    torch.manual_seed(0)
    x, codebook = torch.randn(50, 8), torch.randn(200, 8)
    expected = nearest_code(x.bfloat16().float(), codebook.bfloat16().float())
    got = nearest_code(x.bfloat16(), codebook.bfloat16())
    assert got.distances.dtype == torch.float32
    assert torch.equal(got.indices, expected.indices)


def test_shape_errors():
    with pytest.raises(ValueError, match="same D"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))


@pytest.mark.slow
def test_released_size_search_does_not_build_the_full_matrix():
    torch.manual_seed(0)
    x, codebook = torch.randn(32768, 32), torch.randn(98304, 32) * 32**-0.5
    found = nearest_code(x, codebook, memory_budget=64 * 2**20)
    sample = torch.randint(0, 32768, (64,))
    brute = torch.cdist(x[sample], codebook).argmin(1)
    assert torch.equal(found.indices[sample], brute)
