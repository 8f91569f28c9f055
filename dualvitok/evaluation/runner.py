"""The batched evaluation loop: read files, tokenize and reconstruct, update metric objects, gather across processes.

Follows the ILLUME+ reconstruction evaluation (``tokenizer/reconstruction_vq_ddp.py`` in
``illume-unified-mllm/ILLUME_plus``): encode, decode, round the reconstruction to uint8 as when saving PNGs
(``clamp(127.5 x + 128)``), compare with the prepared input. Differs: the original is the uint8 prepared input (the
reference compares with the float input, which equals it here because the prepared input is uint8 already, and saves
it truncated for rFID); SSIM uses data range 1 (the reference's ``data_range=2`` value is reported separately as
``ssim_reference_inflated``); both codebooks' usage is summed over all processes; statistics are streamed instead of
writing 2 x 50k PNGs; the run can resume.

The metrics are objects (:mod:`dualvitok.evaluation.metrics`); the settings are one dataclass,
:class:`EvaluationSettings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._utils.distributed import DistInfo, all_gather_json, barrier, init_distributed, shutdown_distributed
from .._utils.io import json_path, save_image
from .._utils.locking import output_lock
from ..metrics.fid_backends import FIDBackend
from ..processor import ImageProcessor
from ..tokens import read_jsonl
from .data import ImageFileDataset, Sample
from .metrics import ALL_METRICS, DEFAULT_METRICS, EvalBatch, EvalMetric, build_metrics
from .protocols import EvaluationProtocol, get_protocol
from .report import EvaluationResult, json_safe
from .state import EvaluationState, state_path

logger = logging.getLogger(__name__)

__all__ = ["ALL_METRICS", "DEFAULT_METRICS", "EvaluationResult", "EvaluationSettings", "Evaluator"]


@dataclass
class EvaluationSettings:
    """How an evaluation runs (everything but the model, the files and the metric objects).

    Args:
        protocol: how files are prepared (:func:`dualvitok.evaluation.get_protocol`; default ``imagenet256``).
        batch_size: images per forward pass (images of different sizes are batched separately).
        device: where the model and metric networks run.
        num_workers: DataLoader processes reading files.
        output_dir: where resume state, per-image records and sample pairs go (None: nothing written).
        resume: continue from the state saved in ``output_dir`` (refused if the settings differ).
        grid_images: number of original/reconstruction pairs kept for the PNG grid.
        checkpoint_every: save resume state every this many batches.
        progress: show a progress bar (rank 0).
        model_name, data_name: labels for the results (``model_name`` is part of the resume fingerprint).
        dtype_name: the model's compute dtype, recorded and fingerprinted (the caller converts the model).
        lock_output: hold :func:`dualvitok._utils.locking.output_lock` on ``output_dir`` during :meth:`Evaluator.run`
            (the command holds it itself and turns this off).
    """

    protocol: EvaluationProtocol = dataclasses.field(default_factory=lambda: get_protocol("imagenet256"))
    batch_size: int = 8
    device: str | torch.device = "cpu"
    num_workers: int = 0
    output_dir: str | Path | None = None
    resume: bool = False
    grid_images: int = 8
    checkpoint_every: int = 50
    progress: bool = True
    model_name: str = ""
    data_name: str = ""
    dtype_name: str = "float32"
    lock_output: bool = True

    def __post_init__(self):
        for name, low in (("batch_size", 1), ("checkpoint_every", 1), ("grid_images", 0), ("num_workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.resume and self.output_dir is None:
            raise ValueError("resume needs an output folder holding the interrupted run's state")
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)


_LEGACY_SETTINGS = {f.name for f in dataclasses.fields(EvaluationSettings)} - {"protocol"}


def _fingerprint(files: Sequence[Path], settings: EvaluationSettings, metrics: Sequence[EvalMetric],
                 world_size: int) -> dict:
    digest = hashlib.sha256("\n".join(json_path(Path(f).resolve()) for f in files).encode()).hexdigest()
    return {"files_sha256": digest, "num_files": len(files), "protocol": settings.protocol.to_dict(),
            "model": settings.model_name, "dtype": settings.dtype_name,
            "metrics": sorted((m.fingerprint() for m in metrics), key=lambda d: d["name"]), "world_size": world_size}


def _pair_image(original: torch.Tensor, reconstruction: torch.Tensor) -> Image.Image:
    """uint8 ``[3, H, W]`` twice -> one PIL image, original left, reconstruction right."""
    both = torch.cat([original, reconstruction], dim=-1)  # [3, H, 2W]
    return Image.fromarray(both.permute(1, 2, 0).cpu().numpy(), mode="RGB")


class Evaluator:
    """Evaluate a DualViTok's reconstructions over a list of files.

    Args:
        model: a :class:`dualvitok.DualViTok` (put in eval mode, moved to ``settings.device``).
        settings: an :class:`EvaluationSettings`. (Deprecated: an :class:`EvaluationProtocol` with the settings as
            keywords, the signature before :class:`EvaluationSettings`; still accepted with a DeprecationWarning.)
        metrics: metric names (``ALL_METRICS``; default ``DEFAULT_METRICS``, which need no network weights) or
            :class:`dualvitok.evaluation.metrics.EvalMetric` objects.
        lpips_model: a :class:`dualvitok.metrics.LPIPS` (for ``"lpips"``), reported as ``lpips_name``.
        fid_backend: a :class:`dualvitok.metrics.fid_backends.FIDBackend` (for ``"rfid"``); or ``fid_extractor``
            (``[B, 3, H, W]`` in [0, 1] -> ``[B, fid_dim]``) with pytorch-fid's distance.
        settings_overrides: fields of :class:`EvaluationSettings` replacing those of ``settings``.

    Example:
        >>> settings = EvaluationSettings(get_protocol("imagenet256"), batch_size=32, output_dir="runs/eval")
        >>> result = Evaluator(model, settings, ["psnr", "ssim", "usage"]).run(files)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, settings: EvaluationSettings | EvaluationProtocol | None = None,
                 metrics: Sequence[str | EvalMetric] = DEFAULT_METRICS, *, lpips_model: nn.Module | None = None,
                 lpips_name: str | None = None, fid_backend: FIDBackend | None = None,
                 fid_extractor: nn.Module | None = None, fid_dim: int = 2048, **settings_overrides):
        unknown = set(settings_overrides) - _LEGACY_SETTINGS
        if unknown:
            raise TypeError(f"Evaluator got unexpected keyword arguments {sorted(unknown)}")
        if isinstance(settings, EvaluationProtocol):
            warnings.warn("Evaluator(model, protocol, metrics, batch_size=..., ...) is deprecated; pass "
                          "Evaluator(model, EvaluationSettings(protocol, batch_size=..., ...), metrics)",
                          DeprecationWarning, stacklevel=2)
            settings = EvaluationSettings(settings, **settings_overrides)
        elif settings is None:
            settings = EvaluationSettings(**settings_overrides)
        elif settings_overrides:
            settings = dataclasses.replace(settings, **settings_overrides)
        if fid_backend is None and fid_extractor is not None:
            fid_backend = FIDBackend("custom", fid_extractor, fid_dim)
        self.settings = settings
        self.device = torch.device(settings.device)
        self.model = model.eval().to(self.device)
        self.metrics = [m.to(self.device) for m in build_metrics(list(metrics), model, lpips_model=lpips_model,
                                                                  lpips_name=lpips_name, fid_backend=fid_backend)]

    # ------------------------------------------------------------------------------------------ per batch
    @torch.inference_mode()
    def _process(self, samples: list[Sample], state: EvaluationState, save_pairs: bool) -> list[dict]:
        """Update every metric with one batch; returns the batch's per-image records."""
        originals = torch.stack([s.image for s in samples]).to(self.device)  # uint8 [B, 3, H, W]
        images = originals.float() / 127.5 - 1.0  # [-1, 1]
        encoding = self.model.encode(images)
        recon = self.model.decode(encoding.semantic_codes, encoding.pixel_codes)
        recon_u8 = ImageProcessor.to_uint8(recon)  # rounded as when saving PNGs
        batch = EvalBatch(originals, recon_u8, originals.double() / 255.0, recon_u8.double() / 255.0, encoding)
        per_image: dict[str, torch.Tensor] = {}
        for metric in self.metrics:
            per_image.update(metric.update(batch))
        state.done.update(s.index for s in samples)
        records = []
        for i, s in enumerate(samples):
            record = {"index": s.index, "file": json_path(s.path),
                      "size": list(s.original_size) if s.original_size else None,
                      "evaluated_size": list(s.image.shape[-2:])}
            record.update({k: float(v[i]) for k, v in per_image.items()})
            records.append(record)
        if save_pairs and self.settings.output_dir is not None:
            for s, o, r in zip(samples, originals, recon_u8, strict=True):
                if state.samples_saved >= self.settings.grid_images:
                    break
                save_image(_pair_image(o, r), self.settings.output_dir / "samples" / f"{s.index:07d}.png")
                state.samples_saved += 1
        return records

    # ------------------------------------------------------------------------------------------ main loop
    def run(self, files: Sequence[str | Path]) -> EvaluationResult:
        """Evaluate ``files`` (sharded over torchrun processes); every process returns the gathered result.

        Joins the torchrun process group if none exists yet (and then leaves it at the end); a caller that owns
        the group (``dualvitok evaluate``) keeps it.
        """
        files = [Path(f) for f in files]
        info = init_distributed(self.device)
        try:
            out = self.settings.output_dir
            lock = (output_lock(out, "evaluate", info.rank) if out is not None and self.settings.lock_output
                    else contextlib.nullcontext())
            with lock:
                return self._run(files, info)
        finally:
            shutdown_distributed(info)

    def _run(self, files: list[Path], info: DistInfo) -> EvaluationResult:
        s = self.settings
        rank, world = info.rank, info.world_size
        fingerprint = _fingerprint(files, s, self.metrics, world)
        for m in self.metrics:
            m.reset()
        state_dir = s.output_dir / "state" if s.output_dir is not None else None
        part = state_dir / f"per_image.rank{rank}.jsonl" if state_dir is not None else None
        state = None
        if state_dir is not None and not s.resume:  # a fresh run: forget an earlier run's state and samples
            state_path(state_dir, rank).unlink(missing_ok=True)
            (state_dir / f"rank{rank}.json").unlink(missing_ok=True)  # the format before one-file states
            part.unlink(missing_ok=True)
            if info.is_main and (s.output_dir / "samples").is_dir():
                for stale in (s.output_dir / "samples").glob("*.png"):
                    stale.unlink(missing_ok=True)
        if s.resume:
            state = EvaluationState.load(state_dir, rank, fingerprint, self.metrics, len(files))
            if state is None:
                logger.warning("no saved state in %s: starting from the beginning", state_dir)
            else:
                logger.info("resuming: %d files of this process already done", len(state.done))
        if state is None:
            for m in self.metrics:
                m.reset()
            state = EvaluationState(self.metrics, num_files=len(files))
        state.complete = False
        records_file = None
        if part is not None:
            part.parent.mkdir(parents=True, exist_ok=True)
            size = part.stat().st_size if part.is_file() else 0
            if size < state.per_image_bytes:
                logger.warning("%s is shorter than when the state was saved: some per-image records are lost", part)
            records_file = open(part, "ab")  # noqa: SIM115 - closed in the finally below
            records_file.truncate(min(size, state.per_image_bytes))  # drop records written after the last save
        items = [(i, f) for i, f in enumerate(files) if i % world == rank and i not in state.done]
        shard_total = sum(1 for i in range(len(files)) if i % world == rank)
        loader = DataLoader(ImageFileDataset(items, s.protocol), batch_size=s.batch_size, shuffle=False,
                            num_workers=s.num_workers, collate_fn=list)
        buckets: dict[tuple[int, int], list[Sample]] = {}
        bar = tqdm(total=shard_total, initial=shard_total - len(items), unit="img", desc=f"evaluate {s.protocol.name}",
                   disable=not (s.progress and info.is_main), dynamic_ncols=True)
        batches, started, kept_records = 0, time.perf_counter(), []
        elapsed_before = state.elapsed_s

        def save() -> None:
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            if records_file is not None:  # durable before the state that counts its bytes
                records_file.flush()
                os.fsync(records_file.fileno())
                state.per_image_bytes = records_file.tell()
            state.save(state_dir, rank, fingerprint)

        def flush(key: tuple[int, int]) -> None:
            nonlocal batches
            group = buckets.pop(key)
            records = self._process(group, state, save_pairs=info.is_main and state.samples_saved < s.grid_images)
            if records_file is not None:
                records_file.write("".join(json.dumps(json_safe(r)) + "\n" for r in records).encode())
            else:
                kept_records.extend(json_safe(r) for r in records)
            bar.update(len(group))
            batches += 1
            if state_dir is not None and batches % s.checkpoint_every == 0:
                save()

        failed = False
        try:
            for chunk in loader:
                for sample in chunk:
                    if sample.image is None:
                        logger.warning("skipping %s: %s", json_path(sample.path), sample.skip_reason)
                        state.skipped.append({"path": json_path(sample.path), "reason": sample.skip_reason})
                        state.done.add(sample.index)
                        bar.update(1)
                        continue
                    if sample.original_mode not in (None, "RGB"):
                        state.converted[sample.original_mode] += 1
                    key = tuple(sample.image.shape[-2:])
                    buckets.setdefault(key, []).append(sample)
                    if len(buckets[key]) >= s.batch_size:
                        flush(key)
            for key in list(buckets):
                flush(key)
            state.complete = True
        except BaseException:
            failed = True
            raise
        finally:
            bar.close()
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            try:
                if state_dir is not None:  # also on interruption: the done set excludes unflushed images
                    save()
            except OSError as e:
                if not failed:
                    raise
                logger.error("could not save the resume state: %s", e)
            finally:
                if records_file is not None:
                    records_file.close()
        records = kept_records
        if part is not None and part.is_file():
            records = read_jsonl(part)
        return self._gather(state, files, world, records)

    def _gather(self, state: EvaluationState, files: Sequence[Path], world: int,
                records: list[dict]) -> EvaluationResult:
        s = self.settings
        for m in self.metrics:
            m.sync()
        gathered = all_gather_json({"done": len(state.done), "skipped": state.skipped,
                                    "converted": dict(state.converted), "elapsed_s": state.elapsed_s,
                                    "records": records})
        barrier()
        skipped, converted, done, elapsed, per_image = [], {}, 0, 0.0, []
        for part in gathered:
            done += part["done"]
            skipped += part["skipped"]
            for k, v in part["converted"].items():
                converted[k] = converted.get(k, 0) + v
            elapsed = max(elapsed, part["elapsed_s"])
            per_image += part["records"]
        per_image.sort(key=lambda r: r["index"])
        values, stds, notes, extra = {}, {}, [], {}
        for m in self.metrics:
            r = m.compute()
            values.update(r.values)
            stds.update(r.std)
            notes += r.notes
            extra.update(r.extra)
        usage = next((m for m in self.metrics if m.name == "usage"), None)
        fid = next((m for m in self.metrics if m.name == "rfid"), None)
        settings = {"batch_size": s.batch_size, "device": str(self.device), "world_size": world,
                    "metrics": [m.name for m in self.metrics], "dtype": s.dtype_name}
        if fid is not None:
            settings["fid_backend"] = fid.backend.name
        return EvaluationResult(
            metrics=values, metrics_std=stds, codebook_usage=extra.get("codebook_usage", {}),
            num_images=done - len(skipped), num_files=len(files), skipped=skipped, converted=converted,
            protocol=s.protocol.to_dict(), model=s.model_name, data=s.data_name, notes=notes, settings=settings,
            elapsed_s=elapsed, fid_real=fid.real if fid else None, fid_fake=fid.fake if fid else None,
            usage=usage.usage if usage else None, fid_backend=fid.backend.name if fid else None,
            per_image=per_image, metric_objects=list(self.metrics))
