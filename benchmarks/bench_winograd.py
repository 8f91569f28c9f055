"""Winograd float32 convolutions (NNPACK) against oneDNN's direct ones, at the released pixel decoder's shapes.

    python benchmarks/bench_winograd.py                                   # 256x256 images, batch 1 and 8
    python benchmarks/bench_winograd.py --sizes 256 512 --batches 1 --output benchmarks/results/winograd_avx2.md

Where the fast path keeps the pixel decoder in float32 (CPUs without bf16 matrix hardware), its 3x3 convolutions on
maps of at least 64x64 positions can compute with NNPACK's Winograd algorithm
(:mod:`dualvitok.blocks.winograd`). For each distinct 3x3 convolution of the released decoder (its channels and map
size for the given image size), this times ``F.conv2d`` in channels_last (the fast path's layout otherwise) and in
NCHW (the layout the decoder keeps when Winograd is chosen) against :func:`dualvitok.blocks.winograd.winograd_conv2d`,
interleaved, best of ``--rounds``, and reports each one's largest error against a float64 convolution relative to
the output's largest magnitude, and whether the plan's rule (:data:`~dualvitok.blocks.winograd.MIN_POSITIONS`)
uses Winograd there. The whole decode, with and without it, is ``bench_reference.py --paths
reference,fast,fast_direct_conv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import emit_report, machine, table

from dualvitok._utils.timing import interleaved_times
from dualvitok.blocks import winograd
from dualvitok.pixel import movq_decoder
from dualvitok.registry import get_config


def decoder_shapes(size: int) -> list[tuple[int, int, int]]:
    """``(in_channels, out_channels, map side)`` of the released pixel decoder's 3x3 convolutions for ``size``-pixel
    images, read off a forward pass on the meta device (no memory, no compute)."""
    cfg = get_config("dualvitok_anyres_max512")
    shapes: set[tuple[int, int, int]] = set()

    def record(conv: torch.nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        if conv.kernel_size == (3, 3):
            shapes.add((conv.in_channels, conv.out_channels, args[0].shape[-1]))

    with torch.device("meta"):
        decoder = movq_decoder(cfg.pixel_decoder)
        for conv in decoder.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.register_forward_hook(record)
        latent = size // 2 ** (len(cfg.pixel_decoder.ch_mult) - 1)
        z = torch.empty(1, cfg.pixel_decoder.z_channels, latent, latent)
        decoder(z, torch.empty(1, cfg.pixel_decoder.embed_dim, latent, latent))
    return sorted(shapes, key=lambda s: (-s[2], s[0], s[1]))


def _runs(conv: torch.nn.Conv2d, weight_last: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The three ways to compute ``conv(x)`` that are timed."""
    x_last = x.contiguous(memory_format=torch.channels_last)
    return {"direct channels_last": lambda: F.conv2d(x_last, weight_last, conv.bias, padding=1),
            "direct NCHW": lambda: F.conv2d(x, conv.weight, conv.bias, padding=1),
            "winograd": lambda: winograd.winograd_conv2d(x, conv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    args = parser.parse_args()
    if not winograd.available():
        raise SystemExit("NNPACK's convolution does not run in this build or on this CPU")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        for c_in, c_out, side in decoder_shapes(size):
            conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).eval().requires_grad_(False)
            weight_last = conv.weight.contiguous(memory_format=torch.channels_last)
            for batch in args.batches:
                x = torch.randn(batch, c_in, side, side, generator=generator)
                runs = _runs(conv, weight_last, x)
                with torch.inference_mode():
                    best = {name: min(t) for name, t in interleaved_times(runs, args.rounds).items()}
                    exact = F.conv2d(x[:1].double(), conv.weight.double(), conv.bias.double(), padding=1)
                    scale = exact.abs().max().item()
                    errors = {name: (runs[name]()[:1].double() - exact).abs().max().item() / scale
                              for name in ("direct channels_last", "winograd")}
                gflop = 2 * c_in * c_out * 9 * side * side * batch / 1e9
                with torch.inference_mode():
                    used = winograd.can_winograd(conv) and winograd.usable(x, conv)  # the plan's rule
                rows.append([size, batch, f"{c_in} -> {c_out}", f"{side}x{side}", f"{gflop:.1f}",
                             *(f"{best[n] * 1e3:.1f}" for n in runs),
                             f"{best['direct channels_last'] / best['winograd']:.2f}x",
                             f"{errors['direct channels_last']:.1e} / {errors['winograd']:.1e}",
                             "yes" if used else "no"])
                print(" | ".join(str(v) for v in rows[-1]), flush=True)
    report = "\n".join([
        f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}",
        "",
        f"The released pixel decoder's 3x3 convolutions, float32, best of {args.rounds} interleaved rounds; error: "
        "largest absolute difference from a float64 convolution over the largest output magnitude (first image).",
        "",
        table(["image", "batch", "channels", "map", "GFLOP", "direct channels_last ms", "direct NCHW ms",
               "Winograd ms", "Winograd speedup (vs channels_last)", "error direct / Winograd", "plan uses it"],
              rows)])
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
