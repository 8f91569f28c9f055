"""``dualvitok reconstruct``: encode and decode images, write the reconstructions, print PSNR per image."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .._utils import save_image
from .._utils.files import has_image_suffix, scan_images
from ..devices import resolve_device
from . import _args
from ._args import add_default_malloc, add_device, add_dtype, add_model, add_output, dtype_of

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reconstruct", help="encode + decode images with a DualViTok and save the results",
                              description="Round trip images through a DualViTok. Without arguments: the bundled demo "
                                          "model on the bundled sample photos.")
    p.add_argument("images", nargs="*", help="image files or folders (default: the bundled sample photos)")
    add_model(p)
    add_output(p, "reconstructions")
    p.add_argument("--size", type=_args.image_side, nargs=2, metavar=("H", "W"),
                   help="resize every image to H x W (multiples of 16) (default: the --max-pixels policy)")
    p.add_argument("--max-pixels", type=_args.max_pixels, default=256 * 256,
                   help="area bound of the size policy (default: 65536 = 256*256)")
    add_device(p)
    add_default_malloc(p)
    add_dtype(p, help="float32 (the reference numerics) or a fast path via optimize_for_inference")
    p.set_defaults(func=run)


def output_names(paths: list[Path]) -> list[str]:
    """``<stem>_reconstruction.png`` per input; inputs that share a stem get their parent folders prefixed
    (``a/photo.jpg``, ``b/photo.jpg`` -> ``a_photo_...``, ``b_photo_...``), so no output overwrites another."""
    stems = [p.stem for p in paths]
    names = []
    for path, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:
            parts = [part for part in path.resolve().with_suffix("").parts[-3:] if part not in ("/", "")]
            stem = "_".join(parts)
        names.append(f"{stem}_reconstruction.png")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"several inputs would write the same output {duplicates}; rename or reconstruct them "
                         "in separate runs")
    return names


def run(args: argparse.Namespace) -> int:
    from ..assets import sample_images
    from ..loading import load_model
    from ..metrics.psnr import psnr  # pure torch: needs no optional dependency
    from ..processor import ImageProcessor

    paths = _inputs(args.images) if args.images else sample_images()
    names = output_names(paths)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    if args.dtype != "float32":
        from ..inference import optimize_for_inference

        optimize_for_inference(model, dtype=dtype_of(args.dtype), keep_freed_memory=not args.default_malloc)
    processor = ImageProcessor(size=tuple(args.size) if args.size else None, max_pixels=args.max_pixels)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("| image | size | semantic tokens | pixel tokens | PSNR (dB) |\n|---|---|---|---|---|")
    skipped = []
    for path, name in zip(paths, names, strict=True):
        try:
            x = processor(path).to(device)
        except (OSError, ValueError) as e:  # unreadable or unsupported image: say so and go on
            skipped.append(f"{path}: {e}")
            continue
        with torch.inference_mode():
            enc = model.encode(x)
            recon = model.decode_indices(enc.semantic_indices, enc.pixel_indices)
        original, restored = processor.to_uint8(x), processor.to_uint8(recon)
        save_image(processor.postprocess(recon)[0], out_dir / name)
        h, w = x.shape[-2:]
        print(f"| {path.name} | {h}x{w} | {enc.semantic_indices[0].numel()} | {enc.pixel_indices[0].numel()} "
              f"| {psnr(restored / 255.0, original / 255.0).item():.2f} |")
    print(f"\nreconstructions written to {out_dir}/")
    if skipped:
        print(f"skipped {len(skipped)} unreadable: " + "; ".join(skipped), file=sys.stderr)
    return 0 if len(skipped) < len(paths) else 1


def _inputs(items: list[str]) -> list[Path]:
    """Image files and folders (scanned with the library's one suffix list) -> files, checked before any work."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and not has_image_suffix(path.name):
            found = scan_images(path)
            if not found.files:
                raise FileNotFoundError(f"no image files under {path}")
            paths += found.files
        elif path.is_file():
            paths.append(path)
        elif path.is_dir():
            raise ValueError(f"{path} is a directory, not an image file")
        else:
            raise FileNotFoundError(f"image file not found: {path}")
    return paths
