"""The run toolkit both trainers share (the tokenizer :class:`~dualvitok.training.Trainer` and the refiner trainer).

One place for each job of a training run that is not the model's own step:

* :func:`warmup_scheduler` -- linear warm-up to the base learning rate, then constant.
* :func:`seed_everything` -- seeds Python's ``random``, numpy and torch (CPU and every CUDA device).
* :class:`CheckpointFolder` -- ``checkpoint-<step>.pt`` naming, atomic saves (through ``_utils.io.atomic_write``, so a
  full disk raises an ``OSError`` naming the file and the previous checkpoint stays loadable), rotation, clean-up of
  temporary files left by killed writes, and loading the newest *readable* checkpoint (a corrupt or truncated newest
  one is set aside as ``*.corrupt`` with a warning and the previous one is used).
* :func:`read_metrics` / :func:`append_metrics` / :func:`truncate_metrics` -- ``metrics.jsonl`` (one JSON record per
  line); a torn last line (power loss, full disk) is dropped with a warning, a broken middle line is an error.
* :class:`SkippedImages` -- bad training images are skipped, counted, listed in ``skipped.jsonl``, and a cap
  (``max_skipped_fraction``) stops a run whose data set is broken.
* :func:`apply_overrides` -- the one rule for ``model.overrides``: merged into the config key by key, unknown keys
  refused; with ``init_from`` they are applied too, and refused if they change the shape of any pretrained weight.
* :func:`checkpoint_wrapped` / :func:`apply_activation_checkpointing` -- ``torch.utils.checkpoint`` around chosen
  blocks, applied from outside (the blocks carry no flag).

The DDP-vs-FSDP strategy lives in :mod:`dualvitok.training.strategy`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import atomic_write
from .._utils.distributed import all_gather_json, all_reduce_mean
from .._utils.io import json_path

logger = logging.getLogger(__name__)

__all__ = ["warmup_factor", "warmup_scheduler", "seed_everything", "CheckpointFolder", "CheckpointError",
           "read_metrics", "append_metrics", "truncate_metrics", "SkippedImages", "TooManySkippedError",
           "apply_overrides", "apply_activation_checkpointing", "checkpoint_wrapped"]

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)(\.pt)?$")  # a file (``.pt``) or a sharded folder
TEMP_NAME = re.compile(r"^\.checkpoint-\d+(\.pt)?\..*tmp.*$")  # atomic_write's temporary files, temporary folders
SET_ASIDE_NAME = re.compile(r"^\.(checkpoint-(\d+))\.old$")  # a sharded folder moved aside while replaced


# ---------------------------------------------------------------------------------------------- schedule, seeds
def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """The LR multiplier of linear warm-up: ``(step + 1) / warmup_steps`` up to 1, then 1 (constant)."""
    warmup = max(0, int(warmup_steps))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return factor


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`warmup_factor` (its ``state_dict`` holds the step count: resumes exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(warmup_steps))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and all CUDA devices) with ``seed``."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """No checkpoint of a run folder could be read."""


def _delete_set_aside(aside: Path) -> None:
    """Delete a set-aside sharded folder (``.checkpoint-N.old``) whose replacement is in place: renamed to a
    temporary name first, so that a delete failing part-way leaves a temporary folder, never one to put back."""
    doomed = aside.with_name(aside.name + ".tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(aside, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointFolder:
    """The checkpoints of one run: ``<folder>/checkpoint-<step:08d>.pt`` files (or sharded ``checkpoint-<step>/``
    folders), at most ``keep`` of them.

    Args:
        folder: the ``checkpoints/`` folder of a run (created on the first save).
        keep: how many checkpoints to keep (the newest ones; at least 1).
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(1, int(keep))

    def path(self, step: int, sharded: bool = False) -> Path:
        """Where the checkpoint of ``step`` goes (a folder for sharded checkpoints)."""
        return self.folder / (f"checkpoint-{step:08d}" if sharded else f"checkpoint-{step:08d}.pt")

    def entries(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint, oldest first (temporary and ``.corrupt`` files excluded; a sharded
        folder set aside by an interrupted :meth:`replace_folder` counts while its replacement is missing)."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            match = CHECKPOINT_NAME.match(entry.name)
            if match and (entry.is_file() if match.group(2) else entry.is_dir()):
                found.append((int(match.group(1)), entry))
            aside = SET_ASIDE_NAME.match(entry.name)  # set aside by a replace that was killed before the rename
            if aside and entry.is_dir() and not (self.folder / aside.group(1)).exists():
                found.append((int(aside.group(2)), entry))
        return sorted(found, key=lambda item: (item[0], item[1].name))

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None."""
        entries = self.entries()
        return entries[-1][1] if entries else None

    def replace_folder(self, complete: Path, final: Path) -> None:
        """Rename the complete folder ``complete`` to ``final`` (a sharded checkpoint), replacing an existing one.

        A folder cannot be renamed over a non-empty one, so an existing ``final`` is first moved aside to
        ``.<name>.old``, and once the new folder is in place renamed to a temporary name and deleted. A process killed
        in between leaves the old folder set aside: :meth:`entries` lists it as that step while the new one is
        missing, and :meth:`clean_temporary` puts it back at start-up. So a complete folder of that step is always
        found.
        """
        if final.is_symlink():  # a link to a folder elsewhere: drop the link, never what it points to
            final.unlink()
        if not final.exists():
            os.replace(complete, final)
            return
        aside = final.with_name(f".{final.name}.old")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(complete, final)
        _delete_set_aside(aside)

    def clean_temporary(self) -> list[Path]:
        """Remove temporary files and folders of interrupted writes (``.checkpoint-N.pt.*.tmp``); returns them.

        A sharded checkpoint set aside by an interrupted :meth:`replace_folder` (``.checkpoint-N.old``) is put back
        where its replacement never arrived, and removed where it did.
        """
        removed = []
        if not self.folder.is_dir():
            return removed
        for entry in list(self.folder.iterdir()):  # a listing first: entries are renamed below
            aside = SET_ASIDE_NAME.match(entry.name)
            if aside and entry.is_dir() and not entry.is_symlink():
                final = self.folder / aside.group(1)
                if final.exists():
                    _delete_set_aside(entry)
                    removed.append(entry)
                else:
                    os.replace(entry, final)
                    logger.warning("restored %s: a save of that step was interrupted while replacing it", final)
                continue
            if TEMP_NAME.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        if removed:
            logger.warning("removed %d temporary file(s) of interrupted checkpoint writes in %s: %s", len(removed),
                           self.folder, ", ".join(p.name for p in removed))
        return removed

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (atomically), then :meth:`rotate`."""
        from .checkpoint import save_checkpoint

        path = self.path(step)
        save_checkpoint(path, state)  # atomic_write: on failure the temp file goes, the old checkpoints stay
        self.rotate(path)
        logger.info("saved %s", path)
        return path

    def rotate(self, newest: Path | None = None) -> list[Path]:
        """Delete all but the ``keep`` newest checkpoints (never ``newest``, the one just written)."""
        entries = self.entries()
        stale = [p for _, p in entries[: max(0, len(entries) - self.keep)] if p != newest]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return stale

    def load_latest(self, load: Callable[[Path], Any] | None = None, set_aside: bool = True) -> tuple[Path, Any]:
        """Load the newest checkpoint that can be read, falling back to older ones with a warning.

        Args:
            load: reads one checkpoint path (default :func:`~dualvitok.training.checkpoint.load_checkpoint`).
            set_aside: rename an unreadable checkpoint to ``<name>.corrupt`` (kept for inspection, never loaded).

        Raises:
            FileNotFoundError: there is no checkpoint. CheckpointError: none of them could be read.
        """
        from .checkpoint import load_checkpoint

        load = load or (lambda p: load_checkpoint(p, map_location="cpu"))
        entries = self.entries()
        if not entries:
            raise FileNotFoundError(f"no checkpoint-*.pt in {self.folder}")
        failures = []
        for _, path in reversed(entries):
            try:
                return path, load(path)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # truncated zip, bad pickle, missing shard: all mean "unreadable"
                failures.append(f"{path.name}: {type(e).__name__}: {e}")
                logger.warning("checkpoint %s cannot be read (%s: %s); falling back to the previous one", path,
                               type(e).__name__, str(e)[:200])
                if set_aside and int(os.environ.get("RANK", "0")) == 0:
                    try:
                        path.rename(path.with_name(path.name + ".corrupt"))
                    except OSError:
                        pass
        raise CheckpointError(f"no readable checkpoint in {self.folder}: " + "; ".join(failures)
                              + "; start a new run with --overwrite or another --output")


# ---------------------------------------------------------------------------------------------- metrics.jsonl
def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn (unparseable) last line is dropped with a warning.

    The library's one JSON-lines reader (:func:`dualvitok.tokens.read_jsonl`, shared with the token index).

    Raises:
        ValueError: a line other than the last is not a JSON object (the file is damaged, not torn).
    """
    from ..tokens import read_jsonl

    return read_jsonl(path)


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a JSON line (non-finite floats are written as null: the file stays strict JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean) + "\n")


def truncate_metrics(path: str | os.PathLike, last_step: int) -> list[dict]:
    """Keep the records with ``step <= last_step`` (and drop a torn last line), rewriting the file atomically."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


# ---------------------------------------------------------------------------------------------- bad data
class TooManySkippedError(RuntimeError):
    """More than ``max_skipped_fraction`` of the training images could not be read."""


class SkippedImages:
    """Training images that could not be read: counted once each, listed in ``skipped.jsonl``, capped.

    Args:
        total: the number of images in the data set.
        max_fraction: the run fails (:class:`TooManySkippedError`) once more than this fraction is unreadable.
        path: ``skipped.jsonl`` to append to (None: do not write; e.g. on ranks other than 0).
    """

    def __init__(self, total: int, max_fraction: float = 0.1, path: str | os.PathLike | None = None):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_fraction}")
        self.total = max(1, int(total))
        self.max_fraction = float(max_fraction)
        self.path = Path(path) if path is not None else None
        self.seen: dict[int, str] = {}  # index -> reason

    def add(self, index: int, name: str, reason: str) -> bool:
        """Record an unreadable image (logged and written once); returns True if it was new."""
        if index in self.seen:
            return False
        self.seen[index] = reason
        logger.warning("skipping unreadable training image %s: %s (%d skipped so far)", name, reason, len(self.seen))
        if self.path is not None:
            append_metrics(self.path, {"index": int(index), "path": json_path(name), "reason": reason})
        return True

    def update(self, items: Iterable[tuple[int, str, str]]) -> None:
        """Record several ``(index, name, reason)`` and enforce the cap."""
        for item in items:
            self.add(*item)
        self.check()

    def update_all_ranks(self, items: list[tuple[int, str, str]], dist_info) -> None:
        """:meth:`update` with this step's unreadable images of every rank (one all-reduce; a gather only when
        some rank skipped), so all ranks see the same count and stop together past the cap."""
        if dist_info.enabled:
            count = all_reduce_mean(torch.tensor([float(len(items))], dtype=torch.float64), dist_info)
            if float(count) > 0:
                items = [tuple(item) for part in all_gather_json([list(s) for s in items]) for item in part]
        if items:
            self.update(items)

    def check(self) -> None:
        fraction = len(self.seen) / self.total
        if fraction > self.max_fraction:
            raise TooManySkippedError(
                f"{len(self.seen)} of {self.total} training images ({fraction:.1%}) could not be read, more than "
                f"max_skipped_fraction={self.max_fraction:g}; the data set looks broken (see skipped.jsonl). Fix it, "
                "or raise the cap (--max-skipped-fraction / data.max_skipped_fraction)")

    def state_dict(self) -> dict:
        return {"indices": sorted(self.seen), "reasons": [self.seen[i] for i in sorted(self.seen)]}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.seen = dict(zip((int(i) for i in state["indices"]), state["reasons"], strict=True))


# ---------------------------------------------------------------------------------------------- overrides
def merge_overrides(into: dict, updates: dict, path: str = "") -> list[str]:
    """Merge ``updates`` into the nested dict ``into`` key by key; returns the dotted names set.

    Raises:
        ValueError: a key that ``into`` does not have (the message names it and the known keys).
    """
    changed = []
    for key, value in updates.items():
        if key not in into:
            raise ValueError(f"model.overrides: unknown DualViTok config field '{path}{key}'; known: {sorted(into)}")
        if isinstance(value, dict) and isinstance(into[key], dict):
            changed += merge_overrides(into[key], value, f"{path}{key}.")
        else:
            into[key] = value
            changed.append(f"{path}{key}")
    return changed


def apply_overrides(model_or_config: Any, overrides: dict, source: str | None = None):
    """The one override rule: return a DualViTok built from a config (or a pretrained model) with ``overrides``.

    * a :class:`~dualvitok.DualViTokConfig`: the overrides are merged and a fresh model is built;
    * a pretrained :class:`~dualvitok.DualViTok` (``init_from``): the overrides are merged into its config, a model
      is built from the result and the pretrained weights are loaded into it strictly. Overrides that do not touch
      weights (token noise, quantizer EMA decay of an EMA quantizer, ...) thus apply; overrides that change a weight's
      shape or the set of weights are refused with the fields and weights they affect -- never silently ignored.
    """
    from ..configuration import DualViTokConfig
    from ..model import DualViTok

    pretrained = model_or_config if isinstance(model_or_config, DualViTok) else None
    config = pretrained.config if pretrained is not None else model_or_config
    if not overrides:
        return pretrained if pretrained is not None else DualViTok(config)
    data = config.to_dict()
    changed = merge_overrides(data, overrides)
    new_config = DualViTokConfig.from_dict(data)
    model = DualViTok(new_config)
    if pretrained is None:
        return model
    weights = pretrained.state_dict()
    target = model.state_dict()
    missing = sorted(set(target) - set(weights))
    unexpected = sorted(set(weights) - set(target))
    reshaped = sorted(k for k in set(target) & set(weights) if target[k].shape != weights[k].shape)
    if missing or unexpected or reshaped:
        details = "; ".join(f"{what}: {names[:4]}{'...' if len(names) > 4 else ''}" for what, names in
                            (("new weights", missing), ("dropped weights", unexpected), ("reshaped", reshaped))
                            if names)
        raise ValueError(f"model.overrides {changed} change the weights of init_from {source or ''} ({details}); "
                         "a fine-tune can only override settings that keep every pretrained weight: drop these "
                         "overrides, or train from model.name/model.config instead of init_from")
    model.load_state_dict(weights, strict=True)
    logger.info("init_from %s with overrides %s applied", source or "(model)", changed)
    return model


# ---------------------------------------------------------------------------------------------- activation checkpoints
def checkpoint_wrapped(module: nn.Module) -> nn.Module:
    """Make ``module``'s forward recompute its activations in backward (``torch.utils.checkpoint``, non-reentrant,
    RNG state preserved: dropout draws the same in the recomputation). Parameters and state-dict keys are unchanged;
    in eval mode or without gradients the forward runs as usual."""
    from torch.utils.checkpoint import checkpoint

    if getattr(module, "_dualvitok_checkpointed", False):
        return module
    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed_forward  # instance attribute: nn.Module.__call__ (and its hooks) still run
    module._dualvitok_checkpointed = True
    return module


def apply_activation_checkpointing(model: nn.Module, types: tuple[type, ...] | None = None) -> int:
    """Wrap every module of ``types`` (default: transformer blocks and MoVQ residual/attention blocks) with
    :func:`checkpoint_wrapped`; returns how many were wrapped. Apply before FSDP sharding."""
    if types is None:
        from ..blocks import AttnBlock2d, ResnetBlock2d, VisionBlock

        types = (VisionBlock, ResnetBlock2d, AttnBlock2d)
    count = 0
    for module in model.modules():
        if isinstance(module, types) and any(p.requires_grad for p in module.parameters()):
            checkpoint_wrapped(module)
            count += 1
    return count
