"""Evaluation metrics as objects: ``update`` per batch, ``sync`` across processes, ``compute``, state for resume.

The design of torchmetrics' ``Metric`` (update / sync / compute, tensor states), without its dependency: every
metric keeps its state as named tensors (``state_dict`` / ``load_state_dict``, saved by
:class:`dualvitok.evaluation.state.EvaluationState` for ``--resume``), merges it over ``torch.distributed`` in
``sync``, and says in ``fingerprint`` which options change its numbers (a resumed run must not mix them).

Adding a metric touches this file only: subclass :class:`EvalMetric` (or use :class:`PerImageMean` with a function
``(fake, real) -> [B]``) and register its name in :func:`build_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._utils.distributed import all_reduce_sum
from ..metrics.fid import FIDStatistics, GaussianStatistics
from ..metrics.fid_backends import FIDBackend
from ..metrics.psnr import psnr
from ..metrics.ssim import ssim, ssim_reference_inflated
from ..metrics.usage import DualCodebookUsage
from ..quantizers import CodebookUsage

ALL_METRICS = ("psnr", "ssim", "ssim_reference_inflated", "lpips", "rfid", "usage")
DEFAULT_METRICS = ("psnr", "ssim", "ssim_reference_inflated", "usage")  # the ones that need no network weights


@dataclass
class EvalBatch:
    """One batch as every metric sees it.

    Attributes:
        originals: the prepared inputs, uint8 ``[B, 3, H, W]``.
        reconstructions: the model's outputs rounded as saved PNGs, uint8 ``[B, 3, H, W]``.
        real, fake: the same as float64 in [0, 1] (``u8 / 255``).
        encoding: the model's :class:`dualvitok.outputs.DualViTokEncoding` of the batch.
    """

    originals: Tensor
    reconstructions: Tensor
    real: Tensor
    fake: Tensor
    encoding: object


@dataclass
class MetricResult:
    """What a metric contributes to ``results.json``."""

    values: dict[str, float] = field(default_factory=dict)  # name -> mean (or the distance)
    std: dict[str, float] = field(default_factory=dict)  # name -> standard deviation over images
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # top-level results.json sections (e.g. codebook_usage)


class EvalMetric:
    """Base class: one metric of an evaluation (see the module docstring)."""

    name: str = "metric"  # the name given to --metrics
    per_image: bool = False  # whether update returns per-image values for per_image.jsonl

    def update(self, batch: EvalBatch) -> dict[str, Tensor]:
        """Accumulate a batch; returns per-image values ``{key: [B]}`` (empty for set-level metrics)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated (a new run)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Merge this process's state with every other process's (in place; no-op when not distributed)."""

    def compute(self) -> MetricResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated state as named CPU tensors (saved for --resume)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Options that change the numbers (compared on --resume)."""
        return {"name": self.name}

    def write_artifacts(self, folder: Path) -> dict[str, Path]:
        """Extra files for the output folder (statistics, histograms); returns their paths by kind."""
        return {}

    def to(self, device: torch.device) -> EvalMetric:
        return self


class PerImageMean(EvalMetric):
    """Mean and standard deviation over images of a per-image metric (PSNR, SSIM, LPIPS ...), in float64.

    Args:
        name: the metric's key in results.json.
        fn: ``(fake, real) -> [B]`` on float64 ``[B, 3, H, W]`` images in [0, 1].
    """

    per_image = True

    def __init__(self, name: str, fn: Callable[[Tensor, Tensor], Tensor], options: dict | None = None):
        self.name, self.fn, self.options = name, fn, dict(options or {})
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)  # sum, sum of squares of the finite values
        self.counts = torch.zeros(2, dtype=torch.int64)  # finite values, non-finite values (identical images)

    def update(self, batch: EvalBatch) -> dict[str, Tensor]:
        values = self.fn(batch.fake, batch.real)
        v = values.detach().double().cpu()
        finite = torch.isfinite(v)
        self.sums = self.sums + torch.stack([v[finite].sum(), v[finite].pow(2).sum()])
        self.counts = self.counts + torch.stack([finite.sum(), (~finite).sum()])
        return {self.name: v}

    def sync(self) -> None:
        self.sums, self.counts = all_reduce_sum(self.sums), all_reduce_sum(self.counts)

    def compute(self) -> MetricResult:
        n, inf = int(self.counts[0]), int(self.counts[1])
        if inf:
            mean, std = math.inf, math.nan
        elif n == 0:
            mean, std = math.nan, math.nan
        else:
            mean = float(self.sums[0]) / n
            std = math.sqrt(max(float(self.sums[1]) / n - mean * mean, 0.0))
        return MetricResult({self.name: mean}, {self.name: std})

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums, self.counts = state["sums"].double(), state["counts"].long()

    def fingerprint(self) -> dict:
        return {"name": self.name, **self.options}


class LPIPSMetric(PerImageMean):
    """Mean LPIPS (a :class:`dualvitok.metrics.LPIPS`), reported as ``lpips_<net>``."""

    def __init__(self, model: nn.Module, name: str | None = None):
        self.model = model.eval()
        net = getattr(model, "net_name", None)
        super().__init__(name or (f"lpips_{net}" if net else "lpips"), self._distance, {"net": net})

    def _distance(self, fake: Tensor, real: Tensor) -> Tensor:
        return self.model(fake.float(), real.float())

    def to(self, device: torch.device) -> LPIPSMetric:
        self.model.to(device)
        return self


class CodebookUsageMetric(EvalMetric):
    """Usage of both codebooks (utilisation, perplexity, histograms), summed over processes."""

    name = "usage"

    def __init__(self, semantic_size: int, pixel_size: int):
        self.sizes = (int(semantic_size), int(pixel_size))
        self.reset()

    def reset(self) -> None:
        self.usage = DualCodebookUsage(CodebookUsage(self.sizes[0]), CodebookUsage(self.sizes[1]))

    @classmethod
    def for_model(cls, model: nn.Module) -> CodebookUsageMetric:
        return cls(model.semantic_quantizer.codebook_size, model.pixel_quantizer.codebook_size)

    def update(self, batch: EvalBatch) -> dict[str, Tensor]:
        self.usage.update(batch.encoding)
        return {}

    def sync(self) -> None:
        self.usage.all_reduce()

    def compute(self) -> MetricResult:
        return MetricResult(extra={"codebook_usage": self.usage.to_dict()})

    def state_dict(self) -> dict[str, Tensor]:
        return {"semantic": self.usage.semantic.counts.cpu(), "pixel": self.usage.pixel.counts.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.usage.semantic.counts, self.usage.pixel.counts = state["semantic"].long(), state["pixel"].long()

    def fingerprint(self) -> dict:
        return {"name": self.name, "codebooks": [self.usage.semantic.codebook_size, self.usage.pixel.codebook_size]}

    def write_artifacts(self, folder: Path) -> dict[str, Path]:
        return {"histograms": self.usage.save_histograms(folder / "codebook_histograms.npz")}


class FIDMetric(EvalMetric):
    """rFID between the originals and the reconstructions through one :class:`FIDBackend` (streamed statistics)."""

    name = "rfid"

    def __init__(self, backend: FIDBackend):
        self.backend = backend
        self.backend.extractor.eval()
        self.reset()

    def reset(self) -> None:
        self.real, self.fake = GaussianStatistics(self.backend.dim), GaussianStatistics(self.backend.dim)

    def update(self, batch: EvalBatch) -> dict[str, Tensor]:
        self.real.update(self.backend.extractor(batch.real.float()))
        self.fake.update(self.backend.extractor(batch.fake.float()))
        return {}

    def sync(self) -> None:
        self.real.all_gather()
        self.fake.all_gather()

    def compute(self) -> MetricResult:
        n, dim = self.real.count, self.backend.dim
        if n < 2:
            return MetricResult({"rfid": math.nan}, notes=["rFID needs at least 2 images"])
        a = FIDStatistics(self.real.mu, self.real.sigma, n)
        b = FIDStatistics(self.fake.mu, self.fake.sigma, self.fake.count)
        notes = []
        if n < dim:
            notes.append(f"rFID from {n} images (< {dim} feature dimensions): biased and only comparable with runs on "
                         "the same images")
        return MetricResult({"rfid": self.backend.distance(a, b)}, notes=notes,
                            extra={"fid_backend": self.backend.name})

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for key, stats in (("real", self.real), ("fake", self.fake)):
            out[f"{key}.count"] = torch.tensor([stats.count], dtype=torch.int64)
            out[f"{key}.mean"], out[f"{key}.comoment"] = stats.mean.contiguous(), stats.comoment.contiguous()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, stats in (("real", self.real), ("fake", self.fake)):
            stats.count = int(state[f"{key}.count"][0])
            stats.mean, stats.comoment = state[f"{key}.mean"].double(), state[f"{key}.comoment"].double()

    def fingerprint(self) -> dict:
        return {"name": self.name, "backend": self.backend.name, "dim": self.backend.dim}

    def write_artifacts(self, folder: Path) -> dict[str, Path]:
        if self.real.count < 2:
            return {}
        return {"fid_originals": self.real.save(folder / "fid_stats_originals.npz"),
                "fid_reconstructions": self.fake.save(folder / "fid_stats_reconstructions.npz")}

    def to(self, device: torch.device) -> FIDMetric:
        self.backend.extractor.to(device)
        return self


def build_metrics(names: Sequence[str | EvalMetric], model: nn.Module, *, lpips_model: nn.Module | None = None,
                  lpips_name: str | None = None, fid_backend: FIDBackend | None = None) -> list[EvalMetric]:
    """Metric objects for ``names`` (``ALL_METRICS``; objects are passed through), in the order given.

    Args:
        names: metric names or ready :class:`EvalMetric` objects.
        model: the tokenizer (codebook sizes for ``usage``).
        lpips_model: a :class:`dualvitok.metrics.LPIPS`, needed for ``"lpips"``.
        lpips_name: its key in the results (default ``lpips_<net>``).
        fid_backend: a :class:`dualvitok.metrics.fid_backends.FIDBackend`, needed for ``"rfid"``.
    """
    unknown = sorted(str(n) for n in names if isinstance(n, str) and n not in ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
    out: list[EvalMetric] = []
    for n in names:
        if isinstance(n, EvalMetric):
            out.append(n)
        elif n == "psnr":
            out.append(PerImageMean("psnr", psnr))
        elif n == "ssim":
            out.append(PerImageMean("ssim", ssim))
        elif n == "ssim_reference_inflated":
            out.append(PerImageMean("ssim_reference_inflated", ssim_reference_inflated))
        elif n == "lpips":
            if lpips_model is None:
                raise ValueError("metric 'lpips' needs lpips_model (dualvitok.metrics.LPIPS.from_pretrained(...))")
            out.append(LPIPSMetric(lpips_model, lpips_name))
        elif n == "rfid":
            if fid_backend is None:
                raise ValueError("metric 'rfid' needs an FID backend (fid_backend=build_fid_backend(...)) or "
                                 "fid_extractor (e.g. InceptionFeatures.from_pretrained())")
            out.append(FIDMetric(fid_backend))
        elif n == "usage":
            out.append(CodebookUsageMetric.for_model(model))
    names_seen = [m.name for m in out]
    if len(set(names_seen)) != len(names_seen):
        raise ValueError(f"metrics given twice: {names_seen}")
    return out


