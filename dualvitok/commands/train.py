"""``dualvitok train``: train or fine-tune a DualViTok from a YAML config (single process or under ``torchrun``).

Own code; see :mod:`dualvitok.training.trainer`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a DualViTok tokenizer",
        description="Train a DualViTok from a YAML config. Shipped configs: tiny_cpu, fix256, anyres_max512. "
                    "Distributed: torchrun --nproc_per_node N -m dualvitok.cli train ...")
    parser.add_argument("--config", required=True, help="YAML/JSON config file or a shipped config name")
    parser.add_argument("--output", required=True, help="run folder (metrics.jsonl, checkpoints/, samples/, final/)")
    parser.add_argument("--max-steps", type=int, default=None, help="override run.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--data", action="append", default=None,
                        help="replace data.sources (repeatable): image folder, file, .tar shard or builtin:skimage")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..training import Trainer, load_train_config

    config = load_train_config(args.config)
    if args.data:
        config.data = dataclasses.replace(config.data, sources=tuple(args.data))
    result = Trainer(config, args.output, resume=args.resume, max_steps=args.max_steps,
                     progress=not args.no_progress).train()
    if result.final_model is not None:
        loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
        print(f"trained {result.step} steps, last loss {loss}; model saved to {result.final_model}")
    return 0
