"""``dualvitok train-refiner``: train (or fine-tune) the diffusion refiner on an image folder.

Own design (the ILLUME+ refiner training code is not released); see :mod:`dualvitok.refiner.trainer`.
"""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)


def _resolutions(text: str) -> list[list[int]]:
    """``"64x64,128x64"`` (width x height) -> ``[[64, 64], [128, 64]]``."""
    out = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {item!r}; use WIDTHxHEIGHT[,WIDTHxHEIGHT...]") from None
        out.append([w, h])
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-refiner", help="train the diffusion refiner (frozen tokenizer, SDXL-layout UNet)",
        description="Train the refiner UNet on a folder of images. The tokenizer and the VAE stay frozen; images are "
                    "bucketed by aspect ratio into the supported output sizes. Checkpoints go to "
                    "OUTPUT/checkpoints (resume exactly with --resume), the final pipeline to OUTPUT/refiner.")
    p.add_argument("--data", required=True, help="folder of training images (searched recursively)")
    p.add_argument("--output", default="refiner-run", help="run folder (default: ./refiner-run)")
    p.add_argument("--tokenizer", default="demo", help="DualViTok folder, Hub id or 'demo' (default: demo)")
    p.add_argument("--refiner", default=None, help="refiner folder or Hub id to fine-tune (default: from scratch)")
    p.add_argument("--architecture", default="sdxl", choices=["sdxl", "tiny"],
                   help="UNet/VAE layout when training from scratch (default: sdxl)")
    p.add_argument("--resolutions", type=_resolutions, default=None,
                   help="supported output sizes WxH,WxH,... (default: the refiner's; the reference's 12 sizes)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--pixel-noise", type=float, nargs=2, default=[0.5, 0.1], metavar=("SAMPLES", "TOKENS"),
                   help="pixel token perturbation: fraction of samples, fraction of their tokens (default 0.5 0.1)")
    p.add_argument("--semantic-noise", type=float, nargs=2, default=[0.5, 0.05], metavar=("SAMPLES", "TOKENS"),
                   help="semantic token perturbation (default 0.5 0.05)")
    p.add_argument("--condition-dropout", type=float, default=0.1,
                   help="fraction of samples trained with zero code features, for CFG (default 0.1)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest checkpoint in --output (or from the given file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..refiner.trainer import RefinerTrainConfig, RefinerTrainer
    from ..refiner.training import RefinerLossConfig

    config = RefinerTrainConfig(
        data=args.data, output_dir=args.output, tokenizer=args.tokenizer, refiner=args.refiner,
        architecture=args.architecture, resolutions=args.resolutions, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, num_workers=args.num_workers, device=args.device, mixed_precision=args.mixed_precision,
        loss=RefinerLossConfig(semantic_batch_rate=args.semantic_noise[0], semantic_token_rate=args.semantic_noise[1],
                               pixel_batch_rate=args.pixel_noise[0], pixel_token_rate=args.pixel_noise[1],
                               condition_dropout=args.condition_dropout),
    )
    trainer = RefinerTrainer(config)
    if args.resume:
        found = trainer.resume(None if args.resume == "auto" else args.resume)
        if not found:
            logger.info("no checkpoint in %s: starting from step 0", args.output)
    result = trainer.train()
    losses = result.losses
    print(json.dumps({"step": result.step, "first_loss": losses[0] if losses else None,
                      "last_loss": losses[-1] if losses else None, "refiner": str(result.pipeline_dir)}))
    return 0
