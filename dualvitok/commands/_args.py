"""The one CLI convention shared by every subcommand: the same flag names, meanings, defaults and help texts.

``--device auto`` (the policy of :func:`dualvitok.devices.resolve_device`), ``--dtype {float32,bfloat16,float16}``,
``--num-workers``, ``--batch-size``, ``--seed``, ``--output``, ``--resume``/``--overwrite``, ``--no-progress`` and
``--model`` (resolved by :func:`dualvitok.loading.load_model` in every command). ``--log-level``/``-q`` are global
options of the ``dualvitok`` command itself (:mod:`dualvitok.cli`).
"""

from __future__ import annotations

import argparse

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MODEL_HELP = ("a registered name (random weights), 'demo' (the bundled demo model), a folder saved by "
              "save_pretrained or in the reference layout, a training run folder or checkpoint, or a Hub repo id")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_model(p: argparse.ArgumentParser, default: str | None = "demo", help: str | None = None) -> None:
    p.add_argument("--model", default=default, help=f"{help or MODEL_HELP} (default: {default})")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (cuda > mps > npu > cpu, the first available), cpu, cuda, cuda:1, mps, npu "
                        "(default: auto)")


def add_dtype(p: argparse.ArgumentParser, default: str | None = "float32", help: str | None = None,
              default_text: str | None = None) -> None:
    """``--dtype``; ``default_text`` words the default in the help where it is chosen at run time (``default=None``)."""
    p.add_argument("--dtype", default=default, choices=tuple(DTYPES),
                   help=f"{help or 'compute dtype'} (default: {default_text or default})")


def add_default_malloc(p: argparse.ArgumentParser) -> None:
    """``--default-malloc``: leave glibc's allocator settings alone (the fast path's CPU plan keeps freed buffers for
    reuse, process-wide, by default)."""
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator settings alone (default on CPU: freed large buffers are kept for "
                        "reuse, for the whole process, see dualvitok.devices.keep_freed_cpu_memory)")


def add_num_workers(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--num-workers", type=non_negative_int, default=default,
                   help=f"DataLoader worker processes that read and resize images (default: {default})")


def add_batch_size(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, help=f"images per batch (default: {default})")


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help=f"random seed (default: {default})")


def add_output(p: argparse.ArgumentParser, default: str | None, help: str = "output folder") -> None:
    p.add_argument("--output", default=default, required=default is None, help=f"{help} (default: {default})"
                   if default is not None else f"{help} (required)")


def add_resume(p: argparse.ArgumentParser) -> None:
    """``--resume`` continues the run saved in --output (refusing a different setup); ``--overwrite`` starts over."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the interrupted run saved in --output (refused if its settings differ)")
    group.add_argument("--overwrite", action="store_true",
                       help="delete what a previous run left in --output and start over")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def dtype_of(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names of ``--dtype``)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def image_side(text: str) -> int:
    """argparse type: an image side, a positive multiple of 16 (``--size H W``)."""
    value = int(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"image sides must be positive multiples of 16, got {value}")
    return value


def max_pixels(text: str) -> int:
    """argparse type: the area bound of the size policy, at least 32 * 32 (the smallest image the policy makes)."""
    value = int(text)
    if value < 32 * 32:
        raise argparse.ArgumentTypeError(f"must be at least 1024 (32x32, the smallest image size), got {value}")
    return value
