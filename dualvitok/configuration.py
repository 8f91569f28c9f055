"""Configuration of DualViTok: a dataclass tree that mirrors the reference's nested config one to one.

The top-level keys (``semantic_encoder``, ``semantic_quantizer``, ``semantic_decoder``, ``pixel_encoder``,
``pixel_quantizer``, ``pixel_decoder`` and the noise keys) and their fields are those of the ILLUME+ configs
(``configs/example/dualvitok/*.py``), so a reference config converts by name. Defaults are the released
``dualvitok_anyres_max512`` architecture.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._utils import atomic_write, to_plain
from .blocks.qwen2_vit import Qwen2VisionConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_VERSION = 1


def _from_dict(cls: type[T], data: dict[str, Any], strict: bool, path: str) -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields recurse, lists become tuples."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"config {path or 'root'} must be a dict, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        message = f"unknown config keys at {path or 'root'} of {cls.__name__}: {unknown}; known: {sorted(fields)}"
        if strict:
            raise ValueError(message)
        logger.warning("ignoring %s", message)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None and value is not None:
            value = _from_dict(sub, value, strict, f"{path}.{name}" if path else name)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


class _ConfigMixin:
    """``from_dict`` / ``to_dict`` for the config dataclasses."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], strict: bool = True) -> T:
        """Build from a (nested) dict; unknown keys raise when ``strict``, else are logged and ignored."""
        return _from_dict(cls, data, strict, "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable nested dict (tuples become lists)."""
        return to_plain(self)


@dataclass
class VisionTowerConfig(Qwen2VisionConfig, _ConfigMixin):
    """The frozen Qwen2-VL vision tower (reference key ``semantic_encoder.semantic_encoder_config``)."""


@dataclass
class SemanticEncoderConfig(_ConfigMixin):
    """Semantic encoder: frozen vision tower, target norm and the trainable transformer head."""

    semantic_encoder: str = "Emova-ollm/qwen2vit600m"  # tower name in the reference (informative; nothing is fetched)
    attn_implementation: str = "sdpa"
    target_mlp: str = "norm"  # 'norm': parameter-free LayerNorm of the merger output (target and head input)
    proj_layer: str = "linear"  # 'linear' or 'linear_norm' after the head
    num_blocks: int = 4
    z_channels: int = 32
    embed_dim: int = 1280
    num_heads: int = 16  # the reference always uses 16 heads, mlp_ratio 4, quick_gelu in the head blocks
    mlp_ratio: float = 4.0
    semantic_encoder_config: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    timm_model: str | None = None  # None: the Qwen2-VL tower; else a timm ViT name (dualvitok.timm_tower, extra timm)


@dataclass
class SemanticDecoderConfig(_ConfigMixin):
    """Semantic decoder: transformer blocks from codes back to the tower's feature space."""

    proj_layer: str = "linear_norm"
    attn_implementation: str = "sdpa"
    z_channels: int = 32
    embed_dim: int = 1280
    output_channels: int = 3584
    num_blocks: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class QuantizerConfig(_ConfigMixin):
    """A quantizer (``type`` is ``SimVQ`` or ``VectorQuantizer``)."""

    type: str = "SimVQ"
    dim: int = 32
    codebook_size: int = 32768
    channel_first: bool = True
    rotation_trick: bool = False


@dataclass
class MoVQConfig(_ConfigMixin):
    """MoVQ encoder or decoder of the pixel branch (the same keys serve both, as in the reference)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)  # level indices with attention
    z_channels: int = 32
    embed_dim: int = 32
    double_z: bool = False
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    use_dc_up_down_blocks: bool = True
    codebook_size: int | None = None  # present in the reference config, unused


def _default_pixel_decoder() -> MoVQConfig:
    return MoVQConfig(ch=384, z_channels=64, embed_dim=64)


@dataclass
class DualViTokConfig(_ConfigMixin):
    """The whole tokenizer. Defaults: the released ``dualvitok_anyres_max512`` (about 1.35 B parameters)."""

    semantic_encoder: SemanticEncoderConfig = field(default_factory=SemanticEncoderConfig)
    semantic_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semantic_decoder: SemanticDecoderConfig = field(default_factory=SemanticDecoderConfig)
    pixel_encoder: MoVQConfig = field(default_factory=MoVQConfig)
    pixel_quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(codebook_size=98304))
    pixel_decoder: MoVQConfig = field(default_factory=_default_pixel_decoder)
    pixel_drop_rate: float | None = None  # token noise (beta); None or 0 disables it, as in the released config
    pixel_drop_batch_rate: float = 0.1  # fraction of samples that get token noise (alpha)
    pixel_noise_type: str = "random"  # 'random' (reference), 'zero' or 'uniform'
    config_version: int = CONFIG_VERSION

    def __post_init__(self):
        se, sq, sd = self.semantic_encoder, self.semantic_quantizer, self.semantic_decoder
        pe, pq, pd = self.pixel_encoder, self.pixel_quantizer, self.pixel_decoder
        checks = [
            (sq.dim == se.z_channels,
             f"semantic_quantizer.dim ({sq.dim}) != semantic_encoder.z_channels ({se.z_channels})"),
            (sd.z_channels == sq.dim,
             f"semantic_decoder.z_channels ({sd.z_channels}) != semantic_quantizer.dim ({sq.dim})"),
            (pq.dim == pe.embed_dim, f"pixel_quantizer.dim ({pq.dim}) != pixel_encoder.embed_dim ({pe.embed_dim})"),
            (pd.embed_dim == sq.dim + pq.dim,
             f"pixel_decoder.embed_dim ({pd.embed_dim}) must equal semantic + pixel code dims ({sq.dim} + {pq.dim})"),
            (se.target_mlp in ("norm", "identity"),
             f"semantic_encoder.target_mlp must be 'norm' or 'identity', got {se.target_mlp!r}"),
            (se.proj_layer in ("linear", "linear_norm"),
             "semantic_encoder.proj_layer must be 'linear' or 'linear_norm'"),
            (sd.proj_layer in ("linear", "linear_norm"),
             "semantic_decoder.proj_layer must be 'linear' or 'linear_norm'"),
            (self.pixel_noise_type in ("random", "zero", "uniform"),
             f"pixel_noise_type must be 'random', 'zero' or 'uniform', got {self.pixel_noise_type!r}"),
            (len(pe.ch_mult) == len(pd.ch_mult), "pixel encoder and decoder need the same number of levels (ch_mult)"),
            (self.config_version <= CONFIG_VERSION,
             f"config_version {self.config_version} is newer than this library supports ({CONFIG_VERSION}); "
             "upgrade dualvitok"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid DualViTokConfig: {message}")

    @property
    def pixel_downsample_factor(self) -> int:
        """Stride of the pixel encoder (16 for five levels)."""
        return 2 ** (len(self.pixel_encoder.ch_mult) - 1)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the config as JSON (atomically: temp file, then rename)."""
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"model_type": "dualvitok", **self.to_dict()}, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, strict: bool = True) -> DualViTokConfig:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data.pop("model_type", None)
        return cls.from_dict(data, strict=strict)

    @classmethod
    def from_reference(cls, data: dict[str, Any] | str | os.PathLike) -> DualViTokConfig:
        """Convert a reference-layout config (dict or JSON path; a ``vq_model.config`` wrapper is unwrapped).

        Keys this library does not model (e.g. ``infer_interpolate``, ``vq_ckpt``) are logged and ignored.
        """
        if not isinstance(data, dict):
            with open(data, encoding="utf-8") as f:
                data = json.load(f)
        for wrapper in ("vq_model", "config"):
            if wrapper in data and isinstance(data[wrapper], dict) and "semantic_encoder" not in data:
                data = data[wrapper]
        data = {k: v for k, v in data.items() if k not in ("model_type", "type")}
        return cls.from_dict(data, strict=False)


_NESTED: dict[tuple[str, str], type] = {
    ("SemanticEncoderConfig", "semantic_encoder_config"): VisionTowerConfig,
    ("DualViTokConfig", "semantic_encoder"): SemanticEncoderConfig,
    ("DualViTokConfig", "semantic_quantizer"): QuantizerConfig,
    ("DualViTokConfig", "semantic_decoder"): SemanticDecoderConfig,
    ("DualViTokConfig", "pixel_encoder"): MoVQConfig,
    ("DualViTokConfig", "pixel_quantizer"): QuantizerConfig,
    ("DualViTokConfig", "pixel_decoder"): MoVQConfig,
}
