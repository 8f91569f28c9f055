"""Refiner training loop: frozen tokenizer and VAE, trained UNet, aspect-ratio buckets, exact resume.

Own design (the ILLUME+ refiner training code is not released). Checkpoints use
:mod:`dualvitok.training.checkpoint` (atomic ``checkpoint-<step>.pt`` files with UNet, optimizer, LR schedule, data
position and all RNG states), so a run stopped after any checkpoint and resumed reaches bit-identical weights on the
same hardware. The data order is a function of ``(seed, epoch)`` only, and the data loader draws from its own
generator, never the global one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from ..training.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .buckets import BucketBatchSampler, BucketImageDataset, list_images
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
        steps, batch_size, learning_rate, weight_decay, warmup_steps, grad_clip: optimisation (AdamW).
        checkpoint_every, keep_checkpoints: checkpoint period in steps and how many to keep.
        seed: seeds the initialisation, the data order and the global RNG.
        mixed_precision: ``"no"`` or ``"bf16"`` (autocast).
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
    loss: RefinerLossConfig = field(default_factory=RefinerLossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = RefinerLossConfig(**self.loss)
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class RefinerTrainResult(NamedTuple):
    """``losses`` of the steps run in this call, the final ``step`` and the saved ``pipeline_dir``."""

    losses: list[float]
    step: int
    pipeline_dir: Path | None


class RefinerTrainer:
    """Trains a refiner UNet on an image folder.

    Args:
        config: :class:`RefinerTrainConfig`.
        refiner: an existing pipeline to train (its tokenizer is used); otherwise built from ``config``.
        dataset: a :class:`BucketImageDataset`; otherwise built from ``config.data``.
    """

    def __init__(self, config: RefinerTrainConfig, refiner: RefinerPipeline | None = None,
                 dataset: BucketImageDataset | None = None):
        self.config = config
        torch.manual_seed(config.seed)
        if refiner is None:
            refiner = self._build_refiner(config)
        elif config.resolutions is not None:
            refiner.resolutions = tuple(tuple(r) for r in config.resolutions)
        self.refiner = refiner.to(config.device)
        self.dataset = dataset or BucketImageDataset(list_images(config.data), refiner.resolutions)
        for module in (refiner.tokenizer, refiner.vae):
            module.eval().requires_grad_(False)
        refiner.unet.train().requires_grad_(True)
        self.noise_scheduler = training_noise_scheduler(refiner)
        self.optimizer = torch.optim.AdamW(refiner.unet.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        warmup = max(0, config.warmup_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.checkpoint_dir = Path(config.output_dir) / "checkpoints"

    @staticmethod
    def _build_refiner(config: RefinerTrainConfig) -> RefinerPipeline:
        from ..loading import load_model

        tokenizer = load_model(config.tokenizer)
        if config.refiner:
            return RefinerPipeline.from_pretrained(config.refiner, tokenizer, resolutions=config.resolutions)
        return RefinerPipeline.from_architecture(tokenizer, config.architecture, config.resolutions)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, LR schedule, data position, RNG states."""
        return {
            "unet": {k: v.detach().clone() for k, v in self.refiner.unet.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": capture_rng_state(),
            "config": asdict(self.config),
            "kind": "dualvitok-refiner",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "dualvitok-refiner":
            raise ValueError("not a refiner training checkpoint (written by dualvitok train-refiner)")
        self.refiner.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        restore_rng_state(state["rng"])

    def save(self) -> Path:
        """Write ``checkpoint-<step>.pt`` atomically and keep only the newest ``keep_checkpoints``."""
        path = self.checkpoint_dir / f"checkpoint-{self.step:07d}.pt"
        save_checkpoint(path, self.state_dict())
        old = sorted(self.checkpoint_dir.glob("checkpoint-*.pt"))[: -self.config.keep_checkpoints]
        for stale in old:
            stale.unlink(missing_ok=True)
        logger.info("saved %s", path)
        return path

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Load ``checkpoint`` (a file or a run folder; default: the newest in ``output_dir``). False if none."""
        path = Path(checkpoint) if checkpoint else None
        if path is None or path.is_dir():
            path = latest_checkpoint(path or self.config.output_dir)
            if path is None:
                return False
        self.load_state_dict(load_checkpoint(path, map_location="cpu"))
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------ loop
    def train_step(self, images: torch.Tensor) -> float:
        """One optimisation step on a batch ``[B, 3, H, W]`` of one bucket; returns the loss."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        device_type = torch.device(cfg.device).type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            out = refiner_loss(self.refiner, self.noise_scheduler, images.to(cfg.device), cfg.loss)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.refiner.unet.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        return float(out.loss.detach())

    def train(self, save_pipeline: bool = True) -> RefinerTrainResult:
        """Train until ``config.steps``, checkpointing every ``checkpoint_every`` steps and at the end."""
        from tqdm.auto import tqdm

        cfg = self.config
        losses: list[float] = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train-refiner")
        while self.step < cfg.steps:
            sampler = BucketBatchSampler(self.dataset.buckets, cfg.batch_size, cfg.seed, self.epoch,
                                         skip=self.batch_in_epoch)
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
            for images in loader:
                loss = self.train_step(images)
                losses.append(loss)
                self.step += 1
                self.batch_in_epoch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % cfg.log_every == 0:
                    logger.info("step %d loss %.5f", self.step, loss)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
                if self.step >= cfg.steps:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        pipeline_dir = None
        if save_pipeline:
            self.refiner.unet.eval()
            pipeline_dir = self.refiner.save_pretrained(Path(cfg.output_dir) / "refiner")
        return RefinerTrainResult(losses, self.step, pipeline_dir)
