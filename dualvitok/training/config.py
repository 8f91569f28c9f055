"""Training configuration: a dataclass tree read from YAML (or JSON), with strict keys.

Field names follow the ILLUME+ training configs where they exist (``disc_start``, ``disc_weight``,
``disc_loss``, ``gen_adv_loss``, ``reconstruction_loss``, ``codebook_weight``, ``perceptual_weight``, ``lr``,
``betas``, ``ckpt_every`` -> ``checkpoint_every``, ``per_proc_batch_size`` -> ``batch_size``, ...). Configs shipped with
the package live in ``dualvitok/configs/*.yaml`` and are found by name (``--config tiny_cpu``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._utils import to_plain
from .._utils.decoding import from_dict

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

__all__ = ["LossConfig", "OptimizerConfig", "StageConfig", "DataConfig", "ModelSpec", "RunConfig", "TrainConfig",
           "load_train_config", "resolve_config_path", "list_configs"]


@dataclass
class LossConfig:
    """:class:`DualViTokLoss` settings; defaults are the reference ``dualvitok_anyres_max512`` recipe."""

    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "vgg"
    perceptual_backbone_weights: str | None = "auto"  # torchvision state dict path, 'auto' (hub cache) or null (random)
    codebook_weight: float = 1.0
    semantic_weight: float = 1.0
    semantic_codebook_weight: float = 1.0
    semantic_reconstruction_weight: float = 1.0
    disc_type: str = "patchgan"
    disc_start: int = 20000
    disc_weight: float = 0.5
    disc_loss: str = "hinge"
    gen_adv_loss: str = "hinge"
    disc_dim: int = 64
    disc_num_layers: int = 3
    disc_adaptive_weight: bool = False

    def __post_init__(self):
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"loss.reconstruction_loss must be 'l1' or 'l2', got {self.reconstruction_loss!r}")
        for name in ("disc_loss", "gen_adv_loss"):
            if getattr(self, name) not in ("hinge", "vanilla", "non-saturating"):
                raise ValueError(f"loss.{name} must be 'hinge' or 'non-saturating', got {getattr(self, name)!r}")


@dataclass
class OptimizerConfig:
    """Adam/AdamW for the tokenizer and the discriminator (the reference: Adam, lr 1e-4, betas (0.9, 0.95))."""

    type: str = "adam"  # 'adam' or 'adamw'
    lr: float = 1e-4
    disc_lr: float | None = None  # default: lr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    scheduler: str = "constant"  # 'constant' or 'warmup' (linear warm-up, then constant)
    warmup_steps: int = 0
    accumulation_steps: int = 1  # micro-batches of data.batch_size per optimizer step (gradient accumulation)

    def __post_init__(self):
        if self.type not in ("adam", "adamw"):
            raise ValueError(f"optimizer.type must be 'adam' or 'adamw', got {self.type!r}")
        if self.scheduler not in ("constant", "warmup"):
            raise ValueError(f"optimizer.scheduler must be 'constant' or 'warmup', got {self.scheduler!r}")
        if self.accumulation_steps < 1:
            raise ValueError(f"optimizer.accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class StageConfig:
    """One resolution stage of progressive training.

    ``mode='fixed'``: square crops of ``resolution``; ``mode='anyres'``: aspect-ratio buckets with at most
    ``max_pixels`` pixels (sides multiples of 16). A stage lasts until ``until_step`` (exclusive; null = to the end).
    ``crop_scale``: range of the crop side as a fraction of the short side (random-resized crop; [1, 1] = resize the
    short side to the target and crop).
    """

    mode: str = "fixed"
    resolution: int = 256
    max_pixels: int = 512 * 512
    min_pixels: int = 32 * 32
    until_step: int | None = None
    batch_size: int | None = None  # per process; default data.batch_size
    crop_scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        if self.mode not in ("fixed", "anyres"):
            raise ValueError(f"stage mode must be 'fixed' or 'anyres', got {self.mode!r}")
        if self.mode == "fixed" and self.resolution % 16:
            raise ValueError(f"stage resolution must be a multiple of 16, got {self.resolution}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


@dataclass
class DataConfig:
    """Training images: folders (recursive), image files, webdataset-style ``.tar`` shards or ``builtin:skimage``."""

    sources: tuple[str, ...] = ()
    batch_size: int = 8  # per process (the reference's per_proc_batch_size)
    num_workers: int = 0
    random_flip: bool = True
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    cache_images: bool = False  # keep decoded images in memory (small data sets)
    max_skipped_fraction: float = 0.1  # unreadable images are skipped; more than this fraction stops the run

    def __post_init__(self):
        if not self.stages:
            raise ValueError("data.stages must list at least one stage")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")


@dataclass
class ModelSpec:
    """What to train: a registered ``name`` (with top-level ``overrides``), a full ``config`` dict, and optionally
    ``init_from`` (a folder saved by ``save_pretrained``) to fine-tune. With ``init_from``, ``overrides`` apply to
    the pretrained config; those that would change a pretrained weight's shape are refused
    (:func:`dualvitok.training.run.apply_overrides`)."""

    name: str | None = "dualvitok_tiny"
    config: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None


@dataclass
class RunConfig:
    """Loop settings."""

    max_steps: int = 1000
    seed: int = 0
    mixed_precision: str = "no"  # 'no' or 'bf16' (autocast on CPU and GPU)
    ema_decay: float | None = None  # e.g. 0.999; null disables EMA (the reference)
    log_every: int = 1  # metrics.jsonl gets one record per optimizer step; the console every log_every steps
    checkpoint_every: int = 1000  # 0: only at the end of the run
    keep_checkpoints: int = 2
    sample_every: int = 500  # reconstructions PNG
    plot_every: int = 100  # loss-curve PNG
    num_samples: int = 4
    threads: int | None = None  # torch.set_num_threads on CPU
    device: str | None = None  # default 'auto': cuda > mps > npu > cpu (dualvitok.devices.resolve_device)
    parallel: str = "ddp"  # under torchrun: 'ddp' (replicated model) or 'fsdp' (sharded; see dualvitok.training.fsdp)
    activation_checkpointing: bool = False  # recompute transformer / MoVQ block activations in backward (less memory)
    tracker: str | None = None  # 'tensorboard': also log to OUTPUT/tensorboard (extra 'tensorboard')

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"run.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"run.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.tracker not in (None, "none", "tensorboard"):
            raise ValueError(f"run.tracker must be null or 'tensorboard', got {self.tracker!r}")
        for name in ("max_steps", "checkpoint_every", "sample_every", "plot_every", "log_every", "num_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass
class TrainConfig:
    """The whole training configuration (YAML sections ``model``, ``loss``, ``optimizer``, ``data``, ``run``)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples as lists)."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a nested dict; unknown keys raise ``ValueError`` naming the known ones."""
        return from_dict(cls, data, keep_lists=("config", "overrides"))


def list_configs() -> list[str]:
    """Names of the configs shipped in ``dualvitok/configs``."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a shipped config (``tiny_cpu``, ``fix256``, ``anyres_max512``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no config file {str(name_or_path)!r}; pass a YAML/JSON file or one of the shipped "
                            f"configs: {list_configs()}")


def load_train_config(name_or_path: str | os.PathLike) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON training config, by path or shipped name."""
    path = resolve_config_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError as e:  # pragma: no cover
            raise ImportError("YAML configs need PyYAML: pip install dualvitok[train]") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: a training config is a mapping of sections (model, loss, optimizer, data, run), "
                         f"got {type(data).__name__}")
    try:
        return TrainConfig.from_dict(data or {})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
