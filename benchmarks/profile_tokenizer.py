"""Where the time goes: per-stage times, FLOPs and share of the GEMM peak, and a torch.profiler table of operators.

    python benchmarks/profile_tokenizer.py                                   # released architecture, 256x256, batch 1
    python benchmarks/profile_tokenizer.py --size 512 --batch 1 --paths fast --top 12 --output prof.md

For each path (``fp32``: the float32 modules; ``fast``: ``optimize_for_inference()``), on the same random weights:

1. **Stages.** ``encode`` and ``decode_indices`` are run ``--repeats`` times (after a warm-up) with forward hooks
   timing each stage (vision tower, semantic head, pixel encoder, semantic decoder, pixel decoder; the quantizer
   searches and the glue are "other"). FLOPs per stage are counted with ``torch.utils.flop_counter`` on the float32
   modules, and each stage's achieved FLOP/s is given as a share of this machine's measured GEMM peak for the
   dtype the stage computes in.
2. **Operators.** One more call of each, under ``torch.profiler``, gives the top operators by self CPU time.

This is the profile the README's performance section quotes for the operators that hold the fast path back.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import gemm_peak, machine, table
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from dualvitok.cpu import cpu_bf16_support
from dualvitok.inference import PIXEL_BRANCHES, _stages
from dualvitok.loading import load_model


class StageMeter:
    """Forward hooks on each stage's entry and exit module that sum, per stage name, how much ``read()`` grew between
    them (``time.perf_counter`` for seconds, a ``FlopCounterMode``'s ``get_total_flops`` for FLOPs)."""

    def __init__(self, model, read: Callable[[], float]):
        self.totals: dict[str, float] = {}
        self._read, self._start = read, {}
        self._handles = []
        for stage in _stages(model):
            self._handles.append(stage.entry.register_forward_pre_hook(self._enter(stage.name)))
            self._handles.append(stage.exit.register_forward_hook(self._leave(stage.name)))

    def _enter(self, name):
        def hook(module, args):
            self._start[name] = self._read()
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            self.totals[name] = self.totals.get(name, 0) + self._read() - self._start.pop(name)
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def stage_flops(model, x) -> dict[str, float]:
    """FLOPs per stage name for the batch ``x`` (float32 modules), with ``"other"`` for the calls between stages."""
    counter = FlopCounterMode(display=False)
    meter = StageMeter(model, counter.get_total_flops)
    with torch.inference_mode(), counter:
        enc = model.encode(x)
        model.decode_indices(enc.semantic_indices, enc.pixel_indices)
    meter.remove()
    return {**meter.totals, "other": counter.get_total_flops() - sum(meter.totals.values())}


def profile_path(model, x, repeats: int, top: int):
    """(encode s, decode s, stage seconds per call, encode op table, decode op table) for one prepared model."""
    with torch.inference_mode():
        enc = model.encode(x)
        model.decode_indices(enc.semantic_indices, enc.pixel_indices)  # warm-up
        timer = StageMeter(model, time.perf_counter)
        t_enc, t_dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc = model.encode(x)
            t1 = time.perf_counter()
            model.decode_indices(enc.semantic_indices, enc.pixel_indices)
            t_enc.append(t1 - t0)
            t_dec.append(time.perf_counter() - t1)
        timer.remove()
        stages = {k: v / repeats for k, v in timer.totals.items()}
        stages["other"] = statistics.mean(t_enc) + statistics.mean(t_dec) - sum(stages.values())
        tables = []
        for fn in (lambda: model.encode(x), lambda: model.decode_indices(enc.semantic_indices, enc.pixel_indices)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            tables.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                                    max_name_column_width=40))
    return min(t_enc), min(t_dec), stages, tables[0], tables[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dualvitok_anyres_max512", help="registered name (random weights) or path")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--paths", nargs="+", default=["fp32", "fast"], choices=["fp32", "fast"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="operators in each profiler table (default: 15)")
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    peaks = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    model = load_model(args.model).eval().requires_grad_(False)
    flops = stage_flops(model, x)
    lines = [f"Machine: {machine()}; CPU bf16 support: {cpu_bf16_support()}",
             f"Model: {args.model}, {args.size}x{args.size}, batch {args.batch}; GEMM peak float32 "
             f"{peaks['float32'] / 1e9:.0f}, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s", ""]
    print("\n".join(lines), flush=True)
    for path in args.paths:
        if path == "fast":
            model.optimize_for_inference()
        t_enc, t_dec, stages, enc_table, dec_table = profile_path(model, x, args.repeats, args.top)
        for dtype, peak in (("float32", gemm_peak(torch.float32)), ("bfloat16", gemm_peak(torch.bfloat16))):
            peaks[dtype] = max(peaks[dtype], peak)  # a shared host's peak moves: keep the highest measured
        dtypes = getattr(model, "inference_plan", None)
        dtypes = dict(dtypes.stage_dtypes) if dtypes else {}
        if dtypes.get(PIXEL_BRANCHES, "float32") != "float32":  # most of its FLOPs are in the bf16 branches
            dtypes["pixel encoder"] = dtypes[PIXEL_BRANCHES]
        rows = []
        for name, sec in stages.items():
            dtype = dtypes.get(name, "float32")
            rate = flops.get(name, 0) / sec if sec > 0 else 0.0
            rows.append([name, dtype if name != "other" else "-", f"{flops.get(name, 0) / 1e9:,.1f}", f"{sec:.3f}",
                         f"{rate / 1e9:,.0f}", f"{rate / peaks[dtype]:.0%}" if name != "other" else "-"])
        total_flops = sum(flops.values())
        held_to = "bfloat16" if any(d != "float32" for d in dtypes.values()) else "float32"  # the plan's dtypes
        block = [f"## {path}: encode {t_enc:.3f} s, decode {t_dec:.3f} s (best of {args.repeats}); "
                 f"{total_flops / (t_enc + t_dec) / 1e9:,.0f} GFLOP/s over both "
                 f"({total_flops / (t_enc + t_dec) / peaks[held_to]:.0%} of the "
                 f"{held_to} peak, the highest measured: float32 "
                 f"{peaks['float32'] / 1e9:,.0f}, bf16 {peaks['bfloat16'] / 1e9:,.0f} GFLOP/s)", "",
                 table(["stage", "dtype", "GFLOP", "s (mean)", "GFLOP/s", "% of its dtype's GEMM peak"], rows), "",
                 f"### {path} encode: top operators by self CPU time", "", "```", enc_table, "```", "",
                 f"### {path} decode: top operators by self CPU time", "", "```", dec_table, "```", ""]
        print("\n".join(block), flush=True)
        lines += block
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
