"""The fast path's bf16 convolutions from prepacked weights (``pack_conv``) against plain ``F.conv2d``.

    python benchmarks/bench_packed_conv.py                            # released architecture, 256x256, batch 1
    python benchmarks/bench_packed_conv.py --sizes 256 512 --batch 1 --rounds 7 --output out.md

``F.conv2d`` hands oneDNN the weight in PyTorch's layout and oneDNN reorders it on every call; a prepacked weight
(:mod:`dualvitok.blocks.packed_conv`) skips that. This measures:

1. **Convolutions.** Every distinct bf16 convolution the fast path's pixel decoder runs at the first size (input
   shape and weight; a fused convolution + addition is timed as its plain convolution), channels_last, both ways,
   best of 5: ms, GFLOP/s, and the time over the decode's calls.
2. **Layouts across shapes.** 3x3 convolutions of the decoder's widths with a weight packed for one map size and
   run on another, against the plain weight: oneDNN lays a packed weight out for one shape, and why a copy serves
   its own shape only (:class:`dualvitok.blocks.inference.InferenceConv2d`).
3. **Decode.** One random-weight model, prepared once (``optimize_for_inference()``), decodes the bundled photo's
   codes with its convolutions switched between the two (their ``pack_conv`` switch, as
   :func:`dualvitok.inference.use_kernels` sets it, but keeping the packed copies) in interleaved rounds: best and
   median, and whether the images are equal bit for bit. Each size's first packed decode packs for its shapes
   (:class:`dualvitok.blocks.inference.InferenceConv2d`: a copy serves one input shape; another shape repacks on
   its second call in a row), outside the timed rounds.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch
import torch.nn.functional as F
from _common import best_time, emit_report, kernel_ab_parser, machine, rss_bytes, table

from dualvitok import ImageProcessor
from dualvitok._utils.timing import interleaved_times
from dualvitok.assets import sample_images
from dualvitok.blocks import packed_conv
from dualvitok.blocks.inference import InferenceConv2d
from dualvitok.loading import load_model


def decoder_convolutions(model, codes) -> Counter:
    """(input shape, convolution) -> calls, for the bf16 convolutions of one decode (plain and fused calls)."""
    calls: Counter = Counter()
    convs = [m for m in model.pixel_decoder_branch.modules() if isinstance(m, InferenceConv2d)
             and m.weight.dtype == torch.bfloat16]
    originals = {conv: conv.packed_weight for conv in convs}
    for conv in convs:  # every call asks for the packed weight first, the fused ones too
        conv.packed_weight = lambda x, conv=conv: calls.update([(tuple(x.shape), conv)]) or originals[conv](x)
    try:
        with torch.inference_mode():
            model.decode(*codes)
    finally:
        for conv in convs:
            del conv.packed_weight
    return calls


def conv_rows(calls: Counter) -> tuple[list[list[str]], float, float]:
    """One row per distinct convolution shape, and the summed plain / packed seconds over the decode's calls."""
    by_shape: Counter = Counter()
    examples = {}
    for (shape, conv), n in calls.items():
        key = (shape, tuple(conv.weight.shape), conv.padding, conv.stride)
        by_shape[key] += n
        examples[key] = conv
    rows, plain_total, packed_total = [], 0.0, 0.0
    with torch.inference_mode():
        for key, n in sorted(by_shape.items(), key=lambda kv: -kv[1]):
            shape, conv = key[0], examples[key]
            x = torch.randn(shape, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            weight = packed_conv.pack_conv_weight(conv, shape)
            plain = best_time(lambda x=x, c=conv: F.conv2d(x, c.weight, c.bias, c.stride, c.padding), 5)
            fast = best_time(lambda x=x, c=conv, w=weight: packed_conv.packed_conv2d(x, w, c), 5)
            out = conv.weight.shape
            flop = 2 * shape[0] * out[0] * out[1] * out[2] * out[3] * shape[2] * shape[3] // (conv.stride[0] ** 2)
            plain_total, packed_total = plain_total + n * plain, packed_total + n * fast
            rows.append([f"{list(shape)} -> {out[0]}, {out[2]}x{out[3]}", str(n), f"{plain * 1e3:.2f}",
                         f"{fast * 1e3:.2f}", f"{flop / plain / 1e9:.0f} / {flop / fast / 1e9:.0f}",
                         f"**{plain / fast:.2f}x**", f"{n * plain * 1e3:.1f} / {n * fast * 1e3:.1f}"])
    return rows, plain_total, packed_total


def layout_rows(rounds: int = 5) -> list[list[str]]:
    """Per width and map size: plain ms, then ms from a weight packed for each of the sizes."""
    rows = []
    with torch.inference_mode():
        for channels, sizes in ((1536, (4, 16)), (768, (8, 32)), (384, (16, 64))):
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype=torch.bfloat16,
                                                                         memory_format=torch.channels_last)
            weights = {s: packed_conv.pack_conv_weight(conv, (1, channels, s, s)) for s in sizes}
            for size in sizes:
                x = torch.randn(1, channels, size, size).to(torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last)
                plain = best_time(lambda x=x, c=conv: c(x), rounds)
                packed = [best_time(lambda x=x, w=w, c=conv: packed_conv.packed_conv2d(x, w, c), rounds)
                          for w in weights.values()]
                rows.append([str(channels), f"{size}x{size}", f"{plain * 1e3:.2f}",
                             *(f"{t * 1e3:.2f}" for t in packed)])
    return rows


def main() -> None:
    parser = kernel_ab_parser(__doc__)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model).eval().requires_grad_(False)
    model.optimize_for_inference(pack_conv=True)
    if not model.inference_plan.pack_conv:
        raise SystemExit("oneDNN's convolution packing operators do not run on this build or CPU (or the decoder "
                         "is not bf16 here)")
    convs = [m for m in model.modules() if isinstance(m, InferenceConv2d)]

    def switch(on: bool) -> None:  # as use_kernels(model, pack_conv=on), without dropping the packed copies
        for conv in convs:
            conv.pack_conv = on

    decodes, shapes, totals = [], [], None
    for size in args.sizes:
        x = ImageProcessor(size=(size, size))(sample_images()[0]).expand(args.batch, -1, -1, -1).contiguous()
        with torch.inference_mode():
            encoding = model.encode(x)
        codes = (encoding.semantic_codes, encoding.pixel_codes)
        if not shapes:
            shapes, *totals = conv_rows(decoder_convolutions(model, codes))

        def decode(on: bool, codes=codes):
            switch(on)
            return model.decode(*codes)

        with torch.inference_mode():
            decode(True), decode(True)  # packs for this size's shapes (a first call, or a shape's second in a row)
            images = {on: decode(on) for on in (False, True)}
            times = interleaved_times({"plain": lambda: decode(False), "packed": lambda: decode(True)}, args.rounds)
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        decodes.append([f"{size}x{size}", str(args.batch), f"{best['plain']:.3f}", f"{best['packed']:.3f}",
                        f"**{best['plain'] / best['packed']:.2f}x** / {med['plain'] / med['packed']:.2f}x",
                        "yes" if torch.equal(images[False], images[True]) else
                        f"no (max diff {(images[False] - images[True]).abs().max().item():.2e})"])
        print(decodes[-1], flush=True)
    layouts = layout_rows()
    packed_bytes = sum(c.weight.numel() * c.weight.element_size() for c in convs if c._packed is not None)
    report = "\n".join([
        f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}; model {args.model}", "",
        f"Pixel decoder convolutions at {args.sizes[0]}x{args.sizes[0]}, batch {args.batch}, bf16, channels_last "
        "(best of 5):", "",
        table(["input -> out channels, kernel", "calls", "plain ms", "packed ms", "GFLOP/s plain / packed",
               "packed vs plain", "ms over the calls (plain / packed)"], shapes), "",
        f"Over the decode's calls: plain {totals[0]:.3f} s, packed {totals[1]:.3f} s "
        f"({totals[0] / totals[1]:.2f}x).", "",
        "3x3 convolutions, channels -> channels, batch 1, from weights packed for one map size and run on another "
        "(ms, best of 5; the two packed columns: packed for the smaller / the larger size of that row's pair):", "",
        table(["channels", "map", "plain ms", "packed for the smaller size ms", "packed for the larger size ms"],
              layouts), "",
        f"Decode, the fast path with its convolutions on each ({args.rounds} interleaved rounds; s):", "",
        table(["size", "batch", "plain s (best)", "packed s (best)", "packed vs plain (best / median)",
               "images equal"], decodes), "",
        f"Packed copies: {packed_bytes / 2**30:.2f} GiB; peak RSS of this process {rss_bytes() / 2**30:.1f} GiB."])
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
