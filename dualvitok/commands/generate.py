"""``dualvitok generate``: text-to-image with the unified MLLM (ILLUME+ prompts, guidance and sampling defaults).

Also holds the model arguments shared with ``chat`` and ``edit``; parsers import nothing optional, so ``dualvitok
--help`` works without transformers (the commands then fail with an error naming the ``unified`` extra).
"""

from __future__ import annotations

import argparse

from ._args import add_device, add_dtype, add_seed, positive_int


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--vision-tokenizer``, ``--device``, ``--dtype``, ``--seed`` (the library's CLI convention)."""
    parser.add_argument("--model", required=True,
                        help="UnifiedMLLM folder (save_pretrained), ILLUME+ checkpoint folder or Hub id, or 'tiny' "
                             "(a random tiny model, for trying the command) (required)")
    parser.add_argument("--vision-tokenizer", default=None,
                        help="DualViTok folder / Hub id / registered name (default: the one saved with the model; "
                             "ILLUME-MLLM/dualvitok for ILLUME+ checkpoints)")
    add_device(parser)
    add_dtype(parser, help="language-model dtype; the vision modules stay float32")
    add_seed(parser)


def add_refiner_argument(parser: argparse.ArgumentParser) -> None:
    """``--refiner [PATH]``: decode with a diffusion refiner (a saved RefinerPipeline folder, or the attached one)."""
    parser.add_argument("--refiner", nargs="?", const="attached", default=None, metavar="PATH",
                        help="decode with the diffusion refiner: a RefinerPipeline folder or Hub id, or no value for "
                             "the refiner attached to the model (default: no refiner, the DualViTok decoder)")


def parse_size(text: str) -> tuple[int, int]:
    """``"512x384"`` (height x width) -> ``(512, 384)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (height x width), got {text!r}") from None
    return h, w


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from text with a unified MLLM",
                              description="Text-to-image with a UnifiedMLLM (needs: pip install 'dualvitok[unified]').")
    p.add_argument("prompt", help="what to draw")
    add_model_arguments(p)
    p.add_argument("--size", type=parse_size, default=(512, 512),
                   help="HEIGHTxWIDTH, multiples of 64 (default 512x512)")
    p.add_argument("--num-images", type=positive_int, default=1, help="images to generate (one batch) (default: 1)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default 2.0)")
    p.add_argument("--temperature", type=float, default=None, help="image temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="semantic top-k; pixel uses 3x (default 2048)")
    p.add_argument("--top-p", type=float, default=None, help="top-p (default 1.0)")
    add_refiner_argument(p)
    p.add_argument("--output", default="generated.png",
                   help="output file, numbered when --num-images > 1 (default: generated.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..unified.cli_support import attach_refiner, generator_for, load_unified, output_paths, save_image

    model = attach_refiner(load_unified(args), args.refiner)
    height, width = args.size
    out = model.generate_image([args.prompt] * args.num_images, height, width, guidance_scale=args.guidance_scale,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               generator=generator_for(args), use_refiner=args.refiner is not None, progress=True)
    for image, path in zip(out.to_pil(), output_paths(args.output, args.num_images), strict=True):
        print(save_image(image, path))
    return 0
