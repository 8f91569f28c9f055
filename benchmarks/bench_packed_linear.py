"""Prepacked bf16 linear weights against ``F.linear``: the vision tower's GEMMs, then whole encodes, side by side.

    python benchmarks/bench_packed_linear.py                          # released architecture, 256x256, batch 1
    python benchmarks/bench_packed_linear.py --sizes 256 512 --rounds 7 --output out.md

1. **GEMMs.** The four linear layers of a Qwen2-VL vision block (qkv, proj, fc1, fc2 at width 1280) on the row
   count of one 256x256 image (324 tokens), bf16: ``F.linear`` against :func:`dualvitok.blocks.packed.packed_linear`
   on a weight packed once, interleaved, best of 5 per round, with a square 2048 GEMM in the same round for scale.
2. **Encode.** The same random-weight model prepared twice, ``optimize_for_inference(pack_linear=False)`` and
   ``pack_linear=True`` (packed weights and the quick-GELU fold of the vision MLPs; the rest of the plan fixed:
   fused convolutions off in both), encodes the bundled photo (``--batch`` copies) in interleaved rounds; best and
   median, and whether the two give the same indices.

Single timings on a shared machine move a lot; the ratios of one run are the figures to quote.
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from _common import best_time, emit_report, kernel_ab_parser, machine, table

from dualvitok import ImageProcessor
from dualvitok._utils.timing import interleaved_times
from dualvitok.assets import sample_images
from dualvitok.blocks import packed
from dualvitok.cpu import cpu_bf16_support
from dualvitok.loading import load_model

SHAPES = {"qkv": (1280, 3840), "proj": (1280, 1280), "fc1": (1280, 5120), "fc2": (5120, 1280)}


def gemm_rows(rounds: int, tokens: int) -> list[list[str]]:
    a, b = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    gflops = {name: {"plain": [], "packed": []} for name in SHAPES}
    squares = []
    with torch.inference_mode():
        layers = {}
        for name, (n_in, n_out) in SHAPES.items():
            weight, bias = (torch.randn(n_out, n_in) * n_in**-0.5).bfloat16(), torch.zeros(n_out).bfloat16()
            layers[name] = (torch.randn(tokens, n_in).bfloat16(), weight, bias, packed.pack_weight(weight, tokens))
        for _ in range(rounds):
            squares.append(2 * 2048**3 / best_time(lambda: a @ b, repeats=5) / 1e9)
            for name, (x, weight, bias, pw) in layers.items():
                flop = 2 * tokens * weight.shape[0] * weight.shape[1]
                gflops[name]["plain"].append(flop / best_time(lambda x=x, w=weight, b=bias: F.linear(x, w, b), 5) / 1e9)
                run = lambda x=x, w=pw, b=bias: packed.packed_linear(x, w, b)  # noqa: E731
                gflops[name]["packed"].append(flop / best_time(run, 5) / 1e9)
    rows = []
    for name, g in gflops.items():
        ratios = [p / q for p, q in zip(g["packed"], g["plain"], strict=True)]
        rows.append([name, f"{tokens} x {SHAPES[name][0]} x {SHAPES[name][1]}", f"{max(g['plain']):.0f}",
                     f"{max(g['packed']):.0f}", f"**{max(g['packed']) / max(g['plain']):.2f}x** / "
                     f"{statistics.median(ratios):.2f}x"])
    rows.append(["square 2048 GEMM (scale)", "2048 x 2048 x 2048", f"{min(squares):.0f}-{max(squares):.0f}", "", ""])
    return rows


def encode_rows(model_name: str, sizes: list[int], batch: int, rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    base = load_model(model_name).eval().requires_grad_(False)
    paths = {"plain": copy.deepcopy(base).optimize_for_inference(pack_linear=False, fuse_conv=False),
             "packed": base.optimize_for_inference(pack_linear=True, fuse_conv=False)}
    rows = []
    for size in sizes:
        x = ImageProcessor(size=(size, size))(sample_images()[0]).expand(batch, -1, -1, -1).contiguous()
        with torch.inference_mode():
            outputs = {k: m.encode(x) for k, m in paths.items()}  # packs on the first call
            times = interleaved_times({k: (lambda m=m, x=x: m.encode(x)) for k, m in paths.items()}, rounds)
        same = all(torch.equal(getattr(outputs["plain"], f), getattr(outputs["packed"], f))
                   for f in ("semantic_indices", "pixel_indices"))
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append([f"{size}x{size}", str(batch), f"{best['plain']:.3f}", f"{best['packed']:.3f}",
                     f"**{best['plain'] / best['packed']:.2f}x** / {med['plain'] / med['packed']:.2f}x",
                     "yes" if same else "no"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = kernel_ab_parser(__doc__)
    args = parser.parse_args()
    if not packed.can_pack(torch.zeros(1, dtype=torch.bfloat16)):
        raise SystemExit("the oneDNN bf16 packing operators do not run on this build or CPU: nothing to compare")
    gemms = gemm_rows(args.rounds, tokens=324)
    print(gemms, flush=True)
    encodes = encode_rows(args.model, args.sizes, args.batch, args.rounds)
    report = (f"Machine: {machine()}; CPU bf16 matrix support: {cpu_bf16_support()}; {args.rounds} interleaved "
              "rounds\n\n## Vision block GEMMs (bf16, GFLOP/s, best over rounds)\n\n"
              + table(["layer", "M x K x N", "F.linear", "packed", "packed vs F.linear (best / median)"], gemms)
              + f"\n\n## Encode ({args.model}, seeded random weights, the fast path with and without packing)\n\n"
              + table(["size", "batch", "F.linear s (best)", "packed s (best)", "packed vs F.linear (best / median)",
                       "same indices"], encodes) + "\n")
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
