"""Checkpoint layouts of the unified MLLM: this library's folder layout and the released ILLUME+ origin layout.

ILLUME+ origin format (``ILLUME-MLLM/illume_plus-qwen2_5-3b`` / ``-7b``, loaded in the reference by
``illume.model.builder.load_pretrained_model``): one Qwen2 checkpoint folder whose ``config.json`` has
``model_type: illume_qwen2`` plus ``special_tokens_ids``, ``mm_hidden_size``, ``mm_projector``, ``mm_vision_tower``,
and whose (sharded) weights hold the LLM (``model.*``, ``lm_head.*``), the fine-tuned vision tower
(``model.vision_tower.semantic_encoder.*`` = the Qwen2-VL ViT, ``model.vision_tower.pixel_encoder.*`` = the MoVQ
encoder) and the adapters (``model.mm_projector.projector_{1,2}.{0,2}.*``); the tokenizer files sit beside them.
The DualViTok that decodes codes is separate (``ILLUME-MLLM/dualvitok``). Loading reads the LLM with
``Qwen2ForCausalLM.from_pretrained`` (config re-typed as ``qwen2``; the vision keys are skipped there) and the vision
keys directly from the shards. The Hugging Face remote-code format (``-hf`` repos) is not supported.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._utils import atomic_write
from .._utils.deps import require
from ..model import DualViTok
from .adapters import DualVisionTower
from .config import UnifiedConfig
from .vocabulary import VisionVocabulary

if TYPE_CHECKING:
    from .model import UnifiedMLLM

logger = logging.getLogger(__name__)

UNIFIED_CONFIG_NAME = "unified_config.json"
ADAPTERS_NAME = "vision_adapters.safetensors"
LANGUAGE_MODEL_DIR = "language_model"
VISION_TOKENIZER_DIR = "vision_tokenizer"
ILLUME_TOWER_PREFIX, ILLUME_PROJECTOR_PREFIX = "model.vision_tower.", "model.mm_projector."
DEFAULT_VISION_TOKENIZER = "ILLUME-MLLM/dualvitok"


def save_unified(model, save_directory: str | os.PathLike) -> Path:
    """Write ``model`` (a ``UnifiedMLLM``) in this library's layout; returns the folder."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.language_model.save_pretrained(directory / LANGUAGE_MODEL_DIR)
    model.tokenizer.save_pretrained(directory / LANGUAGE_MODEL_DIR)
    model.vision_tokenizer.save_pretrained(directory / VISION_TOKENIZER_DIR)
    tensors = {f"vision_tower.{k}": v for k, v in model.vision_tower.state_dict().items()}
    tensors.update({f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(directory / ADAPTERS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "library": "dualvitok"})
    model.config.to_json_file(directory / UNIFIED_CONFIG_NAME)
    return directory


def load_unified(cls, source: str | os.PathLike, vision_tokenizer, dtype: torch.dtype | None, refiner, **hub_kwargs):
    """Load either layout from a folder or a Hub repo (see ``UnifiedMLLM.from_pretrained``)."""
    path = _resolve_folder(source, **hub_kwargs)
    if (path / UNIFIED_CONFIG_NAME).is_file():
        return _load_own_layout(cls, path, vision_tokenizer, dtype, refiner)
    if _is_illume_layout(path):
        return _load_illume_layout(cls, path, vision_tokenizer, dtype, refiner)
    raise FileNotFoundError(f"{path} is neither a UnifiedMLLM folder (no {UNIFIED_CONFIG_NAME}) nor an ILLUME+ "
                            "checkpoint (config.json with model_type 'illume_qwen2' or mm_projector fields)")


def _require_transformers():
    return require("transformers", "unified", "the unified MLLM")


def _dtype_kwargs(transformers, dtype: torch.dtype | None) -> dict:
    """``from_pretrained`` dtype argument: ``dtype`` (transformers >= 4.56) or ``torch_dtype`` (older)."""
    if dtype is None:
        return {}
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _resolve_folder(source: str | os.PathLike, **hub_kwargs) -> Path:
    from .._hubfiles import snapshot_folder

    return snapshot_folder(source, what="the unified model", **hub_kwargs)


def _load_vision_tokenizer(spec, default: str | os.PathLike | None) -> DualViTok:
    if isinstance(spec, DualViTok):
        return spec
    from ..loading import load_model

    spec = spec if spec is not None else default
    if spec is None:
        raise ValueError("pass vision_tokenizer= (a DualViTok, folder, Hub id or registered name)")
    return load_model(spec)


def _load_own_layout(cls, path: Path, vision_tokenizer, dtype, refiner) -> UnifiedMLLM:
    transformers = _require_transformers()
    from .._weights import read_state_dict

    config = UnifiedConfig.from_json_file(path / UNIFIED_CONFIG_NAME)
    kwargs = _dtype_kwargs(transformers, dtype)
    # never run code shipped with a checkpoint: both layouts are plain Qwen2 (trust_remote_code=False, explicitly)
    language_model = transformers.AutoModelForCausalLM.from_pretrained(path / LANGUAGE_MODEL_DIR,
                                                                       trust_remote_code=False, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / LANGUAGE_MODEL_DIR, padding_side="left",
                                                           trust_remote_code=False)
    vq = _load_vision_tokenizer(vision_tokenizer, path / VISION_TOKENIZER_DIR)
    model = cls(language_model, tokenizer, vq, config, refiner=refiner)
    state = read_state_dict(path / ADAPTERS_NAME)
    _load_adapters(model, {k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")},
                   {k[len("mm_projector."):]: v for k, v in state.items() if k.startswith("mm_projector.")})
    return model


def _load_adapters(model: UnifiedMLLM, tower: dict[str, Tensor], projector: dict[str, Tensor]) -> None:
    tower = {k: v for k, v in tower.items() if not k.endswith("inv_freq")}
    for name, module, state in (("vision tower", model.vision_tower, tower), ("projector", model.mm_projector,
                                                                               projector)):
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"the {name} weights do not fit: missing {result.missing_keys[:5]}, unexpected "
                             f"{result.unexpected_keys[:5]} (is the vision tokenizer's architecture the right one?)")


def _is_illume_layout(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("model_type") == "illume_qwen2" or "mm_projector" in data or "special_tokens_ids" in data


def _read_prefixed(path: Path, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Tensors whose names start with one of ``prefixes``, from (sharded) safetensors or .bin weights (only those
    tensors are read from safetensors files)."""
    from .._weights import WeightFiles

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    out: dict[str, Tensor] = {}
    for file in files:
        with WeightFiles(file) as weights:
            out.update({k: weights.get(k) for k in weights.keys() if k.startswith(prefixes)})
    return out


def _load_illume_layout(cls, path: Path, vision_tokenizer, dtype, refiner) -> UnifiedMLLM:
    """ILLUME+ origin format: a Qwen2 checkpoint whose config is ``illume_qwen2`` and whose weights also hold
    ``model.vision_tower.{semantic_encoder,pixel_encoder}.*`` and ``model.mm_projector.projector_{1,2}.*``."""
    transformers = _require_transformers()
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    lm_config = dict(data, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    lm_config = transformers.Qwen2Config.from_dict(lm_config)
    kwargs = _dtype_kwargs(transformers, dtype)
    language_model = transformers.Qwen2ForCausalLM.from_pretrained(path, config=lm_config, trust_remote_code=False,
                                                                   **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left", use_fast=True,
                                                           trust_remote_code=False)
    vq = _load_vision_tokenizer(vision_tokenizer, DEFAULT_VISION_TOKENIZER)
    vocab = VisionVocabulary.from_tokenizer(tokenizer, vq.config.semantic_quantizer.codebook_size,
                                            vq.config.pixel_quantizer.codebook_size)
    if "special_tokens_ids" in data and list(data["special_tokens_ids"]) != vocab.marker_ids:
        raise ValueError(f"config special_tokens_ids {data['special_tokens_ids']} differ from the tokenizer's "
                         f"{vocab.marker_ids}")
    weights = _read_prefixed(path, (ILLUME_TOWER_PREFIX, ILLUME_PROJECTOR_PREFIX))
    tower = {k[len(ILLUME_TOWER_PREFIX):]: v for k, v in weights.items() if k.startswith(ILLUME_TOWER_PREFIX)}
    projector = {k[len(ILLUME_PROJECTOR_PREFIX):]: v for k, v in weights.items()
                 if k.startswith(ILLUME_PROJECTOR_PREFIX)}
    if "projector_1.0.weight" not in projector or "projector_2.0.weight" not in projector:
        raise ValueError(f"no {ILLUME_PROJECTOR_PREFIX}projector_1/2 weights in {path}")
    config = UnifiedConfig(first_vision_token_id=vocab.first_id, semantic_codebook_size=vocab.semantic_codebook_size,
                           pixel_codebook_size=vocab.pixel_codebook_size,
                           semantic_dim=projector["projector_1.0.weight"].shape[1],
                           pixel_dim=projector["projector_2.0.weight"].shape[1])
    tower_cfg = data.get("mm_vision_tower") if isinstance(data.get("mm_vision_tower"), dict) else {}
    if "max_pixels" in tower_cfg:
        config.understanding_min_pixels = int(tower_cfg.get("min_pixels", config.understanding_min_pixels))
        config.understanding_max_pixels = int(tower_cfg["max_pixels"])
    model = cls(language_model, tokenizer, vq, config, refiner=refiner)
    if tower:
        _load_adapters(model, tower, projector)
    else:
        logger.warning("no %s* weights in %s: using the vision tokenizer's encoders", ILLUME_TOWER_PREFIX, path)
        model.vision_tower = DualVisionTower.from_dualvitok(vq)
        _load_adapters(model, {k: v for k, v in model.vision_tower.state_dict().items()}, projector)
    return model


class UnifiedCheckpointMixin:
    """``save_pretrained`` / ``from_pretrained`` of :class:`~dualvitok.unified.UnifiedMLLM` (this library's layout
    and the released ILLUME+ layout); mixed into the model class, so this module never imports it."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write this library's layout (see ``docs/unified.md``): ``unified_config.json``, ``language_model/``
        (LLM + tokenizer, Hugging Face format), ``vision_adapters.safetensors``, ``vision_tokenizer/``."""
        return save_unified(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        vision_tokenizer: DualViTok | str | os.PathLike | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        refiner: Callable | None = None, **hub_kwargs) -> UnifiedMLLM:
        """Load this library's layout or the released ILLUME+ (origin-format) layout.

        Args:
            pretrained_model_name_or_path: a folder or a Hub repo id (e.g. ``ILLUME-MLLM/illume_plus-qwen2_5-3b``).
            vision_tokenizer: the DualViTok for decoding (instance, folder, Hub id or registered name). Our layout
                ships one; for ILLUME+ checkpoints it defaults to ``ILLUME-MLLM/dualvitok``.
            dtype: dtype of the language model (e.g. ``torch.bfloat16``); the vision modules stay float32.
                ``torch_dtype`` is a deprecated alias.
            device: where to put everything.
            refiner: optional diffusion decoder callable.
            hub_kwargs: ``revision``, ``subfolder``, ``cache_dir``, ``force_download``, ``token``,
                ``local_files_only`` for ``snapshot_download``.
        """
        from .._weights import dtype_keyword

        dtype = dtype_keyword(dtype, hub_kwargs.pop("torch_dtype", None), "UnifiedMLLM.from_pretrained")
        model = load_unified(cls, pretrained_model_name_or_path, vision_tokenizer, dtype, refiner, **hub_kwargs)
        return model.to(device).eval()
