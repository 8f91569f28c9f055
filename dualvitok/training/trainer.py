"""The DualViTok trainer: generator / discriminator updates, DDP or FSDP, progressive resolution, exact resume.

Follows the ILLUME+ training loop (illume-unified-mllm/ILLUME_plus,
``vision_tokenizer/tokenizer/train_dualvitok.py``): Adam with betas (0.9, 0.95), separate gradient clipping of
generator and discriminator, bf16 autocast, constant LR, the loss's ``global_step`` = optimizer step + 1, and one
generator then one discriminator update per iteration. Additions: EMA, linear warm-up, progressive resolution stages
with aspect-ratio buckets, ``metrics.jsonl`` (one record per optimizer step), a loss-curve PNG, periodic
reconstructions, and checkpoints that hold everything needed to continue bit for bit on CPU (model, discriminator,
both optimizers and schedulers, EMA, step, RNG states, data position), written atomically. The plumbing shared with
the refiner trainer (schedule, seeding, checkpoint folder, metrics, skipped images, overrides, activation
checkpointing) is :mod:`dualvitok.training.run`; DDP vs FSDP is a :mod:`dualvitok.training.strategy` object."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._utils import atomic_write
from .._utils.distributed import DistInfo, all_reduce_mean, init_distributed, shutdown_distributed
from .._utils.locking import output_lock
from ..configuration import DualViTokConfig
from ..devices import resolve_device
from ..model import DualViTok
from ..registry import get_config
from .checkpoint import capture_rng_state, restore_rng_state
from .config import TrainConfig
from .data import BatchDataset, TrainImageDataset, collect_sources
from .dualvitok_loss import DualViTokLoss
from .ema import ModelEMA
from .plotting import plot_loss_curve, save_image_grid
from .run import (
    CheckpointFolder,
    SkippedImages,
    append_metrics,
    apply_activation_checkpointing,
    apply_overrides,
    read_metrics,
    seed_everything,
    truncate_metrics,
    warmup_scheduler,
)
from .samplers import SampleSpec, assign_buckets, bucket_sizes, epoch_batches
from .strategy import make_strategy

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult", "build_model"]


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns: final ``step``, the last record's ``loss``, the output folder and the
    folder of the final model saved with ``save_pretrained`` (``final_model``)."""

    step: int
    loss: float | None
    output_dir: Path
    final_model: Path | None


def build_model(config: TrainConfig) -> DualViTok:
    """The model of ``config.model``: registered name or explicit config, or ``init_from`` (a pretrained folder),
    with ``overrides`` applied by the one rule of :func:`dualvitok.training.run.apply_overrides` (merged key by key;
    with ``init_from``, refused if they change a pretrained weight)."""
    spec = config.model
    if spec.init_from:
        if spec.config is not None:
            raise ValueError("model: give either init_from (a pretrained folder) or config, not both")
        return apply_overrides(DualViTok.from_pretrained(spec.init_from), spec.overrides, spec.init_from)
    if spec.config is not None:
        model_config = DualViTokConfig.from_dict(spec.config)
    elif spec.name:
        model_config = get_config(spec.name)
    else:
        raise ValueError("model: give a registered 'name', a 'config' dict, or 'init_from'")
    return apply_overrides(model_config, spec.overrides)


def _make_optimizer(params, cfg, lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.type == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return warmup_scheduler(optimizer, cfg.warmup_steps if cfg.scheduler == "warmup" else 0)


class Trainer:
    """Trains a DualViTok from a :class:`TrainConfig`.

    Args:
        config: the training configuration.
        output_dir: run folder (``metrics.jsonl``, ``checkpoints/``, ``samples/``, ``loss_curve.png``, ``final/``,
            ``skipped.jsonl``, ``tensorboard/``). One run at a time: a second writer is refused
            (:func:`dualvitok._utils.locking.output_lock`).
        resume: continue from the newest readable checkpoint in ``output_dir`` (error if none).
        max_steps: overrides ``config.run.max_steps``.
        progress: show a tqdm progress bar (main process only).
        overwrite: delete what an earlier run left in ``output_dir`` (checkpoints, metrics, samples, final model)
            and start over.

    Under ``torchrun`` each process trains on its slice of every global batch (gloo on CPU, nccl on GPU), with the
    model replicated (``run.parallel: ddp``) or sharded (``fsdp``); the difference lives in the strategy object of
    :mod:`dualvitok.training.strategy`. With ``optimizer.accumulation_steps = N`` every optimizer step sums the
    gradients of N micro-batches of ``data.batch_size`` (exactly one batch N times as large).
    """

    def __init__(self, config: TrainConfig, output_dir: str | os.PathLike, resume: bool = False,
                 max_steps: int | None = None, progress: bool = True, overwrite: bool = False):
        if resume and overwrite:
            raise ValueError("choose either resume or overwrite, not both")
        self.config = config
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.max_steps = int(max_steps if max_steps is not None else config.run.max_steps)
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        self.progress = progress
        self._setup_done = False
        self._closer = contextlib.ExitStack()

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build device, process group, data, model, loss, optimizers; restore a checkpoint when resuming."""
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output-folder lock and the tracker, and leave the process group if this trainer joined it
        (done at the end of :meth:`train`; a process that exits with a live gloo group can abort in its teardown,
        "terminate called without an active exception", as a torchrun rank once did here)."""
        self._closer.close()
        info = getattr(self, "dist", None)
        if info is not None:
            shutdown_distributed(info)

    def _setup(self) -> None:
        cfg = self.config
        run = cfg.run
        device = resolve_device(run.device or "auto")
        self.dist: DistInfo = init_distributed(device.type)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self._closer.enter_context(output_lock(self.output_dir, "train", rank=self.dist.rank))
        if run.threads:
            torch.set_num_threads(run.threads)
        seed_everything(run.seed)  # same init on every rank (DDP also broadcasts rank 0's parameters)
        self.accumulation = cfg.optimizer.accumulation_steps
        if cfg.loss.disc_adaptive_weight and self.accumulation > 1:
            raise ValueError("loss.disc_adaptive_weight uses one micro-batch's last-layer gradient; turn it off or "
                             "set optimizer.accumulation_steps: 1")

        sources = collect_sources(cfg.data.sources)
        self.images = TrainImageDataset(sources, random_flip=cfg.data.random_flip, cache_images=cfg.data.cache_images)
        self._image_sizes: list[tuple[int, int]] | None = None
        logger.info("training data: %d images from %s", len(sources), list(cfg.data.sources))
        self.skipped = SkippedImages(len(sources), cfg.data.max_skipped_fraction,
                                     self.output_dir / "skipped.jsonl" if self.dist.is_main else None)

        self.strategy = make_strategy(run.parallel, self.dist, self.device)
        if self.strategy.sharded and cfg.loss.disc_adaptive_weight:
            raise ValueError("loss.disc_adaptive_weight needs the decoder's full last-layer gradient, which FSDP "
                             "shards; use run.parallel: ddp or turn the adaptive weight off")
        self.model = build_model(cfg).to(self.device).train()
        if run.activation_checkpointing:
            count = apply_activation_checkpointing(self.model)
            logger.info("activation checkpointing: %d blocks recompute their activations in backward", count)
        self.loss_fn = DualViTokLoss(cfg.loss).to(self.device).train()
        self.strategy.prepare(self.model)  # FSDP shards here: before the optimizer (new parameters)
        self.fsdp = self.strategy.sharded  # kept for callers of the old attribute
        opt = cfg.optimizer
        gen_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = _make_optimizer(gen_params, opt, opt.lr)
        self.opt_d = _make_optimizer(self.loss_fn.discriminator.parameters(), opt, opt.disc_lr or opt.lr)
        self.sched_g = _make_scheduler(self.opt_g, opt)
        self.sched_d = _make_scheduler(self.opt_d, opt)
        self.ema = ModelEMA(self.model, run.ema_decay) if run.ema_decay else None  # sharded like the model
        self.ddp_model: nn.Module = self.strategy.wrap(self.model)
        self.ddp_disc: nn.Module = self.strategy.wrap(self.loss_fn.discriminator)

        self.step = 0
        self.data_state = {"stage": 0, "epoch": 0, "batch": 0}
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.checkpoints = CheckpointFolder(self.checkpoint_dir, run.keep_checkpoints)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints.clean_temporary()
            if self.overwrite:
                self._clear_outputs()
        self.strategy.barrier()
        self._last_saved_step = -1
        if self.resume:
            self._restore()
            self._last_saved_step = self.step
        elif self.checkpoints.latest() is not None:  # checked on every rank: all raise together
            raise ValueError(f"{self.output_dir} already holds checkpoints; pass --resume to continue the run, "
                             "--overwrite to start over, or choose a new --output folder")
        if not self.resume and self.dist.is_main:
            self.metrics_path.unlink(missing_ok=True)
            (self.output_dir / "skipped.jsonl").unlink(missing_ok=True)
            self._write_config()
        self.tracker = None
        if self.dist.is_main and run.tracker == "tensorboard":
            self.tracker = _TensorBoard(self.output_dir / "tensorboard", purge_step=self.step + 1)
            self._closer.callback(self.tracker.close)
        self._setup_done = True

    def _clear_outputs(self) -> None:
        """``--overwrite``: remove what a run writes (nothing else in the folder is touched)."""
        for name in ("checkpoints", "samples", "final", "tensorboard"):
            shutil.rmtree(self.output_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "skipped.jsonl", "loss_curve.png", "train_config.yaml", "train_config.json"):
            (self.output_dir / name).unlink(missing_ok=True)

    def _write_config(self) -> None:
        try:
            import yaml

            text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
            name = "train_config.yaml"
        except ImportError:  # pragma: no cover
            text, name = json.dumps(self.config.to_dict(), indent=2), "train_config.json"
        with atomic_write(self.output_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------------------------------ data
    def _stage_index(self, step: int) -> int:
        for i, stage in enumerate(self.config.data.stages):
            if stage.until_step is None or step < stage.until_step:
                return i
        return len(self.config.data.stages) - 1

    def _stage_batches(self, stage_index: int, epoch: int) -> list[list[SampleSpec]]:
        stage = self.config.data.stages[stage_index]
        per_rank = (stage.batch_size or self.config.data.batch_size) * self.accumulation  # per optimizer step
        global_batch = per_rank * self.dist.world_size
        if stage.mode == "fixed":
            sizes, buckets = [(stage.resolution, stage.resolution)], None
        else:
            if self._image_sizes is None:
                self._image_sizes = self.images.image_sizes()
                self.skipped.update(self.images.unreadable_items())
            sizes = bucket_sizes(stage.max_pixels, stage.min_pixels)
            buckets = assign_buckets(self._image_sizes)
        batches = epoch_batches(len(self.images), global_batch, self.config.run.seed, stage_index, epoch, sizes,
                                buckets)
        if not batches:
            raise ValueError(f"stage {stage_index} yields no batch of {global_batch} images; lower the batch size")
        r = self.dist.rank
        return [b[r * per_rank:(r + 1) * per_rank] for b in batches]  # this rank's slice of each global batch

    def _batches(self):
        """Yield ``(images [B,3,H,W], skipped, data_state_after)`` forever, starting at ``self.data_state``;
        ``skipped`` lists the unreadable images replaced in this batch as ``(index, name, reason)``."""
        state = dict(self.data_state)
        while True:
            if self._stage_index(self.step) != state["stage"]:
                state = {"stage": self._stage_index(self.step), "epoch": 0, "batch": 0}
            stage = state["stage"]
            self.images.crop_scale = tuple(self.config.data.stages[stage].crop_scale)
            batches = self._stage_batches(stage, state["epoch"])
            remaining = batches[state["batch"]:]
            loader = DataLoader(BatchDataset(self.images, remaining, report_skipped=True), batch_size=None,
                                shuffle=False, num_workers=self.config.data.num_workers,
                                # own generator: creating a loader must not consume the global RNG (exact resume)
                                generator=torch.Generator().manual_seed(self.config.run.seed))
            for offset, (images, skipped) in enumerate(loader):
                position = state["batch"] + offset + 1
                after = {"stage": stage, "epoch": state["epoch"], "batch": position}
                if position >= len(batches):
                    after = {"stage": stage, "epoch": state["epoch"] + 1, "batch": 0}
                yield images, skipped, after
                if self._stage_index(self.step) != stage:
                    break  # the stage changed: restart at its first batch
            new_stage = self._stage_index(self.step)
            if new_stage != stage:
                state = {"stage": new_stage, "epoch": 0, "batch": 0}
            else:
                state = {"stage": stage, "epoch": state["epoch"] + 1, "batch": 0}

    def _account_skipped(self, skipped: list) -> None:
        self.skipped.update_all_ranks(skipped, self.dist)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _training_state(self) -> dict[str, Any]:
        """Everything a resume needs except the model, its optimizer and the EMA (numbers, strings, small dicts)."""
        return {
            "format": "dualvitok-train-checkpoint/1",
            "parallel": self.strategy.name,
            "step": self.step,
            "model_config": self.model.config.to_dict(),
            "discriminator": self.loss_fn.discriminator.state_dict(),
            "optimizer_disc": self.opt_d.state_dict(),
            "scheduler": self.sched_g.state_dict(),
            "scheduler_disc": self.sched_d.state_dict(),
            "rng": capture_rng_state(),
            "data": dict(self.data_state),
            "skipped": self.skipped.state_dict(),
            "train_config": self.config.to_dict(),
            "world_size": self.dist.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, with full tensors (with FSDP a collective, complete on rank 0 only)."""
        model_state, optimizer_state = self.strategy.model_state(self.model, self.opt_g)
        ema = None
        if self.ema is not None:
            _, shadow = self.strategy.full_state(self.model, self.ema) if self.strategy.sharded else (None, None)
            ema = self.ema.state_dict() if shadow is None else {"decay": self.ema.decay, "shadow": shadow}
        return dict(self._training_state(), model=model_state, optimizer=optimizer_state, ema=ema)

    def save(self) -> Path | None:
        """Write ``checkpoints/checkpoint-<step>.pt`` (a sharded folder under multi-process FSDP), prune old ones.

        Every process calls this; the path is returned on rank 0. Writes go through ``atomic_write``: a full disk
        raises an ``OSError`` naming the file, and the previous checkpoints stay loadable.
        """
        self._last_saved_step = self.step
        return self.strategy.save(self.checkpoints, self.step, self._training_state(), self.model, self.opt_g,
                                  self.ema)

    def _restore(self) -> None:
        try:
            path, state = self.strategy.load(self.checkpoints, self.model, self.opt_g, self.ema)
        except FileNotFoundError:
            raise FileNotFoundError(f"--resume: no checkpoint-*.pt in {self.output_dir}/checkpoints") from None
        if state.get("world_size", 1) != self.dist.world_size:
            logger.warning("resuming a %s-process run with %s processes: the data order changes",
                           state.get("world_size"), self.dist.world_size)
        saved_accumulation = (state.get("train_config") or {}).get("optimizer", {}).get("accumulation_steps", 1)
        if saved_accumulation != self.accumulation:
            logger.warning("resuming a run of accumulation_steps %s with %s: the data order changes",
                           saved_accumulation, self.accumulation)
        self.loss_fn.discriminator.load_state_dict(state["discriminator"])
        self.opt_d.load_state_dict(state["optimizer_disc"])
        self.sched_g.load_state_dict(state["scheduler"])
        self.sched_d.load_state_dict(state["scheduler_disc"])
        self.step = int(state["step"])
        self.data_state = dict(state["data"])
        self.skipped.load_state_dict(state.get("skipped"))
        restore_rng_state(state["rng"])
        if self.dist.is_main:  # drop records written after the checkpoint (and a torn last line)
            truncate_metrics(self.metrics_path, self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------ one step
    def _autocast(self):
        if self.config.run.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, images: Tensor) -> dict[str, float]:
        """One generator update and (from ``disc_start`` on) one discriminator update on ``images [B,3,H,W]``.

        With ``optimizer.accumulation_steps = N`` the batch is split into N micro-batches whose gradients are
        summed (each loss scaled by 1/N) before the optimizer steps; the logged values are the micro-batch means.
        """
        cfg = self.config
        global_step = self.step + 1
        images = images.to(self.device, non_blocking=True)
        chunks = images.chunk(self.accumulation) if self.accumulation > 1 else (images,)
        scale = 1.0 / len(chunks)
        disc = self.loss_fn.discriminator
        disc.requires_grad_(False)  # the generator step must not touch D's gradients
        self.opt_g.zero_grad(set_to_none=True)
        logs: list[dict[str, float]] = []
        reconstructions = []
        for i, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else self.strategy.no_sync(self.ddp_model)
            with sync:
                with self._autocast():
                    output = self.ddp_model(chunk, token_noise=True)  # the config's token noise (pixel_drop_rate)
                    last_layer = self.model.pixel_decoder.conv_out.weight if cfg.loss.disc_adaptive_weight else None
                    gen = self.loss_fn.generator_loss(chunk, output, global_step, last_layer)
                (gen.loss * scale if len(chunks) > 1 else gen.loss).backward()
            logs.append(gen.log_dict())
            reconstructions.append(output.reconstruction.detach())
        record = _mean_records(logs)
        if cfg.optimizer.grad_clip:
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   cfg.optimizer.grad_clip)
            record["grad_norm"] = self.strategy.scalar(gnorm)
        self.opt_g.step()
        record["lr"] = self.sched_g.get_last_lr()[0]
        self.sched_g.step()
        disc.requires_grad_(True)
        if self.loss_fn.disc_factor(global_step) > 0 and cfg.loss.disc_weight > 0:
            self.opt_d.zero_grad(set_to_none=True)
            d_logs = []
            for i, (chunk, recon) in enumerate(zip(chunks, reconstructions, strict=True)):
                sync = contextlib.nullcontext() if i == len(chunks) - 1 else self.strategy.no_sync(self.ddp_disc)
                with sync:
                    with self._autocast():
                        d_out = self.loss_fn.discriminator_loss(chunk, recon, global_step, discriminator=self.ddp_disc)
                    (d_out.loss * scale if len(chunks) > 1 else d_out.loss).backward()
                d_logs.append(d_out.log_dict())
            if cfg.optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.optimizer.grad_clip)
            self.opt_d.step()
            self.sched_d.step()
            record.update(_mean_records(d_logs))
        if self.ema is not None:
            self.ema.update(self.model)
        if self.dist.enabled:  # log the mean over processes
            keys = sorted(k for k in record if k not in ("lr", "disc_factor"))
            values = all_reduce_mean(torch.tensor([record[k] for k in keys], dtype=torch.float64), self.dist)
            record.update({k: float(v) for k, v in zip(keys, values, strict=True)})
        self.step = global_step
        return record

    # ------------------------------------------------------------------------------------------ outputs
    def _append_metrics(self, record: dict) -> None:
        append_metrics(self.metrics_path, record)

    def _read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    @torch.no_grad()
    def save_samples(self, images: Tensor) -> Path:
        """Reconstruct the first images of a batch in eval mode; save inputs over reconstructions as a PNG."""
        was_training = self.model.training
        self.model.eval()
        rng = capture_rng_state()  # sampling must not disturb the training random stream
        try:
            x = images[: self.config.run.num_samples].to(self.device)
            recon = self.model(x).reconstruction  # with FSDP every rank runs this (collectives); rank 0 writes
            path = self.output_dir / "samples" / f"step-{self.step:08d}.png"
            if self.dist.is_main:
                save_image_grid([x, recon], path)
        finally:
            restore_rng_state(rng)
            self.model.train(was_training)
        return path

    def save_final(self) -> Path | None:
        """``final/`` (``save_pretrained``; EMA weights when EMA is on), written by rank 0.

        With FSDP every process must call this (the weights are gathered); the others return ``None``.
        """
        folder = self.output_dir / "final"
        weights, shadow = self.strategy.full_state(self.model, self.ema)
        if not self.dist.is_main:
            return None
        model = self.model
        if weights is not None:
            model = build_model(self.config)
            model.load_state_dict(weights)
            if shadow is not None:
                self.ema.copy_to(model, shadow)
        model.save_pretrained(folder)
        return folder

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run until ``max_steps`` optimizer steps; returns a :class:`TrainResult`."""
        try:
            if not self._setup_done:
                self.setup()
            return self._train()
        finally:
            self.close()

    def _train(self) -> TrainResult:
        run = self.config.run
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict | None = None
        start = time.time()
        batches = self._batches()
        while self.step < self.max_steps:
            images, skipped, data_after = next(batches)
            self._account_skipped(skipped)
            record = self.train_step(images)
            self.data_state = data_after
            record = {"step": self.step, **record, "height": images.shape[-2], "width": images.shape[-1],
                      "batch": images.shape[0] * self.dist.world_size, "elapsed_s": round(time.time() - start, 3)}
            if self.skipped.seen:
                record["skipped_images"] = len(self.skipped.seen)
            last = record
            if not math.isfinite(record["loss"]):  # the logged loss is the all-reduced mean: every rank stops
                raise FloatingPointError(f"loss is {record['loss']} at step {self.step}; lower the learning rate")
            if self.dist.is_main:
                self._append_metrics(record)
                if self.tracker is not None:
                    self.tracker.log(record, self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", rec=f"{record['rec_loss']:.4f}")
                if run.log_every and self.step % run.log_every == 0 and bar is None:
                    logger.info("step %d loss %.4f rec %.4f", self.step, record["loss"], record["rec_loss"])
                if run.plot_every and self.step % run.plot_every == 0:
                    plot_loss_curve(self._read_metrics(), self.output_dir / "loss_curve.png")
            if run.sample_every and self.step % run.sample_every == 0 and (self.dist.is_main or self.strategy.sharded):
                self.save_samples(images)
            if run.checkpoint_every and self.step % run.checkpoint_every == 0 and self.step < self.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        if self._last_saved_step != self.step:  # a local decision: every rank must reach save()'s barrier
            self.save()
        final = None
        if self.dist.is_main:
            plot_loss_curve(self._read_metrics(), self.output_dir / "loss_curve.png")
        if self.dist.is_main or self.strategy.sharded:
            final = self.save_final()
        return TrainResult(self.step, None if last is None else last["loss"], self.output_dir, final)


def _mean_records(records: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of the micro-batch log dicts (the dict itself for one micro-batch: bitwise the same)."""
    if len(records) == 1:
        return dict(records[0])
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


class _TensorBoard:
    """``metrics.jsonl`` records mirrored to TensorBoard (``torch.utils.tensorboard.SummaryWriter``, extra
    ``tensorboard``); events after ``purge_step`` from an interrupted run are dropped on resume."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from .._utils.deps import require

        require("tensorboard", "tensorboard", "run.tracker: tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log(self, record: dict, step: int) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
