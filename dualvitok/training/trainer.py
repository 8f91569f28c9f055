"""The DualViTok trainer: generator / discriminator updates, DDP or FSDP, progressive resolution, exact resume.

Follows the ILLUME+ training loop (``train_dualvitok.py``; ``../shared/reference/dualvitok.md`` section 6): Adam with
betas (0.9, 0.95), separate gradient clipping of generator and discriminator, bf16 autocast, constant LR, the loss's
``global_step`` = optimizer step + 1, and one generator then one discriminator update per iteration. Additions: EMA,
linear warm-up, progressive resolution stages with aspect-ratio buckets, ``metrics.jsonl`` (one record per optimizer
step), a loss-curve PNG, periodic reconstructions, and checkpoints that hold everything needed to continue bit for bit
on CPU (model, discriminator, both optimizers and schedulers, EMA, step, RNG states, data position), written atomically.
Own code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._utils import atomic_write
from .._utils.distributed import DistInfo, all_reduce_mean, init_distributed
from ..configuration import DualViTokConfig
from ..model import DualViTok
from ..registry import get_config
from .checkpoint import capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig
from .data import BatchDataset, TrainImageDataset, collect_sources
from .dualvitok_loss import DualViTokLoss
from .ema import ModelEMA
from .fsdp import full_model_state, full_optimizer_state, full_tensor, load_full_state, shard_like, shard_model
from .plotting import plot_loss_curve, save_image_grid
from .samplers import SampleSpec, assign_buckets, bucket_sizes, epoch_batches

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
    """The model of ``config.model``: registered name (+ overrides), explicit config, and optional ``init_from``."""
    spec = config.model
    if spec.init_from:
        model = DualViTok.from_pretrained(spec.init_from)
        for key, value in spec.overrides.items():
            setattr(model.config, key, value)
        return model
    if spec.config is not None:
        model_config = DualViTokConfig.from_dict(spec.config)
    elif spec.name:
        model_config = get_config(spec.name)
    else:
        raise ValueError("model: give a registered 'name', a 'config' dict, or 'init_from'")
    data = model_config.to_dict()

    def merge(into: dict, updates: dict, path: str) -> None:  # nested dicts merge key by key
        for key, value in updates.items():
            if key not in into:
                raise ValueError(f"model.overrides: unknown DualViTok config field {path}{key!r}")
            if isinstance(value, dict) and isinstance(into[key], dict):
                merge(into[key], value, f"{path}{key}.")
            else:
                into[key] = value

    merge(data, spec.overrides, "")
    return DualViTok(DualViTokConfig.from_dict(data))


def _make_optimizer(params, cfg, lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.type == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps if cfg.scheduler == "warmup" else 0

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Trains a DualViTok from a :class:`TrainConfig`.

    Args:
        config: the training configuration.
        output_dir: run folder (``metrics.jsonl``, ``checkpoints/``, ``samples/``, ``loss_curve.png``, ``final/``).
        resume: continue from the latest checkpoint in ``output_dir`` (error if none).
        max_steps: overrides ``config.run.max_steps``.
        progress: show a tqdm progress bar (main process only).

    Under ``torchrun`` each process trains on its slice of every global batch (gloo on CPU, nccl on GPU), with the
    model replicated (``run.parallel: ddp``) or sharded (``fsdp``, :mod:`dualvitok.training.fsdp`).
    """

    def __init__(self, config: TrainConfig, output_dir: str | os.PathLike, resume: bool = False,
                 max_steps: int | None = None, progress: bool = True):
        self.config = config
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.max_steps = int(max_steps if max_steps is not None else config.run.max_steps)
        self.progress = progress
        self._setup_done = False

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build device, process group, data, model, loss, optimizers; restore a checkpoint when resuming."""
        cfg = self.config
        run = cfg.run
        device_name = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist: DistInfo = init_distributed(torch.device(device_name).type)
        cuda = device_name == "cuda"
        self.device = torch.device(device_name, self.dist.local_rank) if cuda else torch.device(device_name)
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)  # same init on every rank (DDP also broadcasts rank 0's parameters)

        sources = collect_sources(cfg.data.sources)
        self.images = TrainImageDataset(sources, random_flip=cfg.data.random_flip, cache_images=cfg.data.cache_images)
        self._image_sizes: list[tuple[int, int]] | None = None
        logger.info("training data: %d images from %s", len(sources), list(cfg.data.sources))

        self.model = build_model(cfg).to(self.device).train()
        self.loss_fn = DualViTokLoss(cfg.loss).to(self.device).train()
        self.fsdp = self.dist.enabled and run.parallel == "fsdp"  # sharded; checkpoints store states by name
        if run.parallel == "fsdp" and not self.dist.enabled:
            logger.info("run.parallel: fsdp needs several processes (torchrun); training one unsharded model")
        if self.fsdp:
            if cfg.loss.disc_adaptive_weight:
                raise ValueError("loss.disc_adaptive_weight needs the decoder's full last-layer gradient, which FSDP "
                                 "shards; use run.parallel: ddp or turn the adaptive weight off")
            shard_model(self.model, self.device.type, self.dist.world_size)  # before the optimizer: new parameters
            local = sum(p.to_local().numel() for p in self.model.parameters())
            total = sum(p.numel() for p in self.model.parameters())
            logger.info("FSDP: rank %d holds %d of %d parameter elements", self.dist.rank, local, total)
        opt = cfg.optimizer
        gen_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = _make_optimizer(gen_params, opt, opt.lr)
        self.opt_d = _make_optimizer(self.loss_fn.discriminator.parameters(), opt, opt.disc_lr or opt.lr)
        self.sched_g = _make_scheduler(self.opt_g, opt)
        self.sched_d = _make_scheduler(self.opt_d, opt)
        self.ema = ModelEMA(self.model, run.ema_decay) if run.ema_decay else None  # sharded like the model

        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model: nn.Module = self.model if self.fsdp else DDP(self.model, device_ids=ids)
            self.ddp_disc: nn.Module = DDP(self.loss_fn.discriminator, device_ids=ids)
        else:
            self.ddp_model, self.ddp_disc = self.model, self.loss_fn.discriminator

        self.step = 0
        self.data_state = {"stage": 0, "epoch": 0, "batch": 0}
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._last_saved_step = -1
        if self.resume:
            self._restore()
            self._last_saved_step = self.step
        else:
            if latest_checkpoint(self.output_dir) is not None:  # checked on every rank: all raise together
                raise ValueError(f"{self.output_dir} already holds checkpoints; pass --resume to continue the run or "
                                 "choose a new --output folder")
        if not self.resume and self.dist.is_main:
            self.metrics_path.unlink(missing_ok=True)
            self._write_config()
        self._setup_done = True

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
        per_rank = stage.batch_size or self.config.data.batch_size
        global_batch = per_rank * self.dist.world_size
        if stage.mode == "fixed":
            sizes, buckets = [(stage.resolution, stage.resolution)], None
        else:
            if self._image_sizes is None:
                self._image_sizes = self.images.image_sizes()
            sizes = bucket_sizes(stage.max_pixels, stage.min_pixels)
            buckets = assign_buckets(self._image_sizes)
        batches = epoch_batches(len(self.images), global_batch, self.config.run.seed, stage_index, epoch, sizes,
                                buckets)
        if not batches:
            raise ValueError(f"stage {stage_index} yields no batch of {global_batch} images; lower the batch size")
        r = self.dist.rank
        return [b[r * per_rank:(r + 1) * per_rank] for b in batches]  # this rank's slice of each global batch

    def _batches(self):
        """Yield ``(images [B,3,H,W], data_state_after)`` forever, starting at ``self.data_state``."""
        state = dict(self.data_state)
        while True:
            if self._stage_index(self.step) != state["stage"]:
                state = {"stage": self._stage_index(self.step), "epoch": 0, "batch": 0}
            stage = state["stage"]
            self.images.crop_scale = tuple(self.config.data.stages[stage].crop_scale)
            batches = self._stage_batches(stage, state["epoch"])
            remaining = batches[state["batch"]:]
            loader = DataLoader(BatchDataset(self.images, remaining), batch_size=None, shuffle=False,
                                num_workers=self.config.data.num_workers,
                                # own generator: creating a loader must not consume the global RNG (exact resume)
                                generator=torch.Generator().manual_seed(self.config.run.seed))
            for offset, images in enumerate(loader):
                position = state["batch"] + offset + 1
                after = {"stage": stage, "epoch": state["epoch"], "batch": position}
                if position >= len(batches):
                    after = {"stage": stage, "epoch": state["epoch"] + 1, "batch": 0}
                yield images, after
                if self._stage_index(self.step) != stage:
                    break  # the stage changed: restart at its first batch
            new_stage = self._stage_index(self.step)
            if new_stage != stage:
                state = {"stage": new_stage, "epoch": 0, "batch": 0}
            else:
                state = {"stage": stage, "epoch": state["epoch"] + 1, "batch": 0}

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (tensors, optimizer states, numbers, strings).

        With FSDP this is a collective (every process must call it) and the tensors are complete on rank 0 only.
        """
        if self.config.run.parallel == "fsdp":  # also unsharded (one process): the same checkpoint format
            model_state, optimizer_state = full_model_state(self.model), full_optimizer_state(self.model, self.opt_g)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.opt_g.state_dict()
        return {
            "format": "dualvitok-train-checkpoint/1",
            "parallel": self.config.run.parallel,
            "step": self.step,
            "model": model_state,
            "model_config": self.model.config.to_dict(),
            "discriminator": self.loss_fn.discriminator.state_dict(),
            "optimizer": optimizer_state,
            "optimizer_disc": self.opt_d.state_dict(),
            "scheduler": self.sched_g.state_dict(),
            "scheduler_disc": self.sched_d.state_dict(),
            "ema": self._ema_state(),
            "rng": capture_rng_state(),
            "data": dict(self.data_state),
            "train_config": self.config.to_dict(),
            "world_size": self.dist.world_size,
        }

    def _ema_state(self) -> dict | None:
        """The EMA state with full tensors (a collective with FSDP, whose EMA shadows are sharded)."""
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        if self.fsdp:  # gathered one tensor at a time, kept on rank 0 only
            shadow = {}
            for k, v in state["shadow"].items():
                full = full_tensor(v)
                if self.dist.is_main:
                    shadow[k] = full.cpu()
            state["shadow"] = shadow
        return state

    def save(self) -> Path | None:
        """Write ``checkpoints/checkpoint-<step>.pt`` (main process) and prune old ones."""
        path = self.checkpoint_dir / f"checkpoint-{self.step:08d}.pt"
        self._last_saved_step = self.step
        state = self.state_dict() if self.dist.is_main or self.fsdp else None  # FSDP: every rank gathers
        if self.dist.is_main:
            save_checkpoint(path, state)
            keep = max(1, self.config.run.keep_checkpoints)
            old = sorted(self.checkpoint_dir.glob("checkpoint-*.pt"))[:-keep]
            for p in old:
                p.unlink(missing_ok=True)
            logger.info("saved %s", path)
        if self.dist.enabled:
            torch.distributed.barrier()
        return path if self.dist.is_main else None

    def _restore(self) -> None:
        path = latest_checkpoint(self.output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint-*.pt in {self.output_dir}/checkpoints")
        state = load_checkpoint(path, map_location="cpu")
        if state.get("world_size", 1) != self.dist.world_size:
            logger.warning("resuming a %s-process run with %s processes: the data order changes",
                           state.get("world_size"), self.dist.world_size)
        saved_mode, mode = state.get("parallel", "ddp"), self.config.run.parallel
        if saved_mode != mode:
            raise ValueError(f"{path} was written with run.parallel: {saved_mode}; resume it with run.parallel: "
                             f"{saved_mode} (the optimizer state is stored by parameter name under fsdp, by index "
                             "under ddp)")
        if mode == "fsdp":
            load_full_state(self.model, self.opt_g, state["model"], state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.opt_g.load_state_dict(state["optimizer"])
        self.loss_fn.discriminator.load_state_dict(state["discriminator"])
        self.opt_d.load_state_dict(state["optimizer_disc"])
        self.sched_g.load_state_dict(state["scheduler"])
        self.sched_d.load_state_dict(state["scheduler_disc"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError("the checkpoint has no EMA but run.ema_decay is set")
            ema_state = state["ema"]
            if self.fsdp:  # keep this process's shard of each full EMA tensor
                ema_state = dict(ema_state, shadow={k: shard_like(v, self.ema.shadow[k])
                                                    for k, v in ema_state["shadow"].items() if k in self.ema.shadow})
            self.ema.load_state_dict(ema_state)
        self.step = int(state["step"])
        self.data_state = dict(state["data"])
        restore_rng_state(state["rng"])
        if self.dist.is_main and self.metrics_path.is_file():  # drop records written after the checkpoint
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
            with atomic_write(self.metrics_path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------ one step
    def _autocast(self):
        if self.config.run.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, images: Tensor) -> dict[str, float]:
        """One generator update and (from ``disc_start`` on) one discriminator update on ``images [B,3,H,W]``."""
        cfg = self.config
        global_step = self.step + 1
        images = images.to(self.device, non_blocking=True)
        disc = self.loss_fn.discriminator
        disc.requires_grad_(False)  # the generator step must not touch D's gradients
        with self._autocast():
            output = self.ddp_model(images, token_noise=True)  # the config's token noise (pixel_drop_rate)
            last_layer = self.model.pixel_decoder.conv_out.weight if cfg.loss.disc_adaptive_weight else None
            gen = self.loss_fn.generator_loss(images, output, global_step, last_layer)
        self.opt_g.zero_grad(set_to_none=True)
        gen.loss.backward()
        record = gen.log_dict()
        if cfg.optimizer.grad_clip:
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   cfg.optimizer.grad_clip)
            record["grad_norm"] = float(full_tensor(gnorm))
        self.opt_g.step()
        record["lr"] = self.sched_g.get_last_lr()[0]
        self.sched_g.step()
        disc.requires_grad_(True)
        if self.loss_fn.disc_factor(global_step) > 0 and cfg.loss.disc_weight > 0:
            with self._autocast():
                d_out = self.loss_fn.discriminator_loss(images, output.reconstruction.detach(), global_step,
                                                        discriminator=self.ddp_disc)
            self.opt_d.zero_grad(set_to_none=True)
            d_out.loss.backward()
            if cfg.optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.optimizer.grad_clip)
            self.opt_d.step()
            self.sched_d.step()
            record.update(d_out.log_dict())
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
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(ln) for ln in self.metrics_path.read_text(encoding="utf-8").splitlines() if ln.strip()]

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
        if self.fsdp:
            weights, ema = full_model_state(self.model), self._ema_state()
        elif self.ema is not None:
            weights, ema = self.model.state_dict(), self.ema.state_dict()
        else:
            weights, ema = None, None
        if not self.dist.is_main:
            return None
        model = self.model
        if weights is not None:
            model = build_model(self.config)
            model.load_state_dict(weights)
            if ema is not None:
                self.ema.copy_to(model, ema["shadow"])
        model.save_pretrained(folder)
        return folder

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run until ``max_steps`` optimizer steps; returns a :class:`TrainResult`."""
        if not self._setup_done:
            self.setup()
        run = self.config.run
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        last: dict | None = None
        start = time.time()
        batches = self._batches()
        while self.step < self.max_steps:
            images, data_after = next(batches)
            record = self.train_step(images)
            self.data_state = data_after
            record = {"step": self.step, **record, "height": images.shape[-2], "width": images.shape[-1],
                      "batch": images.shape[0] * self.dist.world_size, "elapsed_s": round(time.time() - start, 3)}
            last = record
            if not math.isfinite(record["loss"]):  # the logged loss is the all-reduced mean: every rank stops
                raise FloatingPointError(f"loss is {record['loss']} at step {self.step}; lower the learning rate")
            if self.dist.is_main:
                self._append_metrics(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", rec=f"{record['rec_loss']:.4f}")
                if run.log_every and self.step % run.log_every == 0 and bar is None:
                    logger.info("step %d loss %.4f rec %.4f", self.step, record["loss"], record["rec_loss"])
                if run.plot_every and self.step % run.plot_every == 0:
                    plot_loss_curve(self._read_metrics(), self.output_dir / "loss_curve.png")
            if run.sample_every and self.step % run.sample_every == 0 and (self.dist.is_main or self.fsdp):
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
        if self.dist.is_main or self.fsdp:
            final = self.save_final()
        return TrainResult(self.step, None if last is None else last["loss"], self.output_dir, final)
