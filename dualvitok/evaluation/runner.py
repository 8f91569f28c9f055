"""The batched evaluation loop: read files, tokenize and reconstruct, accumulate metrics, gather across processes.

Follows the ILLUME+ reconstruction evaluation (``tokenizer/reconstruction_vq_ddp.py``): encode, decode, round the
reconstruction to uint8 as when saving PNGs (``clamp(127.5 x + 128)``), compare with the prepared input. Differs: the
original is the uint8 prepared input (the reference compares with the float input, which equals it here because the
prepared input is uint8 already, and saves it truncated for rFID); SSIM uses data range 1 (the reference's
``data_range=2`` value is reported separately as ``ssim_reference_inflated``); both codebooks' usage is summed over all
processes; statistics are streamed instead of writing 2 x 50k PNGs; the run can resume.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..metrics.fid import GaussianStatistics, fid_from_statistics
from ..metrics.psnr import psnr
from ..metrics.ssim import ssim, ssim_reference_inflated
from ..metrics.usage import DualCodebookUsage
from ..processor import ImageProcessor
from ..version import __version__
from .data import ImageFileDataset, Sample
from .distributed import all_gather_json, barrier, init_distributed
from .protocols import EvaluationProtocol
from .state import EvaluationState

logger = logging.getLogger(__name__)

ALL_METRICS = ("psnr", "ssim", "ssim_reference_inflated", "lpips", "rfid", "usage")
DEFAULT_METRICS = ("psnr", "ssim", "ssim_reference_inflated", "usage")  # the ones that need no network weights


@dataclass
class EvaluationResult:
    """Everything ``results.json`` holds."""

    metrics: dict[str, float]  # name -> mean over images (rfid: the distance)
    metrics_std: dict[str, float]
    codebook_usage: dict
    num_images: int
    num_files: int
    skipped: list[dict]
    converted: dict[str, int]
    protocol: dict
    model: str
    data: str
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    fid_real: GaussianStatistics | None = None  # features of the originals (not in to_dict)
    fid_fake: GaussianStatistics | None = None  # features of the reconstructions
    usage: DualCodebookUsage | None = None  # histograms of both codebooks

    def to_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s["reason"].split(":")[0].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {
            "library": "dualvitok", "version": __version__, "model": self.model, "data": self.data,
            "protocol": self.protocol, "num_images": self.num_images, "num_files": self.num_files,
            "metrics": self.metrics, "metrics_std": self.metrics_std, "codebook_usage": self.codebook_usage,
            "skipped": {"count": len(self.skipped), "by_reason": reasons, "files": self.skipped},
            "converted": self.converted, "notes": self.notes, "settings": self.settings,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.num_images / self.elapsed_s, 3) if self.elapsed_s > 0 else None,
        }


def _fingerprint(files: Sequence[Path], protocol: EvaluationProtocol, model_name: str, metrics: Sequence[str],
                 world_size: int) -> dict:
    digest = hashlib.sha256("\n".join(str(Path(f).resolve()) for f in files).encode()).hexdigest()
    return {"files_sha256": digest, "num_files": len(files), "protocol": protocol.to_dict(), "model": model_name,
            "metrics": sorted(metrics), "world_size": world_size}


def _pair_image(original: torch.Tensor, reconstruction: torch.Tensor) -> Image.Image:
    """uint8 ``[3, H, W]`` twice -> one PIL image, original left, reconstruction right."""
    both = torch.cat([original, reconstruction], dim=-1)  # [3, H, 2W]
    return Image.fromarray(both.permute(1, 2, 0).cpu().numpy(), mode="RGB")


class Evaluator:
    """Evaluate a DualViTok's reconstructions over a list of files.

    Args:
        model: a :class:`dualvitok.DualViTok` (put in eval mode, moved to ``device``).
        protocol: how files are prepared (:func:`dualvitok.evaluation.get_protocol`).
        metrics: subset of ``ALL_METRICS`` (default: ``DEFAULT_METRICS``, which need no network weights).
        lpips_model: a :class:`dualvitok.metrics.LPIPS` (needed when ``"lpips"`` is in ``metrics``).
        fid_extractor: features ``[B, D]`` of ``[B, 3, H, W]`` in [0, 1] (needed for ``"rfid"``), e.g.
            :class:`dualvitok.metrics.InceptionFeatures`.
        batch_size: images per forward pass (images of different sizes are batched separately).
        device: where the model and metric networks run.
        num_workers: DataLoader processes reading files.
        output_dir: where resume state and sample pairs go (None: nothing written).
        resume: continue from the state saved in ``output_dir``.
        grid_images: number of original/reconstruction pairs kept for the PNG grid.
        checkpoint_every: save resume state every this many batches.
    """

    def __init__(self, model: nn.Module, protocol: EvaluationProtocol, metrics: Sequence[str] = DEFAULT_METRICS, *,
                 lpips_model: nn.Module | None = None, lpips_name: str = "lpips",
                 fid_extractor: nn.Module | None = None, fid_dim: int = 2048, batch_size: int = 8,
                 device: str | torch.device = "cpu", num_workers: int = 0, output_dir: str | Path | None = None,
                 resume: bool = False, grid_images: int = 8, checkpoint_every: int = 50, progress: bool = True,
                 model_name: str = "", data_name: str = "", dtype_name: str = "float32"):
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
        if "lpips" in metrics and lpips_model is None:
            raise ValueError("metric 'lpips' needs lpips_model (dualvitok.metrics.LPIPS.from_pretrained(...))")
        if "rfid" in metrics and fid_extractor is None:
            raise ValueError("metric 'rfid' needs fid_extractor (e.g. InceptionFeatures.from_pretrained())")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resume and output_dir is None:
            raise ValueError("resume needs an output folder holding the interrupted run's state")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.protocol, self.metrics = protocol, tuple(metrics)
        self.lpips_model = lpips_model.eval().to(self.device) if lpips_model is not None else None
        self.lpips_name = lpips_name
        self.fid_extractor = fid_extractor.eval().to(self.device) if fid_extractor is not None else None
        self.fid_dim = fid_dim
        self.batch_size, self.num_workers = batch_size, num_workers
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.resume, self.grid_images, self.checkpoint_every = resume, grid_images, checkpoint_every
        self.progress, self.model_name, self.data_name = progress, model_name, data_name
        self.dtype_name = dtype_name  # recorded in the results (see dualvitok.inference for the bf16 path)

    # ------------------------------------------------------------------------------------------ per batch
    @torch.inference_mode()
    def _process(self, samples: list[Sample], state: EvaluationState, save_pairs: bool) -> None:
        originals = torch.stack([s.image for s in samples]).to(self.device)  # uint8 [B, 3, H, W]
        images = originals.float() / 127.5 - 1.0  # [-1, 1]
        encoding = self.model.encode(images)
        recon = self.model.decode(encoding.semantic_codes, encoding.pixel_codes)
        recon_u8 = ImageProcessor.to_uint8(recon)  # rounded as when saving PNGs
        real, fake = originals.double() / 255.0, recon_u8.double() / 255.0
        if "psnr" in self.metrics:
            state.add("psnr", psnr(fake, real))
        if "ssim" in self.metrics:
            state.add("ssim", ssim(fake, real))
        if "ssim_reference_inflated" in self.metrics:
            state.add("ssim_reference_inflated", ssim_reference_inflated(fake, real))
        if "lpips" in self.metrics:
            state.add(self.lpips_name, self.lpips_model(fake.float(), real.float()))
        if "rfid" in self.metrics:
            state.fid_real.update(self.fid_extractor(real.float()))
            state.fid_fake.update(self.fid_extractor(fake.float()))
        if "usage" in self.metrics:
            state.usage.update(encoding)
        state.done.update(s.index for s in samples)
        if save_pairs and self.output_dir is not None:
            folder = self.output_dir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            for s, o, r in zip(samples, originals, recon_u8, strict=True):
                if state.samples_saved >= self.grid_images:
                    break
                path = folder / f"{s.index:07d}.png"
                tmp = path.with_name(path.stem + ".tmp.png")
                _pair_image(o, r).save(tmp)
                tmp.replace(path)
                state.samples_saved += 1

    # ------------------------------------------------------------------------------------------ main loop
    def run(self, files: Sequence[str | Path]) -> EvaluationResult:
        """Evaluate ``files`` (sharded over torchrun processes); every process returns the gathered result."""
        files = [Path(f) for f in files]
        dist_info = init_distributed(self.device)
        rank, world = dist_info.rank, dist_info.world_size
        fingerprint = _fingerprint(files, self.protocol, self.model_name, self.metrics, world)
        template = EvaluationState(
            usage=DualCodebookUsage.for_model(self.model),
            fid_real=GaussianStatistics(self.fid_dim) if "rfid" in self.metrics else None,
            fid_fake=GaussianStatistics(self.fid_dim) if "rfid" in self.metrics else None)
        state_dir = self.output_dir / "state" if self.output_dir is not None else None
        state = None
        if state_dir is not None and not self.resume:  # a fresh run: forget an earlier run's state and samples
            for stale in (state_dir / f"rank{rank}.json", state_dir / f"rank{rank}.safetensors"):
                stale.unlink(missing_ok=True)
            if dist_info.is_main and (self.output_dir / "samples").is_dir():
                for stale in (self.output_dir / "samples").glob("*.png"):
                    stale.unlink(missing_ok=True)
        if self.resume:
            state = EvaluationState.load(state_dir, rank, fingerprint, template)
            if state is None:
                logger.warning("no saved state in %s: starting from the beginning", state_dir)
            else:
                logger.info("resuming: %d files of this process already done", len(state.done))
        state = state or template
        items = [(i, f) for i, f in enumerate(files) if i % world == rank and i not in state.done]
        shard_total = sum(1 for i in range(len(files)) if i % world == rank)
        loader = DataLoader(ImageFileDataset(items, self.protocol), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=list)
        buckets: dict[tuple[int, int], list[Sample]] = {}
        bar = tqdm(total=shard_total, initial=shard_total - len(items), unit="img",
                   desc=f"evaluate {self.protocol.name}",
                   disable=not (self.progress and dist_info.is_main), dynamic_ncols=True)
        batches, started = 0, time.perf_counter()
        elapsed_before = state.elapsed_s

        def flush(key: tuple[int, int]) -> None:
            nonlocal batches
            group = buckets.pop(key)
            self._process(group, state, save_pairs=dist_info.is_main and state.samples_saved < self.grid_images)
            bar.update(len(group))
            batches += 1
            if state_dir is not None and batches % self.checkpoint_every == 0:
                state.elapsed_s = elapsed_before + time.perf_counter() - started
                state.save(state_dir, rank, fingerprint)

        try:
            for chunk in loader:
                for s in chunk:
                    if s.image is None:
                        logger.warning("skipping %s: %s", s.path, s.skip_reason)
                        state.skipped.append({"path": s.path, "reason": s.skip_reason})
                        state.done.add(s.index)
                        bar.update(1)
                        continue
                    if s.original_mode not in (None, "RGB"):
                        state.converted[s.original_mode] += 1
                    key = tuple(s.image.shape[-2:])
                    buckets.setdefault(key, []).append(s)
                    if len(buckets[key]) >= self.batch_size:
                        flush(key)
            for key in list(buckets):
                flush(key)
        finally:
            bar.close()
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            if state_dir is not None:  # also on interruption: the done set excludes unflushed images
                state.save(state_dir, rank, fingerprint)
        return self._gather(state, files, world)

    def _gather(self, state: EvaluationState, files: Sequence[Path], world: int) -> EvaluationResult:
        state.usage.all_reduce()
        for stats in (state.fid_real, state.fid_fake):
            if stats is not None:
                stats.all_gather()
        gathered = all_gather_json(state.to_json())
        total = EvaluationState(usage=state.usage, fid_real=state.fid_real, fid_fake=state.fid_fake)
        for part in gathered:
            other = EvaluationState(usage=DualCodebookUsage.for_model(self.model))
            other.done, other.skipped = set(part["done"]), part["skipped"]
            other.converted.update(part["converted"])
            other.sums, other.squares = part["sums"], part["squares"]
            other.counts, other.nonfinite = part["counts"], part["nonfinite"]
            total.merge(other)
            total.elapsed_s = max(total.elapsed_s, part["elapsed_s"])
        barrier()
        metrics, stds = {}, {}
        names = [m for m in self.metrics if m not in ("lpips", "rfid", "usage")]
        names += [self.lpips_name] if "lpips" in self.metrics else []
        for name in names:
            metrics[name], stds[name] = total.mean_std(name)
        num_images = len(total.done) - len(total.skipped)
        notes = []
        if "rfid" in self.metrics:
            if total.fid_real.count >= 2:
                metrics["rfid"] = fid_from_statistics(total.fid_real, total.fid_fake)
                if total.fid_real.count < self.fid_dim:
                    notes.append(f"rFID from {total.fid_real.count} images (< {self.fid_dim} feature dimensions): "
                                 "biased and only comparable with runs on the same images")
            else:
                metrics["rfid"] = math.nan
                notes.append("rFID needs at least 2 images")
        usage = total.usage.to_dict() if "usage" in self.metrics else {}
        return EvaluationResult(
            metrics=metrics, metrics_std=stds, codebook_usage=usage, num_images=num_images, num_files=len(files),
            skipped=total.skipped, converted=dict(total.converted), protocol=self.protocol.to_dict(),
            model=self.model_name, data=self.data_name, notes=notes,
            settings={"batch_size": self.batch_size, "device": str(self.device), "world_size": world,
                      "metrics": list(self.metrics), "dtype": self.dtype_name},
            elapsed_s=total.elapsed_s, fid_real=total.fid_real, fid_fake=total.fid_fake,
            usage=total.usage if "usage" in self.metrics else None)

