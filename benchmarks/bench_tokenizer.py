"""DualViTok throughput, memory, FLOPs and fast-path quality: the float32 reference path against the fast path.

    python benchmarks/bench_tokenizer.py                       # released architecture, 256 and 512, batch 1 and 8
    python benchmarks/bench_tokenizer.py --sizes 256 --batches 1 --repeats 3
    python benchmarks/bench_tokenizer.py --model dualvitok_tiny --quality-only
    python benchmarks/bench_tokenizer.py --sizes 256 --batches 1 --keep-freed-memory  # glibc keeps freed buffers

Both paths run in one process, on the same model weights (random, or ``--model`` a checkpoint), with their timed calls
interleaved so that machine noise affects both alike. The first configuration is warmed up and timed ``--repeats``
times (best kept); later ones once (they are long on a 2-core CPU). encode+decode time = encode + decode (from
indices); peak memory is the largest RSS increase during a call (meaningless with ``--keep-freed-memory``, where the
process keeps its peak). "fast" is ``model.optimize_for_inference(keep_freed_memory=False)`` (bf16 stages,
channels_last convolutions with fused residual additions, float32 encoders in front of the quantizers), so that
``--keep-freed-memory`` alone sets the process's allocator, for both paths. FLOPs are counted with
``torch.utils.flop_counter`` on the float32 path; the achieved FLOP/s is compared with this machine's measured GEMM
peak (``torch.mm`` of 2048x2048 operands) in float32 and bf16. The quality guard compares the fast path's
reconstructions and indices with the float32 path's on the bundled real photos.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math

import torch
from _common import PeakMemory, gemm_peak, machine, table
from torch.utils.flop_counter import FlopCounterMode

from dualvitok import ImageProcessor
from dualvitok.assets import sample_images
from dualvitok.loading import load_model


def _images(size: int, batch: int) -> torch.Tensor:
    processor = ImageProcessor(size=(size, size))
    paths = sample_images()
    return torch.cat([processor(paths[i % len(paths)]) for i in range(batch)])


def _stages(model, x):
    """``encode`` and ``decode`` (from the indices of a cached encoding) as zero-argument callables."""
    cached = model.encode(x)
    return {
        "encode": lambda: model.encode(x),
        "decode": lambda: model.decode_indices(cached.semantic_indices, cached.pixel_indices),
    }


def _interleaved(fns: dict, repeats: int, warmup: bool) -> tuple[dict, dict]:
    """Best time and peak RSS increase of each callable, the callables run in turn ``repeats`` times."""
    import time

    if warmup:
        for fn in fns.values():
            fn()
    best = {k: float("inf") for k in fns}
    peak = {k: 0 for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
            peak[k] = max(peak[k], mem.peak)
    return best, peak


def _flops(model, x) -> dict[str, float]:
    """FLOPs of each stage for the batch ``x`` (counted on one image, times the batch size)."""
    out = {}
    with torch.inference_mode():
        for name, fn in _stages(model, x[:1]).items():
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = counter.get_total_flops() * x.shape[0]
    return out


def quality(reference, fast, size: int) -> list[object]:
    """PSNR of the fast reconstruction against the float32 one and the share of equal indices, on real photos."""
    processor = ImageProcessor(size=(size, size))
    psnrs, sem_eq, pix_eq, sem_n, pix_n = [], 0, 0, 0, 0
    for path in sample_images():
        x = processor(path)
        with torch.inference_mode():
            a, b = reference.encode(x), fast.encode(x)
            ra = reference.decode_indices(a.semantic_indices, a.pixel_indices)
            rb = fast.decode_indices(b.semantic_indices, b.pixel_indices)
        mse = (ra - rb).pow(2).mean().item()
        psnrs.append(float("inf") if mse == 0 else 10 * math.log10(4.0 / mse))  # data range 2 ([-1, 1])
        sem_eq += int((a.semantic_indices == b.semantic_indices).sum())
        pix_eq += int((a.pixel_indices == b.pixel_indices).sum())
        sem_n, pix_n = sem_n + a.semantic_indices.numel(), pix_n + a.pixel_indices.numel()
    return [f"{size}x{size}", len(psnrs), f"{sum(psnrs) / len(psnrs):.1f}", f"{min(psnrs):.1f}",
            f"{sem_eq / sem_n:.4f}", f"{pix_eq / pix_n:.4f}", f"{(sem_eq + pix_eq) / (sem_n + pix_n):.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dualvitok_anyres_max512", help="registered name (random weights) or path")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quality-sizes", type=int, nargs="*", default=[256], help="sizes of the quality guard")
    parser.add_argument("--quality-only", action="store_true")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="dualvitok.devices.keep_freed_cpu_memory() for the whole process (both paths)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        from dualvitok.devices import keep_freed_cpu_memory

        print(f"keep_freed_cpu_memory: {keep_freed_cpu_memory()}")
    torch.manual_seed(0)
    reference = load_model(args.model).eval().requires_grad_(False)
    # the process's allocator is --keep-freed-memory's to set, for both paths
    fast = copy.deepcopy(reference).optimize_for_inference(keep_freed_memory=False)
    print(f"Machine: {machine()}\nModel: {args.model}\n", flush=True)

    quality_rows = [quality(reference, fast, s) for s in args.quality_sizes]
    print(table(["size", "photos", "mean PSNR fast vs fp32 (dB)", "min PSNR (dB)", "semantic idx equal",
                 "pixel idx equal", "all idx equal"], quality_rows), flush=True)
    if args.quality_only:
        return

    peaks = {torch.float32: gemm_peak(torch.float32), torch.bfloat16: gemm_peak(torch.bfloat16)}
    print(f"\nGEMM peak: float32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s\n", flush=True)
    # the fast path is held to bf16's peak where its plan converted a stage, else to float32's (no bf16 instructions)
    fast_peak = torch.bfloat16 if fast.inference_plan.low_precision else torch.float32
    rows = []
    first = True
    for size in args.sizes:
        for batch in args.batches:
            x = _images(size, batch)
            flops = _flops(reference, x)
            flops["encode+decode"] = flops["encode"] + flops["decode"]
            with torch.inference_mode():
                fns = {(path, stage): fn for path, model in (("fp32", reference), ("fast", fast))
                       for stage, fn in _stages(model, x).items()}
                times, peaks_mem = _interleaved(fns, args.repeats if first else 1, warmup=first)
            first = False
            for path in ("fp32", "fast"):
                times[(path, "encode+decode")] = times[(path, "encode")] + times[(path, "decode")]
                peaks_mem[(path, "encode+decode")] = max(peaks_mem[(path, "encode")], peaks_mem[(path, "decode")])
            for stage in ("encode", "decode", "encode+decode"):
                t32, tf = times[("fp32", stage)], times[("fast", stage)]
                rows.append([
                    f"{size}x{size}", batch, stage, f"{flops[stage] / batch / 1e9:,.0f}",
                    f"{batch / t32:.3f}", f"{batch / tf:.3f}", f"**{t32 / tf:.2f}x**",
                    f"{flops[stage] / t32 / peaks[torch.float32]:.0%}",
                    f"{flops[stage] / tf / peaks[fast_peak]:.0%}",
                    f"{peaks_mem[('fp32', stage)] / 2**30:.2f}", f"{peaks_mem[('fast', stage)] / 2**30:.2f}",
                ])
                print(rows[-1], flush=True)
    print()
    print(table(["size", "batch", "stage", "GFLOP/img", "fp32 img/s", "fast img/s", "fast/fp32",
                 "fp32 % of fp32 GEMM peak", f"fast % of {str(fast_peak).removeprefix('torch.')} GEMM peak",
                 "fp32 peak GiB", "fast peak GiB"], rows))


if __name__ == "__main__":
    main()
