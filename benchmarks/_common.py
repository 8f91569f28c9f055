"""Shared helpers of the benchmarks: timing, peak-memory sampling, GEMM peak, Markdown tables, worker processes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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


SLOW_GEMM_FLOPS = 10e9
"""Under this many FLOP/s on a small product, :func:`gemm_peaks` measures no larger one (an emulated dtype)."""


def gemm_peaks(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured matrix-multiply throughput (FLOP/s) for square ``n x n`` operands through each CPU route PyTorch
    has: ``torch.mm`` (float32 goes to its BLAS, MKL in the PyPI builds; bf16 to oneDNN) and oneDNN's GEMM on a
    prepacked weight (``torch.ops.mkldnn._linear_pointwise``, what the fast path's packed layers and convolutions
    use). The two differ a lot on some CPUs: on an AMD EPYC with AVX-512-BF16, float32 ``torch.mm`` (MKL) ran at
    about 210 GFLOP/s and oneDNN at about 475, so a peak from ``torch.mm`` alone is not the machine's.

    A low-precision dtype the CPU emulates (bf16 without AVX-512-BF16 or AMX: about 1 GFLOP/s on an AMD EPYC with
    AVX2 only, so a 2048 x 2048 product takes half a minute) is measured on a ``256 x 256`` product only, under
    :data:`SLOW_GEMM_FLOPS`."""
    if dtype != torch.float32:
        probe = torch.randn(256, 256).to(dtype)
        rate = 2 * 256**3 / best_time(lambda: probe @ probe, repeats=3, warmup=1)
        if rate < SLOW_GEMM_FLOPS:
            return {"torch.mm": rate}
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    peaks = {"torch.mm": 2 * n**3 / best_time(lambda: a @ b, repeats=repeats, warmup=2)}
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
            linear = torch.ops.mkldnn._linear_pointwise
            peaks["oneDNN"] = 2 * n**3 / best_time(lambda: linear(a, packed, None, "none", [], ""),
                                                   repeats=repeats, warmup=2)
    except (AttributeError, RuntimeError):  # a build or CPU without oneDNN's packed GEMM in this dtype
        pass
    return peaks


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured matrix-multiply peak (FLOP/s): the faster route of :func:`gemm_peaks`."""
    return max(gemm_peaks(dtype, n, repeats).values())


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


def kernel_ab_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line of the benchmarks that switch one kernel choice on a prepared model (``--model``, ``--sizes``,
    ``--batch``, ``--rounds``, ``--output``); callers add their own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dualvitok_anyres_max512")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    return parser


def emit_report(report: str, output: str | None) -> None:
    """Print a Markdown report and, when ``output`` is given, write it there too (atomically, folders made)."""
    from dualvitok._utils import atomic_write

    print("\n" + report)
    if output:
        with atomic_write(output) as tmp:
            tmp.write_text(report, encoding="utf-8")


RESULT_PREFIX = "RESULT "
"""Marks the line a worker process prints its JSON result on (:func:`print_result`, :func:`run_worker`)."""


def print_result(result: dict) -> None:
    """In a worker process: print ``result`` as the JSON line :func:`run_worker` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(cmd: list[str], env: dict | None = None) -> dict:
    """Run a worker process and return the result of its last :func:`print_result` line; exit with its output if it
    fails or prints none."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])

