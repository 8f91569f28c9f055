"""``dualvitok train-refiner``: train (or fine-tune) the diffusion refiner on an image folder.

The ILLUME+ refiner training code is not released; see :mod:`dualvitok.refiner.trainer`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from . import _args

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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-refiner", help="train the diffusion refiner (frozen tokenizer, SDXL-layout UNet)",
        description="Train the refiner UNet on a folder of images. The tokenizer and the VAE stay frozen; images are "
                    "bucketed by aspect ratio into the supported output sizes. Checkpoints go to "
                    "OUTPUT/checkpoints (resume exactly with --resume), the final pipeline to OUTPUT/refiner. "
                    "Distributed: torchrun --nproc_per_node N -m dualvitok.cli train-refiner ...")
    p.add_argument("--data", required=True, help="folder of training images (searched recursively)")
    _args.add_output(p, "refiner-run", "run folder")
    p.add_argument("--tokenizer", default="demo", help="DualViTok folder, Hub id or 'demo' (default: demo)")
    p.add_argument("--refiner", default=None, help="refiner folder or Hub id to fine-tune (default: from scratch)")
    p.add_argument("--architecture", default="sdxl", choices=["sdxl", "tiny"],
                   help="UNet/VAE layout when training from scratch (default: sdxl)")
    p.add_argument("--resolutions", type=_resolutions, default=None,
                   help="supported output sizes WxH,WxH,... (default: the refiner's; the reference's 12 sizes)")
    p.add_argument("--steps", type=_args.positive_int, default=1000, help="optimizer steps (default: 1000)")
    _args.add_batch_size(p, 4)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--warmup-steps", type=_args.non_negative_int, default=0,
                   help="linear learning-rate warm-up steps (default: 0)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="gradient-norm clipping; 0 disables it (default: 1.0)")
    p.add_argument("--checkpoint-every", type=_args.non_negative_int, default=500,
                   help="checkpoint period in steps; 0 = only at the end (default: 500)")
    p.add_argument("--keep-checkpoints", type=_args.positive_int, default=2,
                   help="how many of the newest checkpoints to keep (default: 2)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="keep an EMA of the UNet with this decay (e.g. 0.999); the saved refiner gets the EMA weights")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in backward (less memory, slower)")
    p.add_argument("--max-skipped-fraction", type=_fraction, default=0.1,
                   help="stop when more than this fraction of the images is unreadable (default: 0.1)")
    _args.add_seed(p)
    _args.add_num_workers(p)
    _args.add_device(p)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype: bfloat16 = bf16 autocast (default: float32)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16"], help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--pixel-noise", type=float, nargs=2, default=[0.5, 0.1], metavar=("SAMPLES", "TOKENS"),
                   help="pixel token perturbation: fraction of samples, fraction of their tokens (default 0.5 0.1)")
    p.add_argument("--semantic-noise", type=float, nargs=2, default=[0.5, 0.05], metavar=("SAMPLES", "TOKENS"),
                   help="semantic token perturbation (default 0.5 0.05)")
    p.add_argument("--condition-dropout", type=float, default=0.1,
                   help="fraction of samples trained with zero code features, for CFG (default 0.1)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from the newest checkpoint in --output (or from the given file)")
    group.add_argument("--overwrite", action="store_true",
                       help="delete the checkpoints, metrics and refiner an earlier run left in --output")
    _args.add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from .._utils.locking import OutputLockedError
    from ..refiner.trainer import RefinerTrainConfig, RefinerTrainer
    from ..refiner.training import RefinerLossConfig
    from ..training.run import CheckpointError, CheckpointFolder, TooManySkippedError

    mixed = "no"
    if args.mixed_precision is not None:
        logger.warning("--mixed-precision is deprecated; use --dtype bfloat16 (or float32)")
        mixed = args.mixed_precision
    if args.dtype is not None:
        mixed = "bf16" if args.dtype == "bfloat16" else "no"
    output = Path(args.output)
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:
        for name in ("checkpoints", "refiner"):
            shutil.rmtree(output / name, ignore_errors=True)
        for name in ("metrics.jsonl", "skipped.jsonl"):
            (output / name).unlink(missing_ok=True)
    elif not args.resume and CheckpointFolder(output / "checkpoints").latest() is not None:
        raise ValueError(f"{output} already holds checkpoints; pass --resume to continue the run, --overwrite to "
                         "start over, or choose another --output")
    config = RefinerTrainConfig(
        data=args.data, output_dir=args.output, tokenizer=args.tokenizer, refiner=args.refiner,
        architecture=args.architecture, resolutions=args.resolutions, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, num_workers=args.num_workers, device=args.device, mixed_precision=mixed,
        ema_decay=args.ema_decay, gradient_checkpointing=args.gradient_checkpointing,
        max_skipped_fraction=args.max_skipped_fraction,
        loss=RefinerLossConfig(semantic_batch_rate=args.semantic_noise[0], semantic_token_rate=args.semantic_noise[1],
                               pixel_batch_rate=args.pixel_noise[0], pixel_token_rate=args.pixel_noise[1],
                               condition_dropout=args.condition_dropout),
    )
    try:
        trainer = RefinerTrainer(config, progress=not args.no_progress)
        if args.resume:
            found = trainer.resume(None if args.resume == "auto" else args.resume)
            if not found:
                logger.info("no checkpoint in %s: starting from step 0", args.output)
        result = trainer.train()
    except (OutputLockedError, TooManySkippedError, CheckpointError) as e:
        raise ValueError(str(e)) from e  # printed by the CLI as a one-line error
    if trainer.dist.is_main:
        losses = result.losses
        print(json.dumps({"step": result.step, "first_loss": losses[0] if losses else None,
                          "last_loss": losses[-1] if losses else None, "refiner": str(result.pipeline_dir)}))
    return 0
