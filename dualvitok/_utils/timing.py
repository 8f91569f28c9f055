"""Interleaved timing, for the one-time measured choices of the fast path (:mod:`dualvitok.blocks.fused`,
:mod:`dualvitok.blocks.packed`, :mod:`dualvitok.blocks.packed_conv`, :mod:`dualvitok.blocks.winograd`,
:mod:`dualvitok.blocks.norm_silu`, :mod:`dualvitok.blocks.native_rope`, :mod:`dualvitok.cpu`) and the benchmarks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class MeasuredChoice:
    """The outcome of :func:`measure_choice`: whether the candidate was taken, and both best times in seconds."""

    chosen: bool
    candidate_s: float
    baseline_s: float

    @property
    def speedup(self) -> float:
        """How many times faster the candidate ran than the baseline (best against best)."""
        return self.baseline_s / self.candidate_s if self.candidate_s > 0 else float("inf")


def measure_choice(what: str, candidate: tuple[str, Callable[[], object]], baseline: tuple[str, Callable[[], object]],
                   rounds: int, min_speedup: float = 1.0, log: logging.Logger | None = None) -> MeasuredChoice:
    """Time ``candidate`` against ``baseline`` (each a ``(name, call)``), interleaved, best of ``rounds`` after a
    warm-up, and take the candidate if it is at least ``min_speedup`` times as fast (below 1: a tolerance, e.g.
    ``1 / 1.1`` keeps a candidate up to 10% slower; on a shared machine single timings move by more than small
    differences). Logs both times and the choice at INFO to ``log`` (the caller's logger; default this module's), as
    ``what: ... ms name vs ... ms name: chosen name``."""
    (cand_name, cand), (base_name, base) = candidate, baseline
    if cand_name == base_name:
        raise ValueError(f"candidate and baseline need two names, got {cand_name!r} twice")
    best = interleaved_best({cand_name: cand, base_name: base}, rounds)
    result = MeasuredChoice(best[cand_name] * min_speedup <= best[base_name], best[cand_name], best[base_name])
    (log or logger).info("%s: %.2f ms %s vs %.2f ms %s: %s", what, result.candidate_s * 1e3, cand_name,
                         result.baseline_s * 1e3, base_name, cand_name if result.chosen else base_name)
    return result
