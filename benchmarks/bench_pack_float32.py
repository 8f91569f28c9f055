"""The fast path's float32 semantic head on oneDNN's packed GEMM (``pack_float32``) against PyTorch's BLAS.

    python benchmarks/bench_pack_float32.py                           # released architecture, 256x256, batch 1
    python benchmarks/bench_pack_float32.py --sizes 256 512 --batch 8 --rounds 7 --output out.md

Behind the bf16 vision tower the fast path keeps the semantic head (4 vision blocks and two projections) in float32.
Its ``F.linear`` calls go to PyTorch's BLAS (MKL in the PyPI builds), which on some CPUs runs float32 GEMMs far
below oneDNN (on an AMD EPYC, about 210 against 480 GFLOP/s at 2048 x 2048, 2 threads). This measures:

1. **GEMMs.** The head's shapes (81 rows per 256x256 image) and a square 2048 GEMM: ``F.linear`` against
   :func:`dualvitok.blocks.packed.packed_linear` on a weight packed once, float32, best of 5 per round.
2. **Encode.** One random-weight model, prepared once (``optimize_for_inference()``), encodes the bundled photo
   with the head's layers switched between the two (their ``pack_float32`` switch, as
   :func:`dualvitok.inference.use_kernels` sets it, but keeping the packed copies) in interleaved rounds:
   best and median, and the share of semantic indices equal to the float32 path's (the same model before it was
   prepared) for each, and between the two.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from _common import best_time, emit_report, kernel_ab_parser, machine, table

from dualvitok import ImageProcessor
from dualvitok._utils.timing import interleaved_times
from dualvitok.assets import sample_images
from dualvitok.blocks import packed
from dualvitok.inference import _semantic_head_linears, use_kernels
from dualvitok.loading import load_model


def gemm_rows(width: int, tokens: int, rounds: int) -> list[list[str]]:
    shapes = {"square 2048": (2048, 2048, 2048), f"{width} -> {width}": (tokens, width, width),
              f"{width} -> {4 * width}": (tokens, width, 4 * width),
              f"{4 * width} -> {width}": (tokens, 4 * width, width)}
    rows = []
    with torch.inference_mode():
        for name, (m, k, n) in shapes.items():
            x, weight, bias = torch.randn(m, k), torch.randn(n, k) * k**-0.5, torch.zeros(n)
            pw = packed.pack_weight(weight, m)
            plain, fast = [], []
            for _ in range(rounds):
                run_plain = lambda x=x, w=weight, b=bias: F.linear(x, w, b)  # noqa: E731
                run_packed = lambda x=x, w=pw, b=bias: packed.packed_linear(x, w, b)  # noqa: E731
                plain.append(2 * m * k * n / best_time(run_plain, 5) / 1e9)
                fast.append(2 * m * k * n / best_time(run_packed, 5) / 1e9)
            ratios = [p / q for p, q in zip(fast, plain, strict=True)]
            rows.append([name, f"{m} x {k} x {n}", f"{max(plain):.0f}", f"{max(fast):.0f}",
                         f"**{max(fast) / max(plain):.2f}x** / {statistics.median(ratios):.2f}x"])
    return rows


def encode_rows(model_name: str, sizes: list[int], batch: int, rounds: int) -> tuple[list[list[str]], int]:
    """The encode table's rows, and the model's semantic head width."""
    torch.manual_seed(0)
    model = load_model(model_name).eval().requires_grad_(False)
    inputs = {s: ImageProcessor(size=(s, s))(sample_images()[0]).expand(batch, -1, -1, -1).contiguous() for s in sizes}
    with torch.inference_mode():
        reference = {s: model.encode(x).semantic_indices for s, x in inputs.items()}  # the float32 path
    model.optimize_for_inference()
    if not packed.can_pack(torch.zeros(1)):
        raise SystemExit("oneDNN's float32 packing operators do not run on this build or CPU")
    use_kernels(model, pack_float32=True)  # validates the switch for this plan (a bf16 tower)
    head = _semantic_head_linears(model)
    rows = []
    for size, x in inputs.items():
        def encode(on: bool, x=x):
            for linear in head:  # as use_kernels(model, pack_float32=on), without dropping the packed copies
                linear.pack_float32 = on
            return model.encode(x)

        with torch.inference_mode():
            indices = {on: encode(on).semantic_indices for on in (False, True)}  # packs on the first call
            times = interleaved_times({"BLAS": lambda: encode(False), "oneDNN": lambda: encode(True)}, rounds)
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        agree = {on: (indices[on] == reference[size]).float().mean().item() for on in (False, True)}
        rows.append([f"{size}x{size}", str(batch), f"{best['BLAS']:.3f}", f"{best['oneDNN']:.3f}",
                     f"**{best['BLAS'] / best['oneDNN']:.2f}x** / {med['BLAS'] / med['oneDNN']:.2f}x",
                     f"{agree[False]:.2%} / {agree[True]:.2%}",
                     f"{(indices[False] == indices[True]).float().mean().item():.2%}"])
        print(rows[-1], flush=True)
    return rows, model.config.semantic_encoder.embed_dim


def main() -> None:
    parser = kernel_ab_parser(__doc__)
    args = parser.parse_args()
    encodes, width = encode_rows(args.model, args.sizes, args.batch, args.rounds)
    gemms = gemm_rows(width, 81 * args.batch, args.rounds)  # 81 head tokens per 256x256 image
    report = "\n".join([
        f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}", "",
        "GEMMs, float32 (GFLOP/s, best of the rounds; ratio best / median):", "",
        table(["GEMM", "M x K x N", "F.linear (BLAS)", "packed (oneDNN)", "oneDNN vs BLAS"], gemms), "",
        f"Encode, the fast path with the semantic head on each ({args.rounds} interleaved rounds; s):", "",
        table(["size", "batch", "BLAS s (best)", "oneDNN s (best)", "oneDNN vs BLAS (best / median)",
               "semantic indices = float32 path (BLAS / oneDNN)", "semantic indices BLAS = oneDNN"], encodes)])
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
