"""Training DualViTok (extra ``train``): losses, PatchGAN discriminator, trainer, checkpoints, samplers.

``DualViTokLoss`` follows the ILLUME+ reference losses; the trainer adds DDP or FSDP, exact resume, progressive
resolution and logging. Heavy optional dependencies (``lpips``, ``yaml``) are imported where they are used.
"""

from .checkpoint import capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from .config import LossConfig, TrainConfig, list_configs, load_train_config, resolve_config_path
from .discriminator import PatchGANDiscriminator
from .dualvitok_loss import DiscriminatorLossOutput, DualViTokLoss, GeneratorLossOutput
from .ema import ModelEMA
from .trainer import Trainer, TrainResult, build_model

__all__ = [
    "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state", "latest_checkpoint",
    "LossConfig", "TrainConfig", "load_train_config", "resolve_config_path", "list_configs",
    "PatchGANDiscriminator", "DualViTokLoss", "GeneratorLossOutput", "DiscriminatorLossOutput", "ModelEMA",
    "Trainer", "TrainResult", "build_model",
]
