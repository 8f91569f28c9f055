"""Interleaved best-of timing, for the one-time kernel choices of the fast path (:mod:`dualvitok.blocks.fused`,
:mod:`dualvitok.blocks.packed`)."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_best(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time in seconds of each of ``runs`` over ``rounds`` rounds, after one warm-up call of each; within a
    round every run is called once, in order, so a slow spell of a shared machine hits them all."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
