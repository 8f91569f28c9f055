"""Nearest-code search: dualvitok's tiled search (both tile plans) against ``torch.cdist`` + ``argmin``.

    python benchmarks/bench_quantizer.py                    # CPU, codebooks up to 98,304, batches 256..4,096
    python benchmarks/bench_quantizer.py --quick
    python benchmarks/bench_quantizer.py --device cuda --sizes 98304 --batches 4096 32768 --output results/x.md

All run in float32 on the same inputs in one process. Plans (``nearest_code(plan=...)``): ``cache`` (CPU-cache-sized
tiles, the CPU default) and ``large`` (the largest tiles within the memory budget, the default on accelerators). The
speed-up columns are cdist time / plan time; "indices equal" compares each plan with cdist + argmin. On CPU peak
memory is the largest RSS increase sampled every millisecond during one call; on CUDA it is the peak of
``torch.cuda.max_memory_allocated`` above the memory in use before the call. ``--skip-cdist`` leaves the reference out
(on a GPU cdist of 32,768 x 98,304 needs 12 GiB).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from _common import PeakMemory, machine, table

from dualvitok.quantizers import DEFAULT_MEMORY_BUDGET, nearest_code, prepare_codebook

PLANS = ("cache", "large")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``fn`` in seconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_bytes(fn, device: torch.device) -> int:
    """Peak temporary memory of one call of ``fn`` (RSS on CPU, allocator peak on CUDA)."""
    fn()  # warm: the allocator's first-call growth is not the call's working memory
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        fn()
        return 0
    with PeakMemory() as mem:
        fn()
    return mem.peak


def run(device: torch.device, sizes: list[int], batches: list[int], budget: int, repeats: int,
        skip_cdist: bool = False) -> tuple[list[str], list[list[object]]]:
    """Measure every (codebook size, batch) pair; returns the table's headers and rows."""
    torch.manual_seed(0)
    headers = ["vectors", "codes"]
    if not skip_cdist:
        headers += ["cdist+argmin vec/s"]
    for plan in PLANS:
        headers += [f"{plan} vec/s"] + ([f"{plan} speed-up"] if not skip_cdist else [])
    headers += (["cdist peak MiB"] if not skip_cdist else []) + [f"{plan} peak MiB" for plan in PLANS]
    headers += ["plans' indices equal"] + ([] if skip_cdist else ["equal to cdist"])
    rows = []
    for k in sizes:
        codebook = (torch.randn(k, 32) * 32**-0.5).to(device)
        prepared = prepare_codebook(codebook)
        for n in batches:
            x = (torch.randn(n, 32) * 32**-0.5).to(device)
            fns = {plan: (lambda plan=plan, x=x, c=codebook, p=prepared: nearest_code(x, c, budget, p, plan=plan))
                   for plan in PLANS}
            found = {plan: fn().indices for plan, fn in fns.items()}
            plans_equal = all(torch.equal(found[p], found[PLANS[0]]) for p in PLANS)
            peaks = {plan: peak_bytes(fn, device) for plan, fn in fns.items()}  # each plan warmed just before
            times = {plan: timed(fn, device, repeats) for plan, fn in fns.items()}
            row: list[object] = [f"{n:,}", f"{k:,}"]
            if not skip_cdist:
                def reference(x=x, c=codebook):
                    return torch.cdist(x, c).argmin(1)

                expected = reference()
                agree = (found[PLANS[0]] == expected).float().mean().item()
                t_ref = timed(reference, device, repeats)
                m_ref = peak_bytes(reference, device)
                row.append(f"{n / t_ref:,.0f}")
            for plan in PLANS:
                row.append(f"{n / times[plan]:,.0f}")
                if not skip_cdist:
                    row.append(f"{t_ref / times[plan]:.2f}x")
            if not skip_cdist:
                row.append(f"{m_ref / 2**20:.1f}")
            row += [f"{peaks[plan] / 2**20:.1f}" for plan in PLANS]
            row.append("yes" if plans_equal else "**NO**")
            if not skip_cdist:
                row.append(f"{agree:.4f}")
            rows.append(row)
            print(row, flush=True)
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="codebooks 32,768 and 98,304, batch 1,024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="codebook sizes")
    parser.add_argument("--batches", type=int, nargs="+", help="vectors per search")
    parser.add_argument("--budget-mib", type=float, default=DEFAULT_MEMORY_BUDGET / 2**20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cdist", action="store_true", help="do not run the cdist reference")
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    budget = int(args.budget_mib * 2**20)
    sizes = args.sizes or ([32768, 98304] if args.quick else [4096, 32768, 98304])
    batches = args.batches or ([1024] if args.quick else [256, 1024, 4096])
    headers, rows = run(device, sizes, batches, budget, args.repeats, args.skip_cdist)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    text = f"Device: {device} ({name}); torch {torch.__version__}; budget {budget / 2**20:.0f} MiB\n\n"
    text += table(headers, rows) + "\n"
    print("\n" + text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0 if all("**NO**" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
