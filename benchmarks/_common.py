"""Shared helpers of the benchmarks: timing, peak-memory sampling, GEMM peak, Markdown tables."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """Context manager sampling RSS every millisecond; ``peak`` is the maximum increase over the start, in bytes."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0

    def __enter__(self):
        self._start = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self._start)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self._start)
        return False


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured matrix-multiply throughput (FLOP/s) of this machine for square ``n x n`` operands."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = best_time(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * n**3 / t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit_report(report: str, output: str | None) -> None:
    """Print a Markdown report and, when ``output`` is given, write it there too (atomically, folders made)."""
    from dualvitok._utils import atomic_write

    print("\n" + report)
    if output:
        with atomic_write(output) as tmp:
            tmp.write_text(report, encoding="utf-8")
