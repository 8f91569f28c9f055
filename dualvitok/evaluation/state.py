"""Accumulated evaluation state of one process, saved as one file so an interrupted run can resume.

Each process keeps the indices it has finished, its skipped files, the state tensors of every metric object
(:mod:`dualvitok.evaluation.metrics`) and the length of its per-image record file. ``save`` writes everything into
one ``state/rank<r>.safetensors`` (the metrics' tensors, a ``done`` mask and a ``meta`` tensor holding UTF-8 JSON)
through :func:`dualvitok._utils.atomic_write`: a kill at any moment leaves either the previous complete state or the
new one, and a full disk leaves the previous one loadable. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._utils import atomic_write
from .metrics import EvalMetric

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: rank<r>.json + rank<r>.safetensors (before dualvitok 0.x); 2: one file


def state_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.safetensors"


def describe_difference(saved: dict, current: dict) -> str:
    """``"dtype (saved 'float32', now 'bfloat16'); ..."`` for the keys whose values differ."""
    parts = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            parts.append(f"{key} (saved {saved.get(key)!r}, now {current.get(key)!r})")
    return "; ".join(parts)


@dataclass
class EvaluationState:
    """What one process has accumulated so far (the metric objects hold their own tensors)."""

    metrics: list[EvalMetric]
    num_files: int = 0
    done: set[int] = field(default_factory=set)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}, paths JSON-safe
    converted: Counter = field(default_factory=Counter)  # original PIL mode -> count (non-RGB files)
    samples_saved: int = 0
    per_image_bytes: int = 0  # length of this rank's per-image record file at the last save
    elapsed_s: float = 0.0
    generation: int = 0
    complete: bool = False

    def tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for m in self.metrics:
            for key, value in m.state_dict().items():
                t[f"metric.{m.name}.{key}"] = value.detach().cpu().contiguous()
        done = torch.zeros(self.num_files, dtype=torch.uint8)
        if self.done:
            done[torch.tensor(sorted(self.done), dtype=torch.int64)] = 1
        t["done"] = done
        return t

    def meta(self, fingerprint: dict) -> dict:
        return {"format": FORMAT, "fingerprint": fingerprint, "skipped": self.skipped,
                "converted": dict(self.converted), "samples_saved": self.samples_saved,
                "per_image_bytes": self.per_image_bytes, "elapsed_s": self.elapsed_s, "generation": self.generation,
                "complete": self.complete}

    def save(self, folder: Path, rank: int, fingerprint: dict) -> Path:
        """Write this process's state into ``folder/rank<rank>.safetensors`` atomically (one file).

        Raises:
            OSError: the write failed (e.g. disk full: the message names the file); the previous state is kept.
        """
        self.generation += 1
        tensors = self.tensors()
        text = json.dumps(self.meta(fingerprint), ensure_ascii=True)  # paths were made JSON-safe by the runner
        tensors["meta"] = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
        path = state_path(folder, rank)
        with atomic_write(path, fsync=True) as tmp:  # durable: a power loss keeps this or the previous state
            save_file(tensors, str(tmp), metadata={"format": str(FORMAT)})
        return path

    @classmethod
    def load(cls, folder: Path, rank: int, fingerprint: dict, metrics: Sequence[EvalMetric],
             num_files: int) -> EvaluationState | None:
        """The state saved by an earlier run with the same fingerprint (loaded into ``metrics``); None if none.

        Raises:
            ValueError: if the saved state belongs to a different run (the message names each difference) or was
                written by an older version.
        """
        path = state_path(folder, rank)
        if (folder / f"rank{rank}.json").is_file() and not _has_meta(path):
            raise ValueError(f"cannot resume: {folder} holds state written by an older dualvitok (rank{rank}.json); "
                             "run again with --overwrite to start over")
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            meta = json.loads(bytes(t.pop("meta").tolist()).decode("utf-8"))
        except Exception as e:
            raise ValueError(f"cannot resume: {path} is unreadable ({type(e).__name__}: {e}); run again with "
                             "--overwrite to start over") from e
        saved = meta.get("fingerprint", {})
        if saved != fingerprint:
            raise ValueError(f"cannot resume: the saved run in {folder.parent} differs in "
                             f"{describe_difference(saved, fingerprint)}; use the same settings, another --output "
                             "folder, or --overwrite to start over")
        for m in metrics:
            prefix = f"metric.{m.name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
        state = cls(list(metrics), num_files=num_files)
        state.done = set(torch.nonzero(t["done"]).flatten().tolist())
        state.skipped, state.converted = meta["skipped"], Counter(meta["converted"])
        state.samples_saved, state.per_image_bytes = meta["samples_saved"], meta["per_image_bytes"]
        state.elapsed_s, state.generation = meta["elapsed_s"], meta["generation"]
        state.complete = meta.get("complete", False)
        return state


def _has_meta(path: Path) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return "meta" in f.keys()
    except Exception:
        return False


def saved_run_complete(folder: Path, rank: int) -> bool | None:
    """Whether the state saved in ``folder`` belongs to a finished run; None if there is none (or unreadable)."""
    path = state_path(folder, rank)
    if not path.is_file():
        return None  # (an older version's rank<r>.json cannot be resumed: nothing to protect)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(bytes(f.get_tensor("meta").tolist()).decode("utf-8"))
        return bool(meta.get("complete", False))
    except Exception:
        return False
