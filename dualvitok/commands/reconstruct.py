"""``dualvitok reconstruct``: encode and decode images, write the reconstructions, print PSNR per image."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .._utils import save_image

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reconstruct", help="encode + decode images with a DualViTok and save the results",
                              description="Round trip images through a DualViTok. Without arguments: the bundled demo "
                                          "model on the bundled sample photos.")
    p.add_argument("images", nargs="*", help="image files (default: the bundled sample photos)")
    p.add_argument("--model", default=None, help="folder, Hub repo id or registered name (default: bundled demo model)")
    p.add_argument("--output", default="reconstructions", help="output folder (default: ./reconstructions)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize every image to H x W (multiples of 16)")
    p.add_argument("--max-pixels", type=int, default=256 * 256, help="area bound of the size policy (default 256*256)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..assets import sample_images
    from ..loading import load_model
    from ..metrics.psnr import psnr  # pure torch: needs no optional dependency
    from ..processor import ImageProcessor

    paths = [Path(p) for p in args.images] or sample_images()
    model = load_model(args.model, device=args.device)
    processor = ImageProcessor(size=tuple(args.size) if args.size else None, max_pixels=args.max_pixels)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("| image | size | semantic tokens | pixel tokens | PSNR (dB) |\n|---|---|---|---|---|")
    for path in paths:
        x = processor(path).to(args.device)
        with torch.inference_mode():
            enc = model.encode(x)
            recon = model.decode_indices(enc.semantic_indices, enc.pixel_indices)
        original, restored = processor.to_uint8(x), processor.to_uint8(recon)
        save_image(processor.postprocess(recon)[0], out_dir / f"{path.stem}_reconstruction.png")
        h, w = x.shape[-2:]
        print(f"| {path.name} | {h}x{w} | {enc.semantic_indices[0].numel()} | {enc.pixel_indices[0].numel()} "
              f"| {psnr(restored / 255.0, original / 255.0).item():.2f} |")
    print(f"\nreconstructions written to {out_dir}/")
    return 0
