"""Saving and loading through local folders and the Hugging Face Hub.

Our format is ``config.json`` (the nested :class:`DualViTokConfig`, ``model_type: dualvitok``) plus
``model.safetensors``, loaded with strict keys. ``from_pretrained`` also accepts a folder or Hub repo in the
reference layout (ILLUME+ ``pytorch_model.bin`` or safetensors in reference key names, with an optional reference
config) and converts it; without a config there, the released ``dualvitok_anyres_max512`` architecture is assumed.
Built on ``huggingface_hub`` (``hf_hub_download``, ``HfApi.upload_folder``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from ._utils import atomic_write

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REFERENCE_CONFIG_NAMES = ("reference_config.json", CONFIG_NAME)
REFERENCE_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "model.pt",
                           "model.bin", "reference_state_dict.safetensors")

M = TypeVar("M", bound="HubMixin")


class LoadingError(RuntimeError):
    """A checkpoint does not fit the model (missing / unexpected keys or shape mismatches)."""


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class _Resolver:
    """Finds files in a local folder or a Hub repo, with clear errors offline."""

    def __init__(self, source: str | os.PathLike, revision: str | None, cache_dir: str | None, token, local_files_only):
        self.source = os.fspath(source)
        self.is_local = os.path.isdir(self.source)
        self.revision, self.cache_dir, self.token, self.local_files_only = revision, cache_dir, token, local_files_only
        self.offline_misses: list[str] = []

    def find(self, filename: str) -> str | None:
        if self.is_local:
            path = os.path.join(self.source, filename)
            return path if os.path.isfile(path) else None
        if os.path.exists(self.source) or self.source.startswith((".", "/", "~")) or self.source.count("/") > 1:
            raise FileNotFoundError(f"{self.source!r} is not a model folder (no such directory) nor a Hub repo id "
                                    "(owner/name)")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            return hf_hub_download(self.source, filename, revision=self.revision, cache_dir=self.cache_dir,
                                   token=self.token, local_files_only=bool(self.local_files_only))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: check it first
            self.offline_misses.append(filename)
            return None
        except EntryNotFoundError:
            return None
        except HFValidationError as e:
            raise FileNotFoundError(f"{self.source!r} is not a local folder and not a valid Hub repo id: {e}") from e
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(f"Hub repo {self.source!r} not found (or private: pass token=...)") from e

    def not_found(self, what: str) -> OSError:
        if self.offline_misses:
            return OSError(
                f"could not load {what} from {self.source!r}: the Hub cannot be reached (offline or HF_HUB_OFFLINE=1) "
                f"and {self.offline_misses} are not in the local cache. Download once with "
                f"`huggingface-cli download {self.source} --local-dir DIR` and pass DIR, or go online"
            )
        where = "folder" if self.is_local else "Hub repo"
        return FileNotFoundError(f"no {what} in {where} {self.source!r}")


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for :class:`dualvitok.DualViTok`."""

    config: object

    # --------------------------------------------------------------------------------------- state dicts
    def load_checked_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """``load_state_dict`` with one readable report of missing keys, unexpected keys and shape mismatches."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        mismatched = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if mismatched:
            problems.append("shape mismatches: " + _summarise(
                [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})" for k in mismatched]))
        if problems and (strict or mismatched):
            raise LoadingError(
                "the checkpoint does not fit the model configuration:\n  " + "\n  ".join(problems)
                + "\nCheck that the config matches the weights (or pass strict=False to load a partial checkpoint)."
            )
        if problems:
            logger.warning("loading with strict=False: %s", "; ".join(problems))
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)

    # --------------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **push_kwargs) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (atomically per file)."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(directory / CONFIG_NAME)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_write(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt", "library": "dualvitok"})
        if push_to_hub:
            self.push_to_hub(**push_kwargs)
        return directory

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload DualViTok", revision: str | None = None) -> str:
        """Upload ``config.json`` + ``model.safetensors`` to a Hub model repo (created if needed); returns its URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision)
        return str(getattr(info, "commit_url", info))

    # --------------------------------------------------------------------------------------- load
    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | None = None,
        local_files_only: bool | None = None,
        strict: bool = True,
        use_ema: bool = False,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> M:
        """Load a model from a folder or a Hub repo, in this library's format or the reference layout.

        Args:
            pretrained_model_name_or_path: local folder, or Hub repo id such as ``ILLUME-MLLM/dualvitok``.
            revision, cache_dir, token, local_files_only: passed to ``huggingface_hub``.
            strict: raise on missing / unexpected keys.
            use_ema: for reference training checkpoints, load the ``ema`` weights.
            map_location: device to place the weights on.
            dtype: cast floating-point weights (e.g. ``torch.bfloat16``).
        """
        from .configuration import DualViTokConfig
        from .convert import convert_reference_state_dict, load_weights

        resolver = _Resolver(pretrained_model_name_or_path, revision, cache_dir, token, local_files_only)
        config_path = resolver.find(CONFIG_NAME)
        our_format = False
        config_data = None
        if config_path is not None:
            with open(config_path, encoding="utf-8") as f:
                config_data = json.load(f)
            our_format = config_data.get("model_type") == "dualvitok"
        if our_format:
            weights_path = resolver.find(WEIGHTS_NAME)
            if weights_path is None:
                raise resolver.not_found(WEIGHTS_NAME)
            config = DualViTokConfig.from_json_file(config_path)
            from safetensors.torch import load_file

            state_dict = load_file(weights_path)
        else:
            reference_config = None
            for name in REFERENCE_CONFIG_NAMES:
                path = config_path if name == CONFIG_NAME else resolver.find(name)
                if path is None:
                    continue
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if "semantic_encoder" in data or "vq_model" in data:
                    reference_config = data
                    break
            weights_path = next((p for p in map(resolver.find, REFERENCE_WEIGHTS_NAMES) if p is not None), None)
            if weights_path is None:
                raise resolver.not_found(f"weights (one of {list(REFERENCE_WEIGHTS_NAMES)})")
            if reference_config is None:
                logger.info("no DualViTok config in %s: assuming the released dualvitok_anyres_max512 architecture",
                            pretrained_model_name_or_path)
                config = DualViTokConfig()
            else:
                config = DualViTokConfig.from_reference(reference_config)
            state_dict = convert_reference_state_dict(load_weights(weights_path, use_ema=use_ema))
        model = cls(config)
        model.load_checked_state_dict(state_dict, strict=strict)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.to(map_location).eval()

