"""Refiner training loop: frozen tokenizer and VAE, trained UNet, aspect-ratio buckets, exact resume, torchrun.

The ILLUME+ refiner training code is not released. It shares the run toolkit of the tokenizer trainer
(:mod:`dualvitok.training.run`): warm-up schedule, seeding, ``checkpoints/checkpoint-<step>.pt`` files written
atomically and rotated (a corrupt newest one falls back to the previous with a warning), ``metrics.jsonl``, the
output-folder lock, skipped-image accounting with a cap. Checkpoints hold the UNet, its EMA, optimizer, LR schedule,
data position and RNG states, so a run stopped after any checkpoint and resumed reaches bit-identical weights on the
same hardware. Every random draw of the loss comes from a generator seeded by ``(seed, step, rank)``, and the data
order is a function of ``(seed, epoch)``; the data loader never touches the global RNG.

Under ``torchrun`` the UNet is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl on GPU) and each process
takes its slice of every global batch of ``batch_size x world_size`` images (incomplete global batches are dropped so
that every process steps together). ``gradient_checkpointing`` calls diffusers' ``unet.enable_gradient_checkpointing``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from .._utils.distributed import DistInfo, all_reduce_mean, init_distributed
from .._utils.locking import output_lock
from ..devices import resolve_device
from ..training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from ..training.ema import ModelEMA
from ..training.run import (
    CheckpointFolder,
    SkippedImages,
    append_metrics,
    seed_everything,
    truncate_metrics,
    warmup_scheduler,
)
from .buckets import BucketImageDataset, bucket_batches, list_images
from .pipeline import RefinerPipeline
from .training import RefinerLossConfig, refiner_loss, training_noise_scheduler

logger = logging.getLogger(__name__)


@dataclass
class RefinerTrainConfig:
    """Settings of :class:`RefinerTrainer` (the ``dualvitok train-refiner`` options).

    Attributes:
        data: folder of training images (any sizes; bucketed by aspect ratio).
        output_dir: checkpoints go to ``output_dir/checkpoints``, the final pipeline to ``output_dir/refiner``.
        tokenizer: DualViTok spec for :func:`dualvitok.loading.load_model` (folder, Hub id, ``"demo"``).
        refiner: a refiner folder or Hub id to fine-tune; ``None`` builds ``architecture`` from scratch.
        architecture: ``"sdxl"`` (released layout) or ``"tiny"`` (tests) when ``refiner`` is None.
        resolutions: supported ``(width, height)`` output sizes (= buckets); ``None`` keeps the refiner's.
        steps, batch_size, learning_rate, weight_decay, warmup_steps, grad_clip: optimisation (AdamW); ``batch_size``
            is per process.
        checkpoint_every, keep_checkpoints: checkpoint period in steps (0: only at the end) and how many to keep.
        seed: seeds the initialisation, the data order and the loss's random draws.
        device: ``"auto"`` (cuda > mps > npu > cpu) or a device name.
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast).
        ema_decay: keep an EMA of the UNet (e.g. 0.999); the saved pipeline then holds the EMA weights.
        gradient_checkpointing: recompute UNet activations in backward (diffusers), for less memory.
        max_skipped_fraction: unreadable images are skipped; past this fraction the run stops.
        loss: token perturbation and condition dropout (:class:`RefinerLossConfig`).
    """

    data: str = ""
    output_dir: str = "refiner-run"
    tokenizer: str | None = "demo"
    refiner: str | None = None
    architecture: str = "sdxl"
    resolutions: list[list[int]] | None = None
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"
    log_every: int = 10
    ema_decay: float | None = None
    gradient_checkpointing: bool = False
    max_skipped_fraction: float = 0.1
    loss: RefinerLossConfig = field(default_factory=RefinerLossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = RefinerLossConfig(**self.loss)
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "num_workers", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")


class RefinerTrainResult(NamedTuple):
    """``losses`` of the steps run in this call, the final ``step`` and the saved ``pipeline_dir``."""

    losses: list[float]
    step: int
    pipeline_dir: Path | None


class _Reporting(Dataset):
    """Items of a :class:`BucketImageDataset` with the unreadable images they replaced (for counting)."""

    def __init__(self, dataset: BucketImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if hasattr(self.dataset, "load"):
            return self.dataset.load(i)
        return self.dataset[i], []


def _collate(items):
    return torch.stack([x for x, _ in items]), [s for _, skipped in items for s in skipped]


class _SliceSampler(torch.utils.data.Sampler):
    """This process's slice of each global batch."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RefinerTrainer:
    """Trains a refiner UNet on an image folder (one process or under ``torchrun``).

    Args:
        config: :class:`RefinerTrainConfig`.
        refiner: an existing pipeline to train (its tokenizer is used); otherwise built from ``config``.
        dataset: a :class:`BucketImageDataset`; otherwise built from ``config.data``.
        progress: show a progress bar (main process only).
    """

    def __init__(self, config: RefinerTrainConfig, refiner: RefinerPipeline | None = None,
                 dataset: BucketImageDataset | None = None, progress: bool = True):
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(config.seed)
        if refiner is None:
            refiner = self._build_refiner(config)
        elif config.resolutions is not None:
            refiner.resolutions = tuple(tuple(r) for r in config.resolutions)
        self.refiner = refiner.to(self.device)
        self.dataset = dataset or BucketImageDataset(list_images(config.data), refiner.resolutions)
        for module in (refiner.tokenizer, refiner.vae):
            module.eval().requires_grad_(False)
        refiner.unet.train().requires_grad_(True)
        if config.gradient_checkpointing:
            refiner.unet.enable_gradient_checkpointing()
        self.noise_scheduler = training_noise_scheduler(refiner)
        self.optimizer = torch.optim.AdamW(refiner.unet.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.lr_scheduler = warmup_scheduler(self.optimizer, config.warmup_steps)
        self.ema = ModelEMA(refiner.unet, config.ema_decay) if config.ema_decay else None
        self.ddp_unet = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_unet = _DDPUNet(refiner.unet, device_ids=ids)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.checkpoints = CheckpointFolder(self.checkpoint_dir, config.keep_checkpoints)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.skipped = SkippedImages(len(self.dataset), config.max_skipped_fraction,
                                     self.output_dir / "skipped.jsonl" if self.dist.is_main else None)

    def _build_refiner(self, config: RefinerTrainConfig) -> RefinerPipeline:
        from ..loading import load_model

        tokenizer = load_model(config.tokenizer)
        if config.refiner:
            return RefinerPipeline.from_pretrained(config.refiner, tokenizer, resolutions=config.resolutions)
        return RefinerPipeline.from_architecture(tokenizer, config.architecture, config.resolutions)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, EMA, optimizer, LR schedule, data position, RNG states."""
        return {
            "unet": {k: v.detach().clone() for k, v in self.refiner.unet.state_dict().items()},
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": capture_rng_state(),
            "skipped": self.skipped.state_dict(),
            "world_size": self.dist.world_size,
            "config": asdict(self.config),
            "kind": "dualvitok-refiner",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "dualvitok-refiner":
            raise ValueError("not a refiner training checkpoint (written by dualvitok train-refiner)")
        self.refiner.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            if not state.get("ema"):
                raise ValueError("the checkpoint has no EMA of the UNet but ema_decay is set")
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.skipped.load_state_dict(state.get("skipped"))
        if state.get("world_size", 1) != self.dist.world_size:
            logger.warning("resuming a %s-process run with %s processes: the data order changes",
                           state.get("world_size", 1), self.dist.world_size)
        restore_rng_state(state["rng"])

    def save(self) -> Path | None:
        """Write ``checkpoint-<step>.pt`` atomically (rank 0) and keep only the newest ``keep_checkpoints``."""
        path = self.checkpoints.save(self.step, self.state_dict()) if self.dist.is_main else None
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Load ``checkpoint`` (a file or a run folder; default: the newest readable one in ``output_dir``, falling
        back to the previous one if the newest is corrupt). False if there is none."""
        path = Path(checkpoint) if checkpoint else None
        if path is not None and path.is_file():
            self.load_state_dict(load_checkpoint(path, map_location="cpu"))
        else:
            folder = self.checkpoints
            if path is not None:
                folder = CheckpointFolder(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
            if folder.latest() is None:
                return False
            path, state = folder.load_latest()
            self.load_state_dict(state)
        if self.dist.is_main:
            truncate_metrics(self.metrics_path, self.step)
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------ loop
    @contextlib.contextmanager
    def _distributed_unet(self):
        """The pipeline calls its UNet through the DDP wrapper while this block runs."""
        if self.ddp_unet is None:
            yield
            return
        unet = self.refiner.unet
        self.refiner.unet = self.ddp_unet
        try:
            yield
        finally:
            self.refiner.unet = unet

    def _generator(self) -> torch.Generator:
        """The loss's random draws for this step and process (resume needs no RNG state for them)."""
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step) * 1009 + self.dist.rank)

    def train_step(self, images: torch.Tensor) -> float:
        """One optimisation step on a batch ``[B, 3, H, W]`` of one bucket; returns the loss (mean over processes)."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=cfg.mixed_precision == "bf16"), self._distributed_unet():
            out = refiner_loss(self.refiner, self.noise_scheduler, images.to(self.device), cfg.loss,
                               generator=self._generator())
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.refiner.unet.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.refiner.unet)
        loss = out.loss.detach().double().cpu().reshape(1)
        return float(all_reduce_mean(loss, self.dist)) if self.dist.enabled else float(loss)

    def _epoch_batches(self) -> list[list[int]]:
        world, per_rank = self.dist.world_size, self.config.batch_size
        batches = bucket_batches(self.dataset.buckets, per_rank * world, self.config.seed, self.epoch,
                                 drop_last=world > 1)
        if world > 1:
            batches = [b[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank] for b in batches]
        return batches[self.batch_in_epoch:]

    def _account_skipped(self, skipped: list) -> None:
        self.skipped.update_all_ranks(skipped, self.dist)

    def train(self, save_pipeline: bool = True) -> RefinerTrainResult:
        """Train until ``config.steps``, checkpointing every ``checkpoint_every`` steps and at the end."""
        with output_lock(self.output_dir, "train-refiner", rank=self.dist.rank):
            if self.dist.is_main:
                self.checkpoints.clean_temporary()
                if self.step == 0:  # a fresh run: what an earlier attempt logged without a checkpoint is stale
                    self.metrics_path.unlink(missing_ok=True)
                    (self.output_dir / "skipped.jsonl").unlink(missing_ok=True)
            if self.dist.enabled:
                torch.distributed.barrier()
            self.skipped.update((i, str(self.dataset.paths[i]), reason)  # headers unreadable when bucketing
                                for i, reason in sorted(getattr(self.dataset, "unreadable", {}).items()))
            return self._train(save_pipeline)

    def _train(self, save_pipeline: bool) -> RefinerTrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        losses: list[float] = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train-refiner",
                   disable=not (self.progress and self.dist.is_main))
        last_saved = self.step if self.step else -1
        while self.step < cfg.steps:
            batches = self._epoch_batches()
            if not batches and self.batch_in_epoch == 0:
                raise ValueError(f"no batch of {cfg.batch_size} x {self.dist.world_size} images of one size; lower "
                                 "--batch-size or add images")
            loader = DataLoader(_Reporting(self.dataset), batch_sampler=_SliceSampler(batches),
                                num_workers=cfg.num_workers, collate_fn=_collate,
                                generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
            for images, skipped in loader:
                self._account_skipped(skipped)
                loss = self.train_step(images)
                losses.append(loss)
                self.step += 1
                self.batch_in_epoch += 1
                if self.dist.is_main:
                    append_metrics(self.metrics_path, {"step": self.step, "loss": loss,
                                                       "lr": self.lr_scheduler.get_last_lr()[0],
                                                       "height": images.shape[-2], "width": images.shape[-1],
                                                       "batch": images.shape[0] * self.dist.world_size})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % cfg.log_every == 0:
                    logger.info("step %d loss %.5f", self.step, loss)
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                    self.save()
                    last_saved = self.step
                if self.step >= cfg.steps:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        if last_saved != self.step:
            self.save()
        pipeline_dir = None
        if save_pipeline and self.dist.is_main:
            pipeline_dir = self._save_pipeline(self.output_dir / "refiner")
        if self.dist.enabled:
            torch.distributed.barrier()
        return RefinerTrainResult(losses, self.step, pipeline_dir)

    def _save_pipeline(self, folder: Path) -> Path:
        """``save_pretrained`` of the pipeline (EMA weights when EMA is on; the trained weights are put back)."""
        unet = self.refiner.unet
        unet.eval()
        raw = None
        if self.ema is not None:
            raw = {k: v.detach().clone() for k, v in unet.state_dict().items()}
            self.ema.copy_to(unet)
        try:
            return self.refiner.save_pretrained(folder)
        finally:
            if raw is not None:
                unet.load_state_dict(raw)
            unet.train()


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class DDPUNet(DistributedDataParallel):
        """DDP around a diffusers UNet that still answers ``config``, ``dtype``, ``add_embedding``... like the UNet
        (the pipeline reads them), while its forward goes through DDP (gradients all-reduced)."""

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "module":
                    raise
                return getattr(self.module, name)

    return DDPUNet


def _DDPUNet(unet, device_ids=None):  # noqa: N802 - reads like the class it builds
    return _ddp_class()(unet, device_ids=device_ids)
