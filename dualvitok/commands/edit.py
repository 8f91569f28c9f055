"""``dualvitok edit``: instruction-based image editing with the unified MLLM (ILLUME+ prompts and defaults)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from .generate import add_model_arguments, add_refiner_argument, parse_size

    p = subparsers.add_parser("edit", help="edit an image by an instruction with a unified MLLM",
                              description="Image editing with a UnifiedMLLM (needs: pip install 'dualvitok[unified]').")
    p.add_argument("image", help="source image file")
    p.add_argument("instruction", help="what to change")
    add_model_arguments(p)
    p.add_argument("--size", type=parse_size, default=None,
                   help="HEIGHTxWIDTH of the edit (default: the source's nearest aspect-ratio anchor)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default 1.25)")
    p.add_argument("--temperature", type=float, default=None, help="image temperature (default 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="semantic top-k; pixel uses 3x (default 512)")
    p.add_argument("--top-p", type=float, default=None, help="top-p (default 0.8)")
    p.add_argument("--keep-padding", action="store_true", help="save the padded canvas instead of the source size")
    add_refiner_argument(p)
    p.add_argument("--output", default="edited.png", help="output file (default: edited.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..unified.cli_support import attach_refiner, generator_for, load_unified, save_image

    model = attach_refiner(load_unified(args), args.refiner)
    out = model.edit_image(args.image, args.instruction, resolution=args.size, guidance_scale=args.guidance_scale,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           generator=generator_for(args), use_refiner=args.refiner is not None, progress=True)
    print(save_image(out.to_pil(restore_size=not args.keep_padding)[0], args.output))
    return 0
