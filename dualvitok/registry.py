"""Registered architectures: ``create_model(name)`` builds them without downloading anything.

Names follow the ILLUME+ config files (``dualvitok_anyres_max512``, ``dualvitok_fix256``); ``*_tiny`` variants
are small configurations for tests and CPU demos.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .configuration import (
    DualViTokConfig,
    MoVQConfig,
    QuantizerConfig,
    SemanticDecoderConfig,
    SemanticEncoderConfig,
    VisionTowerConfig,
)

_REGISTRY: dict[str, Callable[[], DualViTokConfig]] = {}

PRETRAINED: dict[str, str] = {"dualvitok_anyres_max512": "ILLUME-MLLM/dualvitok"}
"""Hub repos holding weights for a registered name (the reference layout, converted on load)."""


def register_model(fn: Callable[[], DualViTokConfig]) -> Callable[[], DualViTokConfig]:
    """Register a function returning a :class:`DualViTokConfig` under its own name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def get_config(name: str) -> DualViTokConfig:
    """The :class:`DualViTokConfig` registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return _REGISTRY[name]()


def create_model(name: str, pretrained: bool = False, device: str | torch.device | None = None, **overrides):
    """Build a registered DualViTok.

    Args:
        name: a name from :func:`list_models`, e.g. ``"dualvitok_anyres_max512"`` (the released 1.35 B model).
        pretrained: load the released weights from the Hub (see ``PRETRAINED``).
        device: build directly on this device (``"meta"`` builds without allocating memory).
        overrides: top-level :class:`DualViTokConfig` fields to replace (e.g. ``pixel_drop_rate=0.1``).
    """
    from .model import DualViTok

    config = get_config(name)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown config field {key!r}")
        setattr(config, key, value)
    config = DualViTokConfig.from_dict(config.to_dict())  # re-validate
    if pretrained:
        if name not in PRETRAINED:
            raise ValueError(f"no released weights for {name!r}; released: {sorted(PRETRAINED)}")
        model = DualViTok.from_pretrained(PRETRAINED[name])
        return model.to(device) if device is not None else model
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DualViTok(config)


@register_model
def dualvitok_anyres_max512() -> DualViTokConfig:
    """The released ILLUME+ DualViTok (``configs/example/dualvitok/dualvitok_anyres_max512.py``), ~1.35 B params."""
    return DualViTokConfig()


@register_model
def dualvitok_fix256() -> DualViTokConfig:
    """The reference fixed-256 training recipe's architecture: same network, token noise on (alpha=beta=0.1)."""
    return DualViTokConfig(pixel_drop_rate=0.1)


def _tiny(z_sem: int = 8, z_pix: int = 8, ch: int = 32) -> DualViTokConfig:
    return DualViTokConfig(
        semantic_encoder=SemanticEncoderConfig(
            num_blocks=2, z_channels=z_sem, embed_dim=64,
            semantic_encoder_config=VisionTowerConfig(depth=2, embed_dim=64, num_heads=4, hidden_size=96),
        ),
        semantic_quantizer=QuantizerConfig(dim=z_sem, codebook_size=256),
        semantic_decoder=SemanticDecoderConfig(z_channels=z_sem, embed_dim=64, output_channels=96, num_blocks=2),
        pixel_encoder=MoVQConfig(ch=ch, num_res_blocks=1, z_channels=z_pix, embed_dim=z_pix),
        pixel_quantizer=QuantizerConfig(dim=z_pix, codebook_size=512),
        pixel_decoder=MoVQConfig(ch=ch, num_res_blocks=1, z_channels=z_sem + z_pix, embed_dim=z_sem + z_pix),
    )


@register_model
def dualvitok_tiny() -> DualViTokConfig:
    """A tiny DualViTok (the layout of ``../shared/conformance``): 2-block tower, ch 32, codebooks 256 / 512."""
    return _tiny()
