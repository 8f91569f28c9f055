"""``dualvitok train``: train or fine-tune a DualViTok from a YAML config (single process or under ``torchrun``).

See :mod:`dualvitok.training.trainer`. Flags follow the library's CLI convention
(:mod:`dualvitok.commands._args`); each one given replaces the matching config key.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from . import _args

logger = logging.getLogger(__name__)

_DTYPE_TO_MIXED = {"float32": "no", "bfloat16": "bf16"}


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a DualViTok tokenizer",
        description="Train a DualViTok from a YAML config. Shipped configs: tiny_cpu, fix256, anyres_max512. "
                    "Distributed: torchrun --nproc_per_node N -m dualvitok.cli train ... Flags given here replace "
                    "the config's values.")
    parser.add_argument("--config", required=True, help="YAML/JSON config file or a shipped config name")
    _args.add_output(parser, None, "run folder (metrics.jsonl, checkpoints/, samples/, final/)")
    parser.add_argument("--max-steps", type=_args.non_negative_int, default=None, help="override run.max_steps")
    _args.add_resume(parser)
    parser.add_argument("--data", action="append", default=None,
                        help="replace data.sources (repeatable): image folder, file, .tar shard or builtin:skimage")
    _args.add_device(parser)
    parser.set_defaults(device=None)  # None: the config's run.device (default auto)
    parser.add_argument("--dtype", default=None, choices=tuple(_DTYPE_TO_MIXED),
                        help="compute dtype: bfloat16 = bf16 autocast (default: the config's run.mixed_precision)")
    parser.add_argument("--mixed-precision", dest="mixed_precision", default=None, choices=("no", "bf16"),
                        help=argparse.SUPPRESS)  # deprecated spelling of --dtype
    parser.add_argument("--batch-size", type=_args.positive_int, default=None,
                        help="images per process per micro-batch (replaces data.batch_size)")
    parser.add_argument("--num-workers", type=_args.non_negative_int, default=None,
                        help="DataLoader worker processes (replaces data.num_workers)")
    parser.add_argument("--seed", type=int, default=None, help="replaces run.seed")
    parser.add_argument("--checkpoint-every", type=_args.non_negative_int, default=None,
                        help="checkpoint period in steps; 0 = only at the end (replaces run.checkpoint_every)")
    parser.add_argument("--max-skipped-fraction", type=_fraction, default=None,
                        help="stop when more than this fraction of the images is unreadable "
                             "(replaces data.max_skipped_fraction, default 0.1)")
    _args.add_progress(parser)
    parser.set_defaults(func=run)
    return parser


def apply_cli_overrides(config, args: argparse.Namespace):
    """The config with the flags the user gave (None = keep the config's value)."""
    data, run_cfg = {}, {}
    if args.data:
        data["sources"] = tuple(args.data)
    if args.batch_size is not None:
        data["batch_size"] = args.batch_size
    if args.num_workers is not None:
        data["num_workers"] = args.num_workers
    if args.max_skipped_fraction is not None:
        data["max_skipped_fraction"] = args.max_skipped_fraction
    if args.device is not None:
        run_cfg["device"] = args.device
    if args.mixed_precision is not None:
        logger.warning("--mixed-precision is deprecated; use --dtype bfloat16 (or float32)")
        run_cfg["mixed_precision"] = args.mixed_precision
    if args.dtype is not None:
        run_cfg["mixed_precision"] = _DTYPE_TO_MIXED[args.dtype]
    if args.seed is not None:
        run_cfg["seed"] = args.seed
    if args.checkpoint_every is not None:
        run_cfg["checkpoint_every"] = args.checkpoint_every
    if data:
        config.data = dataclasses.replace(config.data, **data)
    if run_cfg:
        config.run = dataclasses.replace(config.run, **run_cfg)
    return config


def run(args: argparse.Namespace) -> int:
    from .._utils.locking import OutputLockedError
    from ..training import Trainer, load_train_config
    from ..training.run import CheckpointError, TooManySkippedError

    config = apply_cli_overrides(load_train_config(args.config), args)
    try:
        result = Trainer(config, args.output, resume=args.resume, max_steps=args.max_steps,
                         progress=not args.no_progress, overwrite=args.overwrite).train()
    except (OutputLockedError, TooManySkippedError, CheckpointError) as e:
        raise ValueError(str(e)) from e  # the CLI prints these as one-line errors
    if result.final_model is not None:
        loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
        print(f"trained {result.step} steps, last loss {loss}; model saved to {result.final_model}")
    return 0
