"""Accumulated evaluation state of one process, saved atomically so an interrupted run can resume.

Each process keeps the indices it has finished, its skipped files, per-metric sums, both codebook histograms and the
two FID accumulators. ``save`` writes ``rank<r>.safetensors`` (tensors) then ``rank<r>.json`` (everything else and a
generation counter that must match the tensors' metadata); nothing is pickled.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._utils import atomic_write
from ..metrics.fid import GaussianStatistics
from ..metrics.usage import DualCodebookUsage
from ..quantizers import CodebookUsage


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@dataclass
class EvaluationState:
    """What one process has accumulated so far."""

    usage: DualCodebookUsage
    fid_real: GaussianStatistics | None = None
    fid_fake: GaussianStatistics | None = None
    done: set[int] = field(default_factory=set)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    converted: Counter = field(default_factory=Counter)  # original PIL mode -> count (non-RGB files)
    sums: dict[str, float] = field(default_factory=dict)  # metric -> sum over images
    squares: dict[str, float] = field(default_factory=dict)  # metric -> sum of squares
    counts: dict[str, int] = field(default_factory=dict)  # metric -> number of finite values
    nonfinite: dict[str, int] = field(default_factory=dict)  # metric -> number of inf values (identical images)
    samples_saved: int = 0
    elapsed_s: float = 0.0
    generation: int = 0

    def add(self, name: str, values: torch.Tensor) -> None:
        """Add per-image values ``[B]`` of a metric."""
        v = values.detach().double().cpu()
        finite = torch.isfinite(v)
        self.sums[name] = self.sums.get(name, 0.0) + float(v[finite].sum())
        self.squares[name] = self.squares.get(name, 0.0) + float(v[finite].pow(2).sum())
        self.counts[name] = self.counts.get(name, 0) + int(finite.sum())
        self.nonfinite[name] = self.nonfinite.get(name, 0) + int((~finite).sum())

    def merge(self, other: EvaluationState) -> None:
        """Add another process's state into this one."""
        self.usage.semantic.merge(other.usage.semantic)
        self.usage.pixel.merge(other.usage.pixel)
        for mine, theirs in ((self.fid_real, other.fid_real), (self.fid_fake, other.fid_fake)):
            if mine is not None and theirs is not None:
                mine.merge(theirs)
        self.done |= other.done
        self.skipped += other.skipped
        self.converted.update(other.converted)
        for table, other_table in ((self.sums, other.sums), (self.squares, other.squares), (self.counts, other.counts),
                                   (self.nonfinite, other.nonfinite)):
            for k, v in other_table.items():
                table[k] = table.get(k, 0) + v

    def mean_std(self, name: str) -> tuple[float, float]:
        n, inf = self.counts.get(name, 0), self.nonfinite.get(name, 0)
        if inf:
            return math.inf, math.nan
        if n == 0:
            return math.nan, math.nan
        mean = self.sums[name] / n
        var = max(self.squares[name] / n - mean * mean, 0.0)
        return mean, math.sqrt(var)

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> dict:
        return {"done": sorted(self.done), "skipped": self.skipped, "converted": dict(self.converted),
                "sums": self.sums, "squares": self.squares, "counts": self.counts, "nonfinite": self.nonfinite,
                "samples_saved": self.samples_saved, "elapsed_s": self.elapsed_s, "generation": self.generation}

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"usage.semantic": self.usage.semantic.counts.cpu(), "usage.pixel": self.usage.pixel.counts.cpu()}
        for name, stats in (("fid_real", self.fid_real), ("fid_fake", self.fid_fake)):
            if stats is not None:
                t[f"{name}.count"] = torch.tensor([stats.count], dtype=torch.int64)
                t[f"{name}.mean"] = stats.mean.contiguous()
                t[f"{name}.comoment"] = stats.comoment.contiguous()
        return t

    def save(self, folder: Path, rank: int, fingerprint: dict) -> None:
        """Write this process's state into ``folder`` (atomically, tensors first)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        tensor_path = folder / f"rank{rank}.safetensors"
        with atomic_write(tensor_path) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"generation": str(self.generation)})
        atomic_write_text(folder / f"rank{rank}.json", json.dumps({"fingerprint": fingerprint, **self.to_json()}))

    @classmethod
    def load(cls, folder: Path, rank: int, fingerprint: dict, template: EvaluationState) -> EvaluationState | None:
        """The state saved by an earlier run with the same fingerprint; None if there is none.

        Raises:
            ValueError: if a saved state belongs to a different run (model, data, protocol, metrics, world size).
        """
        meta_path, tensor_path = folder / f"rank{rank}.json", folder / f"rank{rank}.safetensors"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(meta.get("fingerprint", {}))
                          if fingerprint.get(k) != meta.get("fingerprint", {}).get(k))
            raise ValueError(f"cannot resume: the saved run in {folder.parent} differs in {diff}; use another --output "
                             "folder or run without --resume to start over")
        from safetensors import safe_open

        with safe_open(str(tensor_path), "pt") as f:
            if f.metadata().get("generation") != str(meta["generation"]):
                raise ValueError(f"cannot resume: {tensor_path} and {meta_path} are from different saves; start over")
        t = load_file(str(tensor_path))
        usage = DualCodebookUsage(CodebookUsage(template.usage.semantic.codebook_size),
                                  CodebookUsage(template.usage.pixel.codebook_size))
        usage.semantic.counts, usage.pixel.counts = t["usage.semantic"], t["usage.pixel"]
        state = cls(usage=usage, fid_real=template.fid_real, fid_fake=template.fid_fake)
        for name in ("fid_real", "fid_fake"):
            stats = getattr(state, name)
            if stats is not None:
                stats.count = int(t[f"{name}.count"][0])
                stats.mean, stats.comoment = t[f"{name}.mean"].double(), t[f"{name}.comoment"].double()
        state.done = set(meta["done"])
        state.skipped, state.converted = meta["skipped"], Counter(meta["converted"])
        state.sums, state.squares, state.counts = meta["sums"], meta["squares"], meta["counts"]
        state.nonfinite, state.samples_saved = meta["nonfinite"], meta["samples_saved"]
        state.elapsed_s, state.generation = meta["elapsed_s"], meta["generation"]
        return state
