"""``dualvitok info``: registered models, the bundled demo model and the installed optional extras."""

from __future__ import annotations

import argparse
import importlib.util


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="list registered models and installed extras")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..assets import DEMO_MODEL_DIR, sample_images
    from ..registry import list_models
    from ..version import __version__

    print(f"dualvitok {__version__}, torch {torch.__version__}")
    print("registered models: " + ", ".join(list_models()))
    print(f"bundled demo model: {'present' if (DEMO_MODEL_DIR / 'model.safetensors').is_file() else 'absent'}")
    print(f"bundled sample photos: {len(sample_images())}")
    extras = {"eval": "torchmetrics", "timm": "timm", "unified": "transformers", "refiner": "diffusers"}
    for extra, module in extras.items():
        print(f"extra [{extra}]: {'installed' if importlib.util.find_spec(module) else 'missing'}")
    return 0
