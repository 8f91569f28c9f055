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


def create_model(name: str, pretrained: bool = False, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, **overrides):
    """Build a registered DualViTok.

    Args:
        name: a name from :func:`list_models`, e.g. ``"dualvitok_anyres_max512"`` (the released 1.35 B model).
        pretrained: load the released weights from the Hub (see ``PRETRAINED``); Hub keywords (``revision``,
            ``cache_dir``, ``token``, ``local_files_only``, ...) in ``overrides`` go to ``from_pretrained``.
        device: build directly on this device (``"meta"`` builds without allocating memory).
        dtype: dtype of the floating-point weights (``torch_dtype`` is a deprecated alias).
        overrides: top-level :class:`DualViTokConfig` fields to replace (e.g. ``pixel_drop_rate=0.1``). With
            ``pretrained=True`` they are applied to the loaded model's config; fields that would change the shapes
            of the weights are refused.
    """
    from ._weights import dtype_keyword
    from .model import DualViTok

    dtype = dtype_keyword(dtype, overrides.pop("torch_dtype", None), "create_model")
    hub_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in _HUB_KEYWORDS}
    if hub_kwargs and not pretrained:
        raise ValueError(f"{sorted(hub_kwargs)} only apply with pretrained=True")
    base = get_config(name)
    config = get_config(name)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown config field {key!r}")
        setattr(config, key, value)
    config = DualViTokConfig.from_dict(config.to_dict())  # re-validate
    if pretrained:
        if name not in PRETRAINED:
            raise ValueError(f"no released weights for {name!r}; released: {sorted(PRETRAINED)}")
        if overrides:
            _refuse_shape_changes(base, config, overrides)
        model = DualViTok.from_pretrained(PRETRAINED[name], config=config, dtype=dtype, **hub_kwargs)
        return model.to(device) if device is not None else model
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = DualViTok(config)
    return model.to(dtype=dtype) if dtype is not None else model


_HUB_KEYWORDS = ("revision", "subfolder", "cache_dir", "force_download", "token", "local_files_only", "strict",
                 "use_ema", "map_location", "check_weights")


def _refuse_shape_changes(base: DualViTokConfig, config: DualViTokConfig, overrides: dict) -> None:
    """Raise if the overridden config's weights differ in names or shapes from the released ones."""
    from .model import DualViTok

    with torch.device("meta"):
        before = {k: tuple(v.shape) for k, v in DualViTok(base).state_dict().items()}
        after = {k: tuple(v.shape) for k, v in DualViTok(config).state_dict().items()}
    if before != after:
        changed = sorted(set(before) ^ set(after) | {k for k in set(before) & set(after) if before[k] != after[k]})
        raise ValueError(f"create_model(pretrained=True) cannot apply {sorted(overrides)}: they change the weights' "
                         f"names or shapes ({len(changed)} tensors, e.g. {changed[:3]}), so the released weights "
                         "would not fit. Build with pretrained=False, or override only fields such as "
                         "pixel_drop_rate that leave the weights as they are")


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
    """A tiny DualViTok (the conformance fixtures' layout): 2-block tower, ch 32, codebooks 256 / 512."""
    return _tiny()
