"""The native GroupNorm + modulation + SiLU kernel against PyTorch's operators at the released decoder's shapes.

    python benchmarks/bench_norm_silu.py                      # 256x256 and 512x512 outputs, batch 1
    python benchmarks/bench_norm_silu.py --sizes 256 --batch 8 --output benchmarks/results/norm_silu.md

For each level of the released pixel decoder (``dualvitok_anyres_max512``: widths 1536 / 768 / 768 / 384 / 384 from
the code map's size, a sixteenth of the output's, up to the output size) it times ``norm_silu(SpatialNorm, x, zq)``
on a channels_last bf16 map both ways (``dualvitok.blocks.norm_silu.norm_silu(native=True/False)``), interleaved,
best and median of ``--rounds``, and reports how far the kernel's values are from a float64 computation next to
PyTorch's bf16 ones.
Maps below the kernel's size threshold take PyTorch's operators in the model; they are timed here anyway
(``MIN_NATIVE_ELEMENTS`` is lifted) so the table shows where the threshold sits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_report, machine, table  # noqa: E402

from dualvitok import devices  # noqa: E402
from dualvitok._utils.timing import interleaved_times  # noqa: E402
from dualvitok.blocks import norm_silu  # noqa: E402
from dualvitok.blocks.norm import SpatialNorm  # noqa: E402
from dualvitok.registry import get_config  # noqa: E402


def _levels(size: int) -> list[tuple[int, int]]:
    """(channels, side) of each decoder level, lowest resolution (the code map's) first."""
    cfg = get_config("dualvitok_anyres_max512").pixel_decoder
    top = len(cfg.ch_mult) - 1
    if size % 2**top:
        raise SystemExit(f"--sizes: {size} is not a multiple of {2**top}")
    return [(cfg.ch * mult, size // 2 ** (top - i)) for i, mult in enumerate(reversed(cfg.ch_mult))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="output sizes (256 or 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    args = parser.parse_args()
    devices.keep_freed_cpu_memory()  # as the fast path's CPU plan runs
    if not norm_silu.native_available():
        raise SystemExit("the native kernel is unavailable here (no C compiler, or its build failed: see the log)")
    threshold, norm_silu.MIN_NATIVE_ELEMENTS = norm_silu.MIN_NATIVE_ELEMENTS, 0
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        for channels, side in _levels(size):
            norm = SpatialNorm(channels, 64).bfloat16().eval()
            x = torch.randn(args.batch, channels, side, side, generator=generator).mul(2).bfloat16()
            x = x.contiguous(memory_format=torch.channels_last)
            codes = _levels(size)[0][1]
            zq = torch.randn(args.batch, 64, codes, codes, generator=generator).bfloat16()
            zq = zq.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                times = interleaved_times({"native": partial(norm_silu.norm_silu, norm, x, zq, native=True),
                                           "plain": partial(norm_silu.norm_silu, norm, x, zq, native=False)},
                                          args.rounds)
                native = norm_silu.norm_silu(norm, x, zq, native=True).double()
                plain = norm_silu.norm_silu(norm, x, zq, native=False).double()
                want = norm_silu.float64_norm_silu(norm, x, zq)
            best = {k: min(v) for k, v in times.items()}
            median = {k: statistics.median(v) for k, v in times.items()}
            rows.append([f"{size}x{size}", f"[{args.batch}, {channels}, {side}, {side}]",
                         "yes" if x[0].numel() >= threshold else "no",
                         f"{best['plain'] * 1e3:.2f}", f"{best['native'] * 1e3:.2f}",
                         f"**{best['plain'] / best['native']:.2f}x** / {median['plain'] / median['native']:.2f}x",
                         f"{(plain - want).abs().mean().item():.2e} / {(native - want).abs().mean().item():.2e}"])
    report = "\n\n".join([
        f"Command: `python benchmarks/bench_norm_silu.py {' '.join(sys.argv[1:])}`",
        f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}; {args.rounds} interleaved "
        "rounds; freed buffers kept for reuse (as the fast path's CPU plan)",
        table(["output", "map (bf16, channels_last)", "kernel used in the model", "PyTorch ms (best)",
               "native ms (best)", "native vs PyTorch (best / median)", "mean abs error vs float64 (PyTorch / native)"],
              rows)])
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
