"""benchmarks/bench_reference.py's operator profile: what the worker records and the side-by-side tables it makes.

The timing itself needs the reference's environment and minutes of CPU (``--quick`` checks the set-up by hand);
these tests check the profile's bookkeeping on a real ``torch.profiler`` run and on hand-made worker results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_reference

        yield bench_reference
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_operator_times_counts_the_calls_and_returns_the_result(bench):
    a = torch.randn(64, 64)

    def work(m):
        return [torch.mm(m, m) for _ in range(3)][-1] + 1

    out, prof = bench._operator_times(work, a, top=50)
    assert torch.equal(out, torch.mm(a, a) + 1)
    assert prof["ops"]["aten::mm"][1] == 3
    assert prof["ops"]["aten::add"][1] == 1
    assert prof["total"] >= sum(s for s, _ in prof["ops"].values()) - 1e-9
    _, few = bench._operator_times(work, a, top=1)
    assert len(few["ops"]) == 1


def _out(path: str, ops: dict, total: float) -> dict:
    stage = {"ops": ops, "total": total}
    return {"path": path, "profiles": [{"size": 256, "batch": 1, "encode": stage, "decode": stage}]}


def test_profile_tables_put_the_paths_side_by_side_slowest_first(bench):
    outs = [_out("reference", {"aten::add": [6.5, 67], "aten::mkldnn_convolution": [83.7, 137]}, 104.3),
            _out("fp32", {"aten::mkldnn_convolution": [76.6, 137], "aten::addcmul": [2.8, 39]}, 85.3)]
    text = bench._profile_tables(outs, top=2)
    decode = text.split("256x256, batch 1, decode:")[1]
    lines = [line for line in decode.splitlines() if line.startswith("| ")]
    assert lines[0] == "| operator | reference | fp32 |"
    # the two slowest operators in any path, slowest first; an operator outside a path's top is "-"
    assert lines[1] == "| `aten::mkldnn_convolution` | 83.70 (137) | 76.60 (137) |"
    assert lines[2] == "| `aten::add` | 6.50 (67) | - |"
    assert lines[3] == "| all operators | 104.30 | 85.30 |"
    assert len(lines) == 4
    assert "256x256, batch 1, encode:" in text
