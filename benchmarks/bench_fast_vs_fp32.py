"""Is the fast path ever slower than float32? Every registered architecture (and the demo) at small and usual sizes.

    python benchmarks/bench_fast_vs_fp32.py                                  # demo, tiny, released; 64/128/256
    python benchmarks/bench_fast_vs_fp32.py --models demo --sizes 32 64 --rounds 7 --output out.md

For each model (seeded random weights, or the bundled demo's) and size (batch 1), the float32 path and the fast path
(``optimize_for_inference()``, the plan this CPU gets) encode and decode the same photo in interleaved rounds after a
warm-up; the table gives the best and median time of each and the fast/float32 ratio (above 1: the fast path is
faster), with the stages the plan converted. Both run in one process, after the plan's allocator setting (on CPU,
freed buffers kept for reuse), so they meet the same allocator. ``dualvitok_fix256`` has the released
architecture's widths, so it is not timed separately. This is the measurement behind the "never slower than
float32" rule of :mod:`dualvitok.inference` and the size rule of ``dualvitok encode``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from functools import partial

import torch
from _common import emit_report, machine, table

from dualvitok import ImageProcessor
from dualvitok._utils.timing import interleaved_times
from dualvitok.assets import sample_images
from dualvitok.cpu import cpu_bf16_support, onednn_isa_limit
from dualvitok.loading import load_model


def _call(model, x):
    enc = model.encode(x)
    model.decode_indices(enc.semantic_indices, enc.pixel_indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "dualvitok_tiny", "dualvitok_anyres_max512"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size (default: 5)")
    parser.add_argument("--output", default=None, help="write the Markdown table here too")
    args = parser.parse_args()

    rows, speedup = [], None
    photo = sample_images()[0]
    for name in args.models:
        torch.manual_seed(0)
        fp32 = load_model(name).eval().requires_grad_(False)
        fast = copy.deepcopy(fp32).optimize_for_inference()
        converted = ", ".join(n for n, d in fast.inference_plan.stage_dtypes.items() if d != "float32") or "none"
        speedup = fast.inference_plan.low_precision_speedup
        for size in args.sizes:
            x = ImageProcessor(size=(size, size))(photo)
            with torch.inference_mode():  # after a warm-up call of each (oneDNN primitives for these shapes)
                times = interleaved_times({"fp32": partial(_call, fp32, x), "fast": partial(_call, fast, x)},
                                          args.rounds)
            best = {k: min(v) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append([name, f"{size}x{size}", f"{best['fp32'] * 1e3:,.1f}", f"{best['fast'] * 1e3:,.1f}",
                         f"**{best['fp32'] / best['fast']:.2f}x** / {med['fp32'] / med['fast']:.2f}x", converted])
            print(rows[-1], flush=True)
    measured = f" (bf16 matrix products measured {speedup:.2f}x float32)" if speedup is not None else ""
    limit = f"; oneDNN limited to {onednn_isa_limit()}" if onednn_isa_limit() else ""
    report = (f"Machine: {machine()}; CPU bf16 matrix support: {cpu_bf16_support()}{measured}{limit}; batch 1, "
              f"{args.rounds} interleaved rounds after a warm-up\n\n"
              + table(["model", "size", "fp32 ms (best)", "fast ms (best)", "fast vs fp32 (best / median)",
                       "stages in bf16"], rows) + "\n")
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
