"""Finding pretrained weights of the metric networks (LPIPS backbones, FID Inception) without surprises offline.

Search order for a weights file: the explicit path given by the caller, then an environment variable
(``DUALVITOK_FID_WEIGHTS``, ``DUALVITOK_LPIPS_VGG_WEIGHTS``, ``DUALVITOK_LPIPS_ALEX_WEIGHTS``), then the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file name>``, where torchvision and pytorch-fid keep their downloads), then, only if
``allow_download`` is true and ``HF_HUB_OFFLINE``/``DUALVITOK_OFFLINE`` are not set, a download into that cache.
Files are loaded with ``torch.load(weights_only=True)`` or safetensors, never as pickles.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class WeightsNotFoundError(FileNotFoundError):
    """Metric network weights are neither given, in the cache, nor downloadable."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where a metric network's weights come from."""

    name: str  # human name, e.g. "FID Inception (pt_inception-2015-12-05)"
    url: str  # official download URL
    env: str  # environment variable holding a local path
    cli_flag: str  # the ``dualvitok evaluate`` option taking a path

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename


FID_INCEPTION = WeightsSpec("FID Inception (pytorch-fid pt_inception-2015-12-05)",
                            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                            "pt_inception-2015-12-05-6726825d.pth", "DUALVITOK_FID_WEIGHTS", "--fid-weights")
LPIPS_VGG = WeightsSpec("LPIPS VGG16 backbone (torchvision IMAGENET1K_V1)",
                        "https://download.pytorch.org/models/vgg16-397923af.pth", "DUALVITOK_LPIPS_VGG_WEIGHTS",
                        "--lpips-weights")
LPIPS_ALEX = WeightsSpec("LPIPS AlexNet backbone (torchvision IMAGENET1K_V1)",
                         "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "DUALVITOK_LPIPS_ALEX_WEIGHTS",
                         "--lpips-weights")


def offline() -> bool:
    """True when downloads are disabled (``HF_HUB_OFFLINE`` or ``DUALVITOK_OFFLINE`` set to a true value)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "DUALVITOK_OFFLINE"))


def find_local_weights(spec: WeightsSpec, path: str | os.PathLike | None = None) -> Path | None:
    """The first existing file among ``path``, ``$spec.env`` and the torch hub cache; None if there is none.

    Raises:
        WeightsNotFoundError: if ``path`` (or the environment variable) names a file that does not exist.
    """
    for source, candidate in (("argument", path), (spec.env, os.environ.get(spec.env))):
        if candidate:
            p = Path(candidate).expanduser()
            if not p.is_file():
                raise WeightsNotFoundError(f"{spec.name}: weights file {p} (from {source}) does not exist")
            return p
    cached = spec.cache_path()
    return cached if cached.is_file() else None


def missing_message(spec: WeightsSpec) -> str:
    return (f"{spec.name} weights not found. Download {spec.url} on a machine with internet and either pass its path "
            f"({spec.cli_flag} PATH, or the weights_path argument), set {spec.env}=PATH, or copy it to "
            f"{spec.cache_path()} (the torch hub cache; set TORCH_HOME to move it)")


def resolve_weights(spec: WeightsSpec, path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Path of a local weights file for ``spec``, downloading it into the torch hub cache only if allowed.

    Raises:
        WeightsNotFoundError: with instructions, if no file is found and downloading is disabled or fails.
    """
    local = find_local_weights(spec, path)
    if local is not None:
        return local
    if not allow_download or offline():
        raise WeightsNotFoundError(missing_message(spec) + " (downloads are disabled: offline mode)")
    target = spec.cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from %s", spec.name, spec.url)
    try:
        torch.hub.download_url_to_file(spec.url, str(target), progress=True)
    except Exception as e:  # no network, proxy, HTTP error ...
        raise WeightsNotFoundError(missing_message(spec) + f" (download failed: {e})") from e
    return target


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state dict from safetensors or a torch file (``weights_only=True``; unwraps a ``state_dict`` key)."""
    from .._weights import read_state_dict

    return read_state_dict(path)
