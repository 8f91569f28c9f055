"""Shared pieces of the ``dualvitok chat`` / ``generate`` / ``edit`` commands (written for this library; the
reference has Gradio demos and scripts instead)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .._utils import save_image as _save_image
from ..commands._args import dtype_of
from ..devices import resolve_device

logger = logging.getLogger(__name__)

def load_unified(args: argparse.Namespace):
    """The model named by ``--model`` (see :func:`add_model_arguments`), on ``--device`` (the library's policy)."""
    from .model import UnifiedMLLM

    args.device = str(resolve_device(args.device))
    if args.model == "tiny":
        from .tiny import tiny_unified_model

        logger.warning("using a tiny model with RANDOM weights (outputs are noise)")
        return tiny_unified_model().to(args.device)
    return UnifiedMLLM.from_pretrained(args.model, vision_tokenizer=args.vision_tokenizer, dtype=dtype_of(args.dtype),
                                       device=args.device)


def attach_refiner(model, refiner: str | None):
    """Apply ``--refiner``: ``None`` keeps the DualViTok decoder; ``"attached"`` requires ``model.refiner``; a path or
    Hub id loads a :class:`dualvitok.refiner.RefinerPipeline` for the model's tokenizer. Fails before generating."""
    if refiner is None:
        return model
    if refiner == "attached":
        if getattr(model, "refiner", None) is None:
            raise ValueError("--refiner was given without a PATH but this model has no refiner attached; pass "
                             "--refiner PATH (a RefinerPipeline folder saved with save_pretrained, or a Hub id)")
        return model
    from ..refiner import RefinerPipeline

    device = next(model.vision_tokenizer.parameters()).device
    model.refiner = RefinerPipeline.from_pretrained(refiner, model.vision_tokenizer).to(device)
    return model


def generator_for(args: argparse.Namespace) -> torch.Generator:
    return torch.Generator(device=args.device).manual_seed(args.seed)


save_image = _save_image  # the package's one atomic image writer


def output_paths(output: str, count: int) -> list[Path]:
    """``out.png`` for one image, ``out_0.png, out_1.png, ...`` for several."""
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(count)]
