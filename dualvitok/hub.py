"""Saving and loading through local folders and the Hugging Face Hub.

Our format is ``config.json`` (the nested :class:`DualViTokConfig`, ``model_type: dualvitok``), the weights as
``model.safetensors`` or, above ``max_shard_size`` (5 GB), safetensors shards with a ``model.safetensors.index.json``
(``huggingface_hub.save_torch_state_dict``), and a model card ``README.md`` (``huggingface_hub.ModelCard``); loaded
with strict keys. ``from_pretrained`` also accepts a folder or Hub repo in the reference layout (ILLUME+
``pytorch_model.bin`` or safetensors in reference key names, with an optional reference config) and converts it;
without a config there, the released ``dualvitok_anyres_max512`` architecture is assumed.

Loading builds the model with its parameters on the ``meta`` device, checks the file's names, shapes and dtypes
against it before reading any data, then streams the tensors in (cast, checked for NaN/Inf) and assigns them
(``load_state_dict(assign=True)``): peak memory is about one copy of the weights. Files are found by
``dualvitok._hubfiles`` (one Hub request for the file list, the local cache when offline) and read by
``dualvitok._weights`` (safetensors / ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._hubfiles import DEMO_NAMES, HubFiles
from ._weights import FLOAT_DTYPES, LoadingError, WeightFiles, all_finite, dtype_keyword, parameters_on_meta
from ._weights import check_weights as _check_weights

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
MAX_SHARD_SIZE = "5GB"
REFERENCE_CONFIG_NAMES = ("reference_config.json", CONFIG_NAME)
REFERENCE_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "model.pt",
                           "model.bin", "reference_state_dict.safetensors")

M = TypeVar("M", bound="HubMixin")

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME", "HubMixin", "LoadingError"]


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _fit_problems(own: Mapping[str, tuple[int, ...]], theirs: Mapping[str, tuple[int, ...]]):
    """(problems, mismatched, missing): readable lines for missing / unexpected keys and shape mismatches."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    mismatched = sorted(k for k in set(own) & set(theirs) if tuple(own[k]) != tuple(theirs[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append("shape mismatches: " + _summarise(
            [f"{k} (checkpoint {tuple(theirs[k])}, model {tuple(own[k])})" for k in mismatched]))
    return problems, mismatched, missing


def _raise_unfit(problems: list[str], source: str, hint: str | None) -> None:
    raise LoadingError(
        f"the checkpoint {source} does not fit the model configuration:\n  " + "\n  ".join(problems)
        + "\n" + (hint or "Check that the config matches the weights (or pass strict=False to load a partial "
                           "checkpoint).")
    )


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoadingError(f"{path} is not a readable JSON file ({e}); fix or replace it (save_pretrained writes "
                           "a valid config.json)") from None


def _weight_files(files: HubFiles, names: tuple[str, ...]) -> list[str] | None:
    """The first of ``names`` present (a single file), else the shards of ``model.safetensors.index.json``."""
    for name in names:
        path = files.find(name)
        if path is not None:
            return [path]
    index = files.find(WEIGHTS_INDEX_NAME)
    if index is None:
        return None
    from ._weights import shards_from_index

    shards = []
    for shard in shards_from_index(index):
        path = files.find(os.path.basename(shard))
        if path is None:
            raise files.not_found(f"shard {os.path.basename(shard)} (named by {WEIGHTS_INDEX_NAME})")
        shards.append(path)
    return shards


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for :class:`dualvitok.DualViTok`."""

    config: object

    # --------------------------------------------------------------------------------------- state dicts
    def load_checked_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True,
                                check_weights: bool = True) -> None:
        """``load_state_dict`` with one readable report of missing keys, unexpected keys and shape mismatches.

        ``check_weights`` refuses NaN/Inf values and non-float tensors for float weights (see
        :func:`dualvitok._weights.check_weights`).
        """
        own = self.state_dict()
        problems, mismatched, _ = _fit_problems({k: v.shape for k, v in own.items()},
                                                {k: v.shape for k, v in state_dict.items()})
        if problems and (strict or mismatched):
            _raise_unfit(problems, "", None)
        if problems:
            logger.warning("loading with strict=False: %s", "; ".join(problems))
        if check_weights:
            _check_weights({k: v for k, v in state_dict.items() if k in own}, own)
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)

    # --------------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, *,
                        max_shard_size: int | str = MAX_SHARD_SIZE, model_card: Any = None,
                        evaluation: Mapping[str, float] | None = None, license: str = "apache-2.0",
                        **push_kwargs) -> Path:
        """Write ``config.json``, the weights and a model card ``README.md`` into ``save_directory``.

        Args:
            save_directory: the folder (created if needed); each file is replaced atomically.
            push_to_hub: then upload the folder (``push_kwargs`` go to :meth:`push_to_hub`).
            max_shard_size: weights above this size are split into safetensors shards plus
                ``model.safetensors.index.json`` (``huggingface_hub.save_torch_state_dict``); default 5 GB.
            model_card: a ``huggingface_hub.ModelCard`` or card text to write instead of the generated card.
            evaluation: metrics to list in the card (e.g. ``{"PSNR": 24.1, "rFID": 1.2}``); default: the model's
                ``evaluation_results`` attribute, if set.
            license: the card's license (SPDX id as the Hub spells it).

        Refuses (``RuntimeError``) a model whose weights :func:`~dualvitok.inference.optimize_for_inference` rounded.
        """
        from huggingface_hub import save_torch_state_dict

        refusal = getattr(self, "_save_refusal", None)  # set by dualvitok.inference.optimize_for_inference
        if refusal:
            raise RuntimeError(f"cannot save_pretrained: {refusal}")

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with tempfile.TemporaryDirectory(dir=directory, prefix=".save-") as tmp:
            save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_size,
                                  metadata={"format": "pt", "library": "dualvitok"})
            _install_weight_files(Path(tmp), directory)
        del tensors
        self.config.to_json_file(directory / CONFIG_NAME)
        card = model_card if model_card is not None else self.model_card(evaluation=evaluation, license=license)
        _write_card(card, directory / CARD_NAME)
        if push_to_hub:
            self.push_to_hub(**push_kwargs)
        return directory

    def model_card(self, evaluation: Mapping[str, float] | None = None, license: str = "apache-2.0",
                   repo_id: str | None = None):
        """A ``huggingface_hub.ModelCard`` for this model: metadata (``library_name: dualvitok``, license, tags), the
        architecture, where the weights come from and, when known, an evaluation table."""
        from ._card import build_model_card

        return build_model_card(self, evaluation=evaluation, license=license, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload DualViTok", revision: str | None = None,
                    max_shard_size: int | str = MAX_SHARD_SIZE, model_card: Any = None,
                    evaluation: Mapping[str, float] | None = None, license: str = "apache-2.0") -> str:
        """Upload ``config.json``, the weights and the model card to a Hub model repo (created if needed); returns
        the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if model_card is None:
            model_card = self.model_card(evaluation=evaluation, license=license, repo_id=repo_id)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size, model_card=model_card)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision)
        return str(getattr(info, "commit_url", info))

    # --------------------------------------------------------------------------------------- load
    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: Any = None,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        strict: bool = True,
        use_ema: bool = False,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        check_weights: bool = True,
        torch_dtype: torch.dtype | str | None = None,
    ) -> M:
        """Load a model from a folder or a Hub repo, in this library's format or the reference layout.

        Args:
            pretrained_model_name_or_path: local folder, a Hub repo id such as ``ILLUME-MLLM/dualvitok``, or
                ``"dualvitok-demo"`` (the small demo model shipped with the package).
            config: a :class:`DualViTokConfig` to use instead of the one stored with the weights.
            revision, subfolder, cache_dir, force_download, token, local_files_only: as in ``huggingface_hub``.
                Without network (or with ``HF_HUB_OFFLINE=1``) only the local cache is used, and a missing file
                fails at once with a message saying how to download it.
            strict: raise on missing / unexpected keys.
            use_ema: for reference training checkpoints, load the ``ema`` weights.
            map_location: device to place the weights on.
            dtype: dtype of the floating-point weights (default float32, whatever the file stores), e.g.
                ``torch.bfloat16`` or ``"bfloat16"``. ``torch_dtype`` is a deprecated alias.
            check_weights: refuse NaN/Inf values and integer / bool / fp8 tensors (one pass over the weights).

        Raises:
            LoadingError: the files are unreadable or do not fit the configuration (names the file and the keys).
            OSError: a Hub repo that is not cached cannot be downloaded (offline).
        """
        from .assets import demo_model_path
        from .configuration import DualViTokConfig
        from .convert import config_layout

        dtype = dtype_keyword(dtype, torch_dtype, f"{cls.__name__}.from_pretrained")
        source = pretrained_model_name_or_path
        if str(source) in DEMO_NAMES and not os.path.isdir(source):
            source = demo_model_path()
        files = HubFiles(source, revision=revision, subfolder=subfolder, cache_dir=cache_dir,
                         force_download=force_download, token=token, local_files_only=local_files_only)
        config_path = files.find(CONFIG_NAME)
        config_data = _read_json(config_path) if config_path is not None else None
        layout = config_layout(config_data)
        if config_data is not None and not isinstance(config_data, dict):
            raise LoadingError(f"{config_path} must hold a JSON object (the model config), not "
                               f"{type(config_data).__name__}")
        hint = None
        if layout == "dualvitok":
            weights = _weight_files(files, (WEIGHTS_NAME,))
            if weights is None:
                raise files.not_found(f"{WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME} with shards)")
            if config is None:
                config = _config_from_file(DualViTokConfig, config_path)
            reference = False
        else:
            reference_config = config_data if layout == "reference" else None
            if reference_config is None:
                path = files.find(REFERENCE_CONFIG_NAMES[0])
                data = _read_json(path) if path is not None else None
                if config_layout(data) == "reference":
                    reference_config, config_path = data, path
            weights = _weight_files(files, REFERENCE_WEIGHTS_NAMES)
            if weights is None:
                raise files.not_found(f"weights (one of {list(REFERENCE_WEIGHTS_NAMES)})")
            if config is None and reference_config is None:
                logger.info("no DualViTok config in %s: assuming the released dualvitok_anyres_max512 architecture",
                            files.where)
                config = DualViTokConfig()
                hint = (f"There is no DualViTok config.json in {files.where}, so the released dualvitok_anyres_max512 "
                        "architecture was assumed; put the config.json that belongs to these weights beside them "
                        "(save_pretrained writes one), or pass config=...")
            elif config is None:
                try:
                    config = DualViTokConfig.from_reference(reference_config)
                except (ValueError, TypeError, KeyError) as e:
                    raise LoadingError(f"{config_path}: not a valid DualViTok reference config: {e}") from None
            reference = True
        with WeightFiles(weights, use_ema=use_ema) as stream:
            model = _build_and_load(cls, config, stream, reference=reference, strict=strict, dtype=dtype,
                                    device=map_location, check=check_weights, hint=hint)
        model._load_record = {"source": os.fspath(pretrained_model_name_or_path), "layout": "dualvitok"
                              if not reference else "reference", "revision": revision, "subfolder": subfolder,
                              "is_local": files.is_local}
        return model.eval()


def _config_from_file(config_cls, path: str):
    try:
        return config_cls.from_json_file(path)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        text = str(e)
        raise LoadingError(text if os.fspath(path) in text else f"{path}: {text}") from None


def _build_and_load(cls, config, stream: WeightFiles, *, reference: bool, strict: bool, dtype: torch.dtype | None,
                    device: str | torch.device, check: bool, hint: str | None):
    """Build ``cls(config)`` with meta parameters, check the file's names / shapes / dtypes against it, then stream
    the tensors in (converted, cast, checked) and assign them: the weights are held in memory once."""
    from .convert import convert_reference_shape, convert_reference_tensor, reference_key

    with parameters_on_meta():
        model = cls(config)
    own = model.state_dict()
    key_map: dict[str, str] = {}
    for key in stream.keys():
        new = reference_key(key) if reference else key
        if new is not None:
            key_map[new] = key
    shapes = {new: convert_reference_shape(new, stream.shape(old)) if reference else stream.shape(old)
              for new, old in key_map.items()}
    problems, mismatched, missing = _fit_problems({k: v.shape for k, v in own.items()}, shapes)
    if problems and (strict or mismatched):
        _raise_unfit(problems, stream.description, hint)
    if problems:
        logger.warning("loading with strict=False: %s", "; ".join(problems))
    if check:
        bad = [f"{k} ({stream.dtype(key_map[k])})" for k in key_map
               if k in own and own[k].is_floating_point() and stream.dtype(key_map[k]) not in FLOAT_DTYPES]
        if bad:
            raise LoadingError(f"refusing to load {stream.description}: {len(bad)} weights are not "
                               f"float16/bfloat16/float32/float64: {_summarise(bad, 8)}. The file is damaged or not a "
                               "DualViTok float checkpoint; pass check_weights=False to load it anyway")
    device = torch.device(device)
    loaded: dict[str, Tensor] = {}
    for new, target in own.items():
        if new not in key_map:
            continue
        value = stream.get(key_map[new])
        if reference:
            value = convert_reference_tensor(new, value)
        want = (dtype or target.dtype) if target.is_floating_point() else target.dtype
        if check and value.dtype in FLOAT_DTYPES and not all_finite(value):
            raise LoadingError(f"refusing to load {stream.file_of(key_map[new])}: weight {key_map[new]!r} holds NaN "
                               "or Inf. The file is damaged; pass check_weights=False to load it anyway")
        loaded[new] = value.to(device=device, dtype=want)
        del value
    if missing:
        model = cls(config)  # strict=False with missing keys: the rest keeps its initialisation
        model.load_state_dict(loaded, strict=False)
    else:
        model.load_state_dict(loaded, strict=False, assign=True)
    del loaded
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:  # cannot happen with a complete state dict; guard against modules that bypass register_parameter
        raise LoadingError(f"internal error: parameters {_summarise(on_meta)} were not loaded")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _install_weight_files(tmp: Path, directory: Path) -> None:
    """Move freshly written weight files into ``directory`` (each by an atomic rename), then drop stale ones.

    Shards first, then the single file or the index, so a reader never sees an index naming missing shards."""
    written = sorted(p.name for p in tmp.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    for name in written:  # the usual permissions, as atomic_write gives (the writer may create 0600 files)
        os.chmod(tmp / name, 0o666 & ~umask)
    stale = {p.name for p in directory.glob("model*.safetensors*")} - set(written)
    for name in written:
        if name != WEIGHTS_INDEX_NAME:
            os.replace(tmp / name, directory / name)
    if WEIGHTS_INDEX_NAME in written and WEIGHTS_NAME in stale:
        (directory / WEIGHTS_NAME).unlink()  # it would win over the new index
        stale.discard(WEIGHTS_NAME)
    if WEIGHTS_INDEX_NAME in written:
        os.replace(tmp / WEIGHTS_INDEX_NAME, directory / WEIGHTS_INDEX_NAME)
    for name in stale:
        (directory / name).unlink(missing_ok=True)


def _write_card(card: Any, path: Path) -> None:
    from ._utils import atomic_write

    text = card if isinstance(card, str) else str(card)
    with atomic_write(path) as tmp:
        tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
