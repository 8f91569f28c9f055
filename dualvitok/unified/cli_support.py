"""Shared pieces of the ``dualvitok chat`` / ``generate`` / ``edit`` commands (written for this library; the
reference has Gradio demos and scripts instead)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .._utils import save_image as _save_image

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` choices (the argument parser itself is in :mod:`dualvitok.commands.generate`)."""


def load_unified(args: argparse.Namespace):
    """The model named by ``--model`` (see :func:`add_model_arguments`)."""
    from .model import UnifiedMLLM

    if args.model == "tiny":
        from .tiny import tiny_unified_model

        logger.warning("using a tiny model with RANDOM weights (outputs are noise)")
        return tiny_unified_model().to(args.device)
    return UnifiedMLLM.from_pretrained(args.model, vision_tokenizer=args.vision_tokenizer, dtype=_DTYPES[args.dtype],
                                       device=args.device)


def generator_for(args: argparse.Namespace) -> torch.Generator:
    return torch.Generator(device=args.device).manual_seed(args.seed)


save_image = _save_image  # the package's one atomic image writer


def output_paths(output: str, count: int) -> list[Path]:
    """``out.png`` for one image, ``out_0.png, out_1.png, ...`` for several."""
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(count)]
