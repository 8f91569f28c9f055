"""The fast path's one-time measured choices on this CPU, repeated: what each measures, its times, what it picks.

    python benchmarks/bench_kernel_choices.py                       # released widths, 5 repeats
    python benchmarks/bench_kernel_choices.py --repeats 9 --output benchmarks/results/kernel_choices_amd.md

``optimize_for_inference()`` on CPU decides eight things by timing them once per process
(:mod:`dualvitok.inference`): bf16 itself (:func:`dualvitok.cpu.low_precision_speedup`), the oneDNN convolution with a
fused residual addition (:func:`dualvitok.blocks.fused.fused_conv_add_pays`), prepacked linear weights in bf16 and
for the float32 semantic head (:func:`dualvitok.blocks.packed.packed_linear_pays`), prepacked convolution weights
(:func:`dualvitok.blocks.packed_conv.packed_conv_pays`), Winograd convolutions in a float32 decoder
(:func:`dualvitok.blocks.winograd.winograd_conv_pays`), the native GroupNorm + SiLU kernel
(:func:`dualvitok.blocks.norm_silu.native_norm_silu_pays`) and the native RoPE kernel
(:func:`dualvitok.blocks.native_rope.native_rope_pays`). This runs each of them ``--repeats`` times at the released
architecture's widths (its caches cleared in between), in a process with freed buffers kept for reuse as the plan
sets it before it measures (``--default-malloc``: glibc's defaults; the native norm kernel's margin depends on it), and
tabulates the candidate's and the baseline's best times
from each measurement's log record, the speedup and how often the candidate was chosen. So a choice can be checked
on each kind of CPU, and one that flips between repeats (a near tie on this CPU) shows as such.

Only the choices the plan makes on this CPU are timed: where bf16 is emulated (x86 without AVX-512-BF16 or AMX, where
a bf16 convolution at the decoder's width takes tens of seconds) every stage stays float32, so the bf16 choices are
left out and the fused convolution + addition is timed in float32; where bf16 runs natively the decoder is bf16 and
the Winograd choice (float32 decoders only) is left out.
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from _common import emit_report, machine, table

from dualvitok import cpu
from dualvitok.blocks import fused, native_rope, norm_silu, packed, packed_conv, winograd
from dualvitok.devices import keep_freed_cpu_memory

# released architecture (dualvitok_anyres_max512): pixel decoder base and widest widths, tower width, heads and head
# size, semantic head width
DECODER_WIDTH, DECODER_WIDEST, TOWER_WIDTH, TOWER_HEADS, TOWER_HEAD_DIM, HEAD_WIDTH = 384, 1536, 1280, 16, 80, 1280


class _Records(logging.Handler):
    """Keeps the ``measure_choice`` records (``what: cand ms name vs base ms name: chosen``) logged while active."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.rows: list[tuple] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "%s: %.2f ms %s vs %.2f ms %s: %s":
            what, cand_ms, cand, base_ms, base, chosen = record.args
            self.rows.append((what, cand, cand_ms, base, base_ms, chosen == cand))


def _choices(native_bf16: bool) -> dict:
    """Name -> (call that measures once, function clearing its cache), for the plan this CPU gets (``native_bf16``:
    bf16 stages; else every stage float32)."""
    decoder_dtype = torch.bfloat16 if native_bf16 else torch.float32
    choices = {
        "bf16 matrix products": (lambda: cpu.low_precision_speedup(torch.bfloat16), cpu._speedups.clear),
        "fused convolution + addition": (lambda: fused.fused_conv_add_pays(DECODER_WIDTH, decoder_dtype),
                                         fused._fusion_choices.clear),
        "prepacked linear weights": (lambda: packed.packed_linear_pays(TOWER_WIDTH, torch.bfloat16),
                                     packed._choices.clear),
        "prepacked float32 linear weights (semantic head)": (
            lambda: packed.packed_linear_pays(HEAD_WIDTH, torch.float32), packed._choices.clear),
        "prepacked convolution weights": (lambda: packed_conv.packed_conv_pays(DECODER_WIDEST, torch.bfloat16),
                                          packed_conv._choices.clear),
        "Winograd convolutions (float32 decoder)": (lambda: winograd.winograd_conv_pays(DECODER_WIDTH),
                                                    winograd._choices.clear),
        "native GroupNorm + SiLU": (lambda: norm_silu.native_norm_silu_pays(DECODER_WIDTH, torch.bfloat16),
                                    norm_silu._choices.clear),
        "native RoPE": (lambda: native_rope.native_rope_pays(TOWER_HEADS, TOWER_HEAD_DIM), native_rope._choices.clear),
    }
    bf16_only = ("prepacked linear weights", "prepacked float32 linear weights (semantic head)",  # behind a bf16 tower
                 "prepacked convolution weights", "native GroupNorm + SiLU", "native RoPE")
    left_out = ("Winograd convolutions (float32 decoder)",) if native_bf16 else bf16_only
    return {name: value for name, value in choices.items() if name not in left_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each choice (default: 5)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator alone (the plan keeps freed buffers before it measures)")
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    args = parser.parse_args()
    kept = False if args.default_malloc else bool(keep_freed_cpu_memory())  # as optimize_for_inference() on CPU
    torch.manual_seed(0)
    handler = _Records()
    library = logging.getLogger("dualvitok")  # every module's logger propagates to it
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    rows = []
    native_bf16 = cpu.cpu_bf16_support() != "none"
    for label, (measure, clear) in _choices(native_bf16).items():
        handler.rows.clear()
        for _ in range(args.repeats):
            clear()
            measure()
        # one choice may log several measurements (bf16: a probe, then the full product): group by what was timed
        for what in dict.fromkeys(r[0] for r in handler.rows):
            mine = [r for r in handler.rows if r[0] == what]
            speedups = [r[4] / r[2] for r in mine]
            rows.append([label, what, f"{mine[0][1]} / {mine[0][3]}",
                         f"{statistics.median(r[2] for r in mine):.2f} / {statistics.median(r[4] for r in mine):.2f}",
                         f"{min(speedups):.2f}x / {statistics.median(speedups):.2f}x / {max(speedups):.2f}x",
                         f"{sum(r[5] for r in mine)} of {len(mine)}"])
    if not rows:
        raise SystemExit("no measurement was logged: are the native kernels unavailable and bf16 unsupported here?")
    bf16 = cpu.cpu_bf16_support()
    report = "\n".join([
        f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 support {bf16!r}",
        "",
        f"Each choice measured {args.repeats} times at the released architecture's widths (decoder {DECODER_WIDTH}, "
        f"tower {TOWER_WIDTH}, {TOWER_HEADS} heads of {TOWER_HEAD_DIM}); times are each measurement's best of its "
        "interleaved rounds, medians over the repeats; speedup = baseline / candidate (min / median / max). "
        f"Freed buffers kept for reuse: {'yes (as the fast path' + chr(39) + 's CPU plan)' if kept else 'no'}.",
        "",
        table(["choice", "what is timed", "candidate / baseline", "median ms (candidate / baseline)",
               "speedup", "candidate chosen"], rows)])
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
