"""Interleaved timing, for the one-time kernel choices of the fast path (:mod:`dualvitok.blocks.fused`,
:mod:`dualvitok.blocks.packed`) and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall time in seconds of each of ``runs`` in each of ``rounds`` rounds, after one warm-up call of each; within
    a round every run is called once, in order, so a slow spell of a shared machine hits them all."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_best(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best of :func:`interleaved_times` per run, in seconds."""
    return {name: min(times) for name, times in interleaved_times(runs, rounds).items()}
