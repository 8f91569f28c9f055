"""Configuration of DualViTok: a dataclass tree that mirrors the reference's nested config one to one.

The top-level keys (``semantic_encoder``, ``semantic_quantizer``, ``semantic_decoder``, ``pixel_encoder``,
``pixel_quantizer``, ``pixel_decoder`` and the noise keys) and their fields are those of the ILLUME+ configs
(``configs/example/dualvitok/*.py``), so a reference config converts by name. Defaults are the released
``dualvitok_anyres_max512`` architecture.

Every value is checked before anything is built: types (``"codebook_size": "512"`` is refused, not coerced), ranges
(positive sizes, probabilities in [0, 1], widths divisible by the head count and by the 32 groups of the MoVQ
GroupNorm) and the estimated parameter count (:meth:`DualViTokConfig.estimate_num_parameters`, within about 2% of
the real count) against ``DUALVITOK_MAX_PARAMS`` (default 10 B, 40 GB in float32), so that a few bytes of config
cannot allocate without bound. Errors are ``ValueError``s that name the field (and the file, for
:meth:`DualViTokConfig.from_json_file` / :meth:`DualViTokConfig.from_reference`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._utils import atomic_write, to_plain
from ._utils.decoding import ConfigFieldError, check_type, describe, from_dict, type_hints
from .blocks.qwen2_vit import Qwen2VisionConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_VERSION = 1
DEFAULT_MAX_PARAMS = 10_000_000_000
"""Default bound on a config's estimated parameter count; override with the ``DUALVITOK_MAX_PARAMS`` variable."""
GROUP_NORM_GROUPS = 32  # the MoVQ blocks' GroupNorm (dualvitok.blocks.norm)


def max_params() -> int:
    """The parameter-count bound: ``$DUALVITOK_MAX_PARAMS`` or :data:`DEFAULT_MAX_PARAMS`."""
    value = os.environ.get("DUALVITOK_MAX_PARAMS", "")
    if not value:
        return DEFAULT_MAX_PARAMS
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"DUALVITOK_MAX_PARAMS must be a number, got {value!r}") from None


def _check_fields(config: Any) -> None:
    """Types of every field and the ranges in ``config._RANGES`` (``name: (low, high)``, ``None``: unbounded)."""
    for f in dataclasses.fields(config):
        hint = type_hints(type(config))[f.name]
        if dataclasses.is_dataclass(hint):
            continue
        value = check_type(getattr(config, f.name), hint, f.name)
        object.__setattr__(config, f.name, value)
        low, high = getattr(config, "_RANGES", {}).get(f.name, (None, None))
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            where = f"{f.name}[{i}]" if isinstance(value, tuple) else f.name
            if v is None or isinstance(v, (str, bool)):
                continue
            if (low is not None and v < low) or (high is not None and v > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigFieldError(where, f"must be {bounds}, got {v!r}")


def _divisible(config: Any, name: str, by: int, why: str) -> None:
    value = getattr(config, name)
    if value % by:
        raise ConfigFieldError(name, f"({value}) must be divisible by {by} ({why})")


class _ConfigMixin:
    """``from_dict`` / ``to_dict`` for the config dataclasses."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], strict: bool = True) -> T:
        """Build from a (nested) dict; unknown keys raise when ``strict``, else are logged and ignored."""
        return from_dict(cls, data, strict, check_types=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable nested dict (tuples become lists)."""
        return to_plain(self)


@dataclass
class VisionTowerConfig(Qwen2VisionConfig, _ConfigMixin):
    """The frozen Qwen2-VL vision tower (reference key ``semantic_encoder.semantic_encoder_config``)."""

    _RANGES: typing.ClassVar[dict] = {"depth": (1, None), "embed_dim": (1, None), "num_heads": (1, None),
                                      "hidden_size": (1, None), "mlp_ratio": (1e-3, None), "in_channels": (1, None),
                                      "patch_size": (1, None), "spatial_merge_size": (1, None),
                                      "temporal_patch_size": (1, None)}

    def __post_init__(self):
        _check_fields(self)
        _divisible(self, "embed_dim", self.num_heads, f"num_heads = {self.num_heads}")


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

    _RANGES: typing.ClassVar[dict] = {"num_blocks": (1, None), "z_channels": (1, None), "embed_dim": (1, None),
                                      "num_heads": (1, None), "mlp_ratio": (1e-3, None)}

    def __post_init__(self):
        _check_fields(self)
        _divisible(self, "embed_dim", self.num_heads, f"num_heads = {self.num_heads}")


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

    _RANGES: typing.ClassVar[dict] = {"z_channels": (1, None), "embed_dim": (1, None), "output_channels": (1, None),
                                      "num_blocks": (1, None), "num_heads": (1, None), "mlp_ratio": (1e-3, None)}

    def __post_init__(self):
        _check_fields(self)
        _divisible(self, "embed_dim", self.num_heads, f"num_heads = {self.num_heads}")


QUANTIZER_OPTIONS: dict[str, tuple[str, ...]] = {
    "SimVQ": ("rotation_trick", "commitment_weight", "input_to_quantize_commit_loss_weight"),
    "VectorQuantizer": ("beta", "l2_normalize", "ema_decay", "dead_code_threshold", "init"),
}
"""The options each quantizer type takes (the others are refused for it)."""


@dataclass
class QuantizerConfig(_ConfigMixin):
    """A quantizer (``type`` is ``SimVQ`` or ``VectorQuantizer``) and its options; ``None`` = the quantizer's default.

    SimVQ: ``rotation_trick``, ``commitment_weight`` (its whole loss), ``input_to_quantize_commit_loss_weight``.
    VectorQuantizer: ``beta`` (commitment weight), ``l2_normalize``, ``ema_decay``, ``dead_code_threshold``, ``init``
    (``uniform``: U(-1/K, 1/K), ``normal``: N(0, 1); default uniform, normal with EMA). An option set for a type that
    does not use it is refused (see :data:`QUANTIZER_OPTIONS`).
    """

    type: str = "SimVQ"
    dim: int = 32
    codebook_size: int = 32768
    channel_first: bool = True
    rotation_trick: bool = False
    commitment_weight: float | None = None
    input_to_quantize_commit_loss_weight: float | None = None
    beta: float | None = None
    l2_normalize: bool | None = None
    ema_decay: float | None = None
    dead_code_threshold: float | None = None
    init: str | None = None

    def quantizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the quantizer class: size, layout and the options that are set."""
        kwargs: dict[str, Any] = {"dim": self.dim, "codebook_size": self.codebook_size,
                                  "channel_first": self.channel_first}
        for name in QUANTIZER_OPTIONS[self.type]:
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    _RANGES: typing.ClassVar[dict] = {"dim": (1, None), "codebook_size": (2, None), "commitment_weight": (0, None),
                                      "input_to_quantize_commit_loss_weight": (0, None), "beta": (0, None),
                                      "dead_code_threshold": (0, None)}

    def __post_init__(self):
        _check_fields(self)
        if self.type not in ("SimVQ", "VectorQuantizer"):
            raise ConfigFieldError("type", f"must be 'SimVQ' or 'VectorQuantizer', got {self.type!r}")
        self._check_options()

    def _check_options(self) -> None:
        """Options of another quantizer type are refused (never silently ignored); values in range."""
        defaults = {"rotation_trick": False}
        for other, names in QUANTIZER_OPTIONS.items():
            if other == self.type:
                continue
            for name in names:
                if getattr(self, name) not in (None, defaults.get(name)):
                    raise ConfigFieldError(name, f"({getattr(self, name)!r}) does not apply to type {self.type!r} (it "
                                                 f"is an option of {other}); remove it, or use type {other!r}. "
                                                 f"{self.type} takes: {', '.join(QUANTIZER_OPTIONS[self.type])}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigFieldError("ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}")
        if self.init not in (None, "uniform", "normal"):
            raise ConfigFieldError("init", f"must be 'uniform', 'normal' or null, got {self.init!r}")


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

    _RANGES: typing.ClassVar[dict] = {"ch": (1, None), "ch_mult": (1, None), "num_res_blocks": (1, None),
                                      "attn_resolutions": (0, None), "z_channels": (1, None), "embed_dim": (1, None),
                                      "dropout": (0.0, 1.0), "in_channels": (1, None), "out_channels": (1, None),
                                      "codebook_size": (1, None)}

    def __post_init__(self):
        _check_fields(self)
        if not 1 <= len(self.ch_mult) <= 12:
            raise ConfigFieldError("ch_mult", f"must have 1 to 12 levels, got {len(self.ch_mult)}")
        for i, mult in enumerate(self.ch_mult):
            if (self.ch * mult) % GROUP_NORM_GROUPS:
                raise ConfigFieldError(f"ch_mult[{i}]", f"gives {self.ch} * {mult} = {self.ch * mult} channels, not "
                                                        f"divisible by the {GROUP_NORM_GROUPS} GroupNorm groups "
                                                        "(use ch a multiple of 32)")


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

    _RANGES: typing.ClassVar[dict] = {"pixel_drop_rate": (0.0, 1.0), "pixel_drop_batch_rate": (0.0, 1.0),
                                      "config_version": (1, None)}

    def __post_init__(self):
        _check_fields(self)
        for name, hint in type_hints(type(self)).items():
            if dataclasses.is_dataclass(hint) and not isinstance(getattr(self, name), hint):
                raise ConfigFieldError(name, f"must be a {hint.__name__}, got {describe(getattr(self, name))}")
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
        estimate, limit = self.estimate_num_parameters(), max_params()
        if estimate > limit:
            raise ConfigFieldError("", f"the config describes about {estimate:,} parameters "
                                       f"({estimate * 4 / 1e9:.3g} GB "
                                       f"in float32), above the limit of {limit:,}; check the sizes (codebook_size, "
                                       "ch, num_res_blocks, depth, ...) or, if it is intended, set "
                                       "DUALVITOK_MAX_PARAMS to a larger count")

    def estimate_num_parameters(self) -> int:
        """The parameter count (buffers included) from the sizes alone, within about 2% of the built model's.

        Closed form over the weight matrices and convolutions (biases and norms left out), so it is instant even for
        a config that would not fit in memory.
        """
        se, sq, sd, pe, pq, pd = (self.semantic_encoder, self.semantic_quantizer, self.semantic_decoder,
                                  self.pixel_encoder, self.pixel_quantizer, self.pixel_decoder)

        def blocks(n: int, c: int, ratio: float) -> int:  # attention (qkv, proj) + MLP
            return n * int((4 + 2 * ratio) * c * c)

        def res(cin: int, cout: int, zq: int = 0) -> int:  # two 3x3 convs, a 1x1 shortcut, spatial norms
            return 9 * cin * cout + 9 * cout * cout + (cin * cout if cin != cout else 0) + 2 * zq * (cin + cout)

        def attn(c: int, zq: int = 0) -> int:
            return 4 * c * c + 2 * zq * c

        n = 0
        tower = se.semantic_encoder_config
        if se.timm_model is None:
            merged = tower.embed_dim * tower.spatial_merge_size ** 2
            n += tower.in_channels * tower.temporal_patch_size * tower.patch_size ** 2 * tower.embed_dim
            n += blocks(tower.depth, tower.embed_dim, tower.mlp_ratio) + merged * merged + merged * tower.hidden_size
            n += tower.hidden_size * se.embed_dim
        n += blocks(se.num_blocks, se.embed_dim, se.mlp_ratio) + se.embed_dim * se.z_channels
        n += sd.z_channels * sd.embed_dim + blocks(sd.num_blocks, sd.embed_dim, sd.mlp_ratio)
        n += sd.embed_dim * sd.output_channels
        for q in (sq, pq):
            n += q.codebook_size * q.dim + (q.dim * q.dim if q.type == "SimVQ" else 0)
        c = pe.ch
        n += 9 * pe.in_channels * c
        for i, mult in enumerate(pe.ch_mult):
            out = pe.ch * mult
            n += res(c, out) + (pe.num_res_blocks - 1) * res(out, out)
            c = out
            if i in pe.attn_resolutions:
                n += pe.num_res_blocks * attn(out)
            if i < len(pe.ch_mult) - 1:
                n += 9 * out * out // 4  # DC down block
        n += 2 * res(c, c) + attn(c) + 9 * c * pe.z_channels * (2 if pe.double_z else 1)
        n += pe.z_channels * pe.embed_dim + pd.embed_dim * pd.z_channels
        zq, c = pd.embed_dim, pd.ch * pd.ch_mult[-1]
        n += 9 * pd.z_channels * c + 2 * res(c, c, zq) + attn(c, zq)
        for i in reversed(range(len(pd.ch_mult))):
            out = pd.ch * pd.ch_mult[i]
            n += res(c, out, zq) + pd.num_res_blocks * res(out, out, zq)
            c = out
            if i in pd.attn_resolutions:
                n += (pd.num_res_blocks + 1) * attn(out, zq)
            if i > 0:
                n += 9 * out * out * 4  # DC up block
        return n + 2 * zq * c + 9 * c * pd.out_channels

    def check_weights_size(self, num_bytes: int, source: str | os.PathLike = "the weights file") -> None:
        """Raise ``ValueError`` when a weights file of ``num_bytes`` is far too small for this config.

        The bound is generous (half the size of the estimated count in bfloat16), so it only catches a config that
        does not belong to the weights (e.g. the released architecture assumed for a tiny checkpoint) before the
        model is built.
        """
        estimate = self.estimate_num_parameters()
        if num_bytes < estimate:  # < 0.5 * estimate * 2 bytes
            raise ValueError(f"{os.fspath(source)} has {num_bytes:,} bytes, far too small for the config's about "
                             f"{estimate:,} parameters (at least {2 * estimate:,} bytes in bfloat16): the config "
                             "does not describe these weights")

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
        """Read a ``config.json`` written by :meth:`to_json_file`; any problem is a ``ValueError`` naming the file."""
        data = _read_json(path)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "model_type"}
        return _with_source(path, cls.from_dict, data, strict=strict)

    @classmethod
    def from_reference(cls, data: dict[str, Any] | str | os.PathLike) -> DualViTokConfig:
        """Convert a reference-layout config (dict or JSON path; a ``vq_model.config`` wrapper is unwrapped).

        Keys this library does not model (e.g. ``infer_interpolate``, ``vq_ckpt``) are logged and ignored.
        """
        source = None
        if not isinstance(data, dict):
            source, data = data, _read_json(data)
            if not isinstance(data, dict):
                raise ValueError(f"{os.fspath(source)}: a config must be a JSON object, got {describe(data)}")
        for wrapper in ("vq_model", "config"):
            if wrapper in data and isinstance(data[wrapper], dict) and "semantic_encoder" not in data:
                data = data[wrapper]
        data = {k: v for k, v in data.items() if k not in ("model_type", "type")}
        if source is None:
            return cls.from_dict(data, strict=False)
        return _with_source(source, cls.from_dict, data, strict=False)


def _read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON of ``path``; unreadable or invalid files raise ``ValueError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{os.fspath(path)}: not a valid JSON config ({e}); re-download or re-save it") from e


def _with_source(path: str | os.PathLike, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with config errors prefixed by the file they come from."""
    try:
        return fn(*args, **kwargs)
    except ConfigFieldError as e:
        raise ConfigFieldError(e.field, f"{e.message} (in {os.fspath(path)})") from None
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None


