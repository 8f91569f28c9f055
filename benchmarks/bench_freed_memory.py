"""Does keeping freed buffers (the fast path's CPU default) make memory pile up over mixed image sizes?

    python benchmarks/bench_freed_memory.py                                  # demo model, 60 sizes, batch 2
    python benchmarks/bench_freed_memory.py --model dualvitok_tiny --calls 100 --output out.md

One process per setting -- ``optimize_for_inference()`` (freed buffers kept for reuse, process-wide) and
``optimize_for_inference(keep_freed_memory=False)`` (glibc's defaults) -- each encodes and decodes the same seeded
sequence of random sizes (multiples of 16 between ``--min-side`` and ``--max-side``), recording its resident set size
(``/proc/self/statm``) every tenth call, its peak RSS (``ru_maxrss``) and its total time. Linux only (glibc).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker(args: argparse.Namespace) -> None:
    import torch
    from _common import print_result, rss_bytes

    from dualvitok.loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval().requires_grad_(False)
    model.optimize_for_inference(keep_freed_memory=args.worker == "kept")
    rng = random.Random(args.seed)
    sides = range(args.min_side // 16, args.max_side // 16 + 1)
    sizes = [(rng.choice(sides) * 16, rng.choice(sides) * 16) for _ in range(args.calls)]
    marks = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, (h, w) in enumerate(sizes):
            x = torch.rand(args.batch, 3, h, w) * 2 - 1
            enc = model.encode(x)
            model.decode_indices(enc.semantic_indices, enc.pixel_indices)
            if i % 10 == 9:
                marks.append(rss_bytes())
    print_result({"kept": model.inference_plan.keep_freed_memory, "rss": marks, "seconds": time.perf_counter() - t0,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="registered name (random weights) or path (default: demo)")
    parser.add_argument("--calls", type=int, default=60, help="encode+decode calls (default: 60)")
    parser.add_argument("--batch", type=int, default=2, help="images per call (default: 2)")
    parser.add_argument("--min-side", type=int, default=128, help="smallest side in pixels (default: 128)")
    parser.add_argument("--max-side", type=int, default=512, help="largest side in pixels (default: 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    parser.add_argument("--worker", choices=("kept", "default"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if not sys.platform.startswith("linux"):
        raise SystemExit("bench_freed_memory measures glibc's allocator: run it on Linux")
    if args.min_side % 16 or args.max_side % 16 or not 32 <= args.min_side <= args.max_side:
        parser.error("--min-side and --max-side: multiples of 16, 32 <= min <= max")

    sys.path.insert(0, str(HERE))
    from _common import emit_report, machine, run_worker, table

    rows = []
    for setting in ("kept", "default"):
        cmd = [sys.executable, __file__, "--worker", setting] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "output")]
        out = run_worker(cmd)
        rows.append([setting if out["kept"] or setting == "default" else f"{setting} (refused here)",
                     " / ".join(f"{r / 2**20:,.0f}" for r in out["rss"]), f"{out['peak'] / 2**20:,.0f}",
                     f"{out['seconds']:.1f}"])
        print(rows[-1], flush=True)
    report = (f"Machine: {machine()}; model {args.model}, {args.calls} calls of batch {args.batch} at random sizes "
              f"{args.min_side}-{args.max_side} (seed {args.seed}), one process per setting\n\n"
              + table(["freed buffers", "RSS MiB every 10 calls", "peak RSS MiB", "total s"], rows) + "\n")
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
