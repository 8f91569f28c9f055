"""Layout and element-wise fixes of the float32 path, each against what it replaced, side by side in one process.

    python benchmarks/bench_layouts.py                                # released architecture, 256x256, batch 1
    python benchmarks/bench_layouts.py --size 128 --rounds 5 --output out.md

1. **Decoder input layout.** The quantizers used to return their codes as ``movedim`` views, which have channels_last
   strides. PyTorch runs a convolution in channels_last when its input is, and copies a contiguous weight to
   channels_last on every such call, and the layout spreads through the decoder. The released float32 decoder
   (random weights) decodes the same codes passed as channels_last tensors (the old behaviour, as
   :class:`~dualvitok.pixel.PixelDecoder` computed it then) and as the contiguous tensors it now gets
   (``PixelDecoder`` takes its input to its weights' layout); interleaved rounds, best and median, and the largest
   difference of the two images. And the same decoder without autograd, where its plain blocks write into their own
   temporaries (SiLU, SpatialNorm's modulation, ResnetBlock2d's residual addition), against the same call with
   autograd on and nothing requiring grad (every temporary a new tensor, as the norm and the residual were before).
2. **RoPE by halves.** :func:`dualvitok.blocks.apply_rotary` against the concatenated formula
   ``x * cos + rotate_half(x) * sin`` on the tower's q and k (``[B, 324, 2, 16, 80]``, float32 and bf16), and whether
   the values are bitwise equal.
3. **DC-down shortcut from views.** :func:`dualvitok.blocks.space_to_channel_average` against
   ``channel_average(space_to_channel(x))`` at the pixel encoder's full-resolution level
   (``[B, 128, 256, 256]``), contiguous and channels_last, and whether the values are bitwise equal.

Single timings on a shared machine move a lot; the ratios of one run are the figures to quote.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import emit_report, machine, table

from dualvitok._utils.timing import interleaved_times
from dualvitok.blocks import (
    VisionRotaryEmbedding,
    apply_rotary,
    channel_average,
    grid_positions,
    rotary_cos_sin,
    rotate_half,
    space_to_channel,
    space_to_channel_average,
)
from dualvitok.cpu import cpu_bf16_support
from dualvitok.loading import load_model


def ratio_row(label: str, times: dict[str, list[float]], old: str, new: str, unit: float, equal: str) -> list[str]:
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return [label, f"{best[old] * unit:.2f}", f"{best[new] * unit:.2f}",
            f"**{best[old] / best[new]:.2f}x** / {med[old] / med[new]:.2f}x", equal]


def decoder_rows(size: int, rounds: int) -> list[list[str]]:
    model = load_model("dualvitok_anyres_max512").eval().requires_grad_(False)
    torch.manual_seed(0)
    with torch.inference_mode():
        enc = model.encode(torch.rand(1, 3, size, size) * 2 - 1)
        merged = model.merge_codes(enc.semantic_codes, enc.pixel_codes)  # [1, z_s + z_p, h, w], contiguous
        branch = model.pixel_decoder_branch
        old_layout = merged.contiguous(memory_format=torch.channels_last)  # what movedim views used to give

        def old():  # PixelDecoder.forward as it was: the caller's layout passed on
            return branch.decoder(branch.post_quant_conv(old_layout), old_layout)

        outs = {}
        times = interleaved_times({"old": lambda: outs.__setitem__("old", old()),
                                   "new": lambda: outs.__setitem__("new", branch(merged))}, rounds)
    diff = (outs["old"] - outs["new"]).abs().max().item()
    label = f"float32 decoder, {size}x{size}, channels_last codes -> contiguous (s)"
    rows = [ratio_row(label, times, "old", "new", 1.0, f"max diff {diff:.1e}")]

    def run(grad: bool):  # autograd on (nothing requires grad): the plain blocks write no temporary in place
        with torch.set_grad_enabled(grad):
            return branch(merged.clone())

    outs = {}
    times = interleaved_times({"old": lambda: outs.__setitem__("old", run(True)),
                               "new": lambda: outs.__setitem__("new", run(False))}, rounds)
    label = f"float32 decoder, {size}x{size}, temporaries written in place (SiLU, norm modulation, residual) (s)"
    return rows + [ratio_row(label, times, "old", "new", 1.0,
                             "bitwise" if torch.equal(outs["old"], outs["new"]) else "NOT equal")]


def rope_rows(rounds: int, batches: list[int]) -> list[list[str]]:
    rows = []
    cos, sin = rotary_cos_sin(VisionRotaryEmbedding(40)(grid_positions(18, 18, 2)))  # [324, 1, 80]
    rope = (cos.unsqueeze(1), sin.unsqueeze(1))

    def concatenated(x):
        return (x.float() * rope[0] + rotate_half(x.float()) * rope[1]).to(x.dtype)

    for dtype in (torch.float32, torch.bfloat16):
        for batch in batches:
            x = torch.randn(batch, 324, 3, 16, 80).to(dtype)[:, :, :2]  # q, k of a qkv tensor
            equal = torch.equal(apply_rotary(x, rope), concatenated(x))
            times = interleaved_times({"old": lambda x=x: concatenated(x), "new": lambda x=x: apply_rotary(x, rope)},
                                      rounds * 5)
            rows.append(ratio_row(f"RoPE, {str(dtype)[6:]}, [{batch}, 324, 2, 16, 80] (ms)", times, "old", "new",
                                  1e3, "bitwise" if equal else "NOT equal"))
    return rows


def shortcut_rows(rounds: int, size: int) -> list[list[str]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            x = torch.randn(1, 128, size, size).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            equal = torch.equal(space_to_channel_average(x, 128), channel_average(space_to_channel(x), 128))
            times = interleaved_times({"old": lambda x=x: channel_average(space_to_channel(x), 128),
                                       "new": lambda x=x: space_to_channel_average(x, 128)}, rounds * 5)
            layout = "channels_last" if channels_last else "contiguous"
            rows.append(ratio_row(f"DC-down shortcut, {str(dtype)[6:]}, [1, 128, {size}, {size}] {layout} (ms)",
                                  times, "old", "new", 1e3, "bitwise" if equal else "NOT equal"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side of the decoder and shortcut rows")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (x5 for the element-wise rows)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of the RoPE rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-decoder", action="store_true", help="only the element-wise rows (seconds)")
    parser.add_argument("--output", default=None, help="write the Markdown report here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = rope_rows(args.rounds, args.batches) + shortcut_rows(args.rounds, args.size)
    if not args.skip_decoder:
        rows = decoder_rows(args.size, args.rounds) + rows
    header = (f"Machine: {machine()}; bf16 matrix support: {cpu_bf16_support()}; "
              f"{args.rounds} interleaved rounds (x5 for the element-wise rows)\n\n")
    emit_report(header + table(["what", "before (best)", "now (best)", "speed-up (best / median)", "values"], rows),
                args.output)


if __name__ == "__main__":
    main()
