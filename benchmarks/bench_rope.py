"""The native RoPE kernel against PyTorch's operators: alone at the released tower's shapes, and in whole encodes.

    python benchmarks/bench_rope.py                                   # 256x256 (batch 1 and 8) and 512x512
    python benchmarks/bench_rope.py --sizes 256 --batches 1 --encode-rounds 3 --output benchmarks/results/rope.md

1. **Alone.** ``dualvitok.blocks.native_rope.rotate_queries_keys(native=True/False)`` on a bf16 qkv of the released
   tower (16 heads of 80) for each image size and batch, interleaved, best and median of ``--rounds``; the two
   outputs are compared bit for bit.
2. **In the model.** ``encode`` of the released architecture (random weights) on the fast path, with the kernel on
   and off (``dualvitok.inference.use_kernels(native_rope=...)``, one prepared model), interleaved, best and median
   of ``--encode-rounds``; the semantic indices of both are compared. ``--encode-rounds 0`` skips this part.
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

from dualvitok import create_model, devices  # noqa: E402
from dualvitok._utils.timing import interleaved_times  # noqa: E402
from dualvitok.blocks import native_rope  # noqa: E402
from dualvitok.inference import use_kernels  # noqa: E402
from dualvitok.registry import get_config  # noqa: E402

MODEL = "dualvitok_anyres_max512"


def _ratio(times: dict[str, list[float]]) -> str:
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    return f"**{best['plain'] / best['native']:.2f}x** / {median['plain'] / median['native']:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (multiples of 28)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the kernel alone")
    parser.add_argument("--encode-rounds", type=int, default=3, help="rounds of whole encodes (0: skip them)")
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    args = parser.parse_args()
    devices.keep_freed_cpu_memory()  # as the fast path's CPU plan runs
    if not native_rope.native_available():
        raise SystemExit("the native kernel is unavailable here (no C compiler, or its build failed: see the log)")
    tower = get_config(MODEL).semantic_encoder.semantic_encoder_config
    heads, head_dim = tower.num_heads, tower.embed_dim // tower.num_heads
    configs = [(size, batch) for size in args.sizes for batch in args.batches if size < 512 or batch == 1]
    alone, whole = [], []
    generator = torch.Generator().manual_seed(0)
    for size, batch in configs:
        grid = round(size / tower.patch_size / 2) * 2  # the processor's patch grid (a multiple of the 2x2 merge)
        rope = native_rope._rope(grid, grid, head_dim)
        qkv = (torch.randn(batch, grid * grid, 3, heads, head_dim, generator=generator) * 3).bfloat16()
        with torch.inference_mode():
            times = interleaved_times({"native": partial(native_rope.rotate_queries_keys, qkv, rope, native=True),
                                       "plain": partial(native_rope.rotate_queries_keys, qkv, rope, native=False)},
                                      args.rounds)
            same = torch.equal(native_rope.rotate_queries_keys(qkv, rope, native=True).view(torch.int16),
                               native_rope.rotate_queries_keys(qkv, rope, native=False).view(torch.int16))
        alone.append([f"{size}x{size}", batch, f"[{batch}, {grid * grid}, 3, {heads}, {head_dim}]",
                      f"{min(times['plain']) * 1e3:.3f}", f"{min(times['native']) * 1e3:.3f}", _ratio(times),
                      "yes" if same else "**no**"])
    if args.encode_rounds > 0:
        torch.manual_seed(0)
        model = create_model(MODEL).eval().optimize_for_inference()
        for size, batch in configs:
            images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
            indices = {}

            def encode(flag: bool, images=images, indices=indices) -> None:
                use_kernels(model, native_rope=flag)
                with torch.inference_mode():
                    indices[flag] = model.encode(images).semantic_indices

            times = interleaved_times({"native": partial(encode, True), "plain": partial(encode, False)},
                                      args.encode_rounds)
            whole.append([f"{size}x{size}", batch, f"{min(times['plain']):.3f}", f"{min(times['native']):.3f}",
                          _ratio(times), "yes" if torch.equal(indices[True], indices[False]) else "**no**"])
    parts = [f"Command: `python benchmarks/bench_rope.py {' '.join(sys.argv[1:])}`",
             f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}; freed buffers kept "
             "for reuse (as the fast path's CPU plan)",
             f"The kernel alone ({args.rounds} interleaved rounds):",
             table(["image", "batch", "qkv (bf16)", "PyTorch ms (best)", "native ms (best)",
                    "native vs PyTorch (best / median)", "bit for bit"], alone)]
    if whole:
        parts += [f"Whole encodes of `{MODEL}` on the fast path, random weights ({args.encode_rounds} interleaved "
                  "rounds):",
                  table(["image", "batch", "kernel off s (best)", "kernel on s (best)", "on vs off (best / median)",
                         "same semantic indices"], whole)]
    emit_report("\n\n".join(parts), args.output)


if __name__ == "__main__":
    main()
