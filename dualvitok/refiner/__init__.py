"""Diffusion refiner: an SDXL-style decoder from DualViTok tokens to images at twice the token image size.

Needs the ``refiner`` extra (``pip install 'dualvitok[refiner]'``, i.e. diffusers). See docs/refiner.md.
"""

from .conditioning import TokenNoise as TokenNoise
from .conditioning import code_features as code_features
from .conditioning import time_ids as time_ids
from .conditioning import to_latent_grid as to_latent_grid
from .pipeline import RefinerPipeline as RefinerPipeline
from .resolutions import REFERENCE_RESOLUTIONS as REFERENCE_RESOLUTIONS
from .resolutions import nearest_resolution as nearest_resolution
from .resolutions import resolution_index as resolution_index
from .trainer import RefinerTrainConfig as RefinerTrainConfig
from .trainer import RefinerTrainer as RefinerTrainer
from .training import RefinerLossConfig as RefinerLossConfig
from .training import refiner_loss as refiner_loss

__all__ = [
    "REFERENCE_RESOLUTIONS",
    "RefinerLossConfig",
    "RefinerPipeline",
    "RefinerTrainConfig",
    "RefinerTrainer",
    "TokenNoise",
    "code_features",
    "nearest_resolution",
    "refiner_loss",
    "resolution_index",
    "time_ids",
    "to_latent_grid",
]
