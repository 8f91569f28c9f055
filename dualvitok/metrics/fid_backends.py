"""rFID conventions users compare with: pytorch-fid's (the default), torch-fidelity's and clean-fid's.

Each backend is a feature extractor (``[B, 3, H, W]`` in [0, 1], exactly representable as uint8, -> ``[B, D]``) and a
Frechet distance, both taken from the package that defines the convention:

* ``pytorch-fid`` (extra ``eval``): :class:`dualvitok.metrics.InceptionFeatures` (pytorch-fid's FID Inception,
  PyTorch bilinear resize to 299) and :func:`dualvitok.metrics.frechet_distance` (equal to pytorch-fid's
  ``calculate_frechet_distance`` within 1e-6, see :mod:`dualvitok.metrics.fid`). Weights
  ``pt_inception-2015-12-05-6726825d.pth``.
* ``torch-fidelity`` (extra ``fidelity``; the ILLUME+ reference evaluation's package): ``torch_fidelity``'s
  ``FeatureExtractorInceptionV3`` (uint8 input, TensorFlow-1 compatible bilinear resize to 299, feature ``2048``) and
  ``torch_fidelity.metric_fid.fid_statistics_to_metric``. Weights ``weights-inception-2015-12-05-6726825d.pth``
  (pytorch-fid's file has the same keys and values and is accepted too).
* ``clean-fid`` (extra ``cleanfid``): clean-fid's "clean" mode, ``cleanfid.resize.build_resizer("clean")`` (PIL
  bicubic on float channels to 299, no quantisation), ``cleanfid.inception_torchscript.InceptionV3W`` and
  ``cleanfid.fid.frechet_distance``. Weights: NVIDIA's TorchScript file ``inception-2015-12-05.pt``, read with
  ``torch.jit.load`` (TorchScript, the only format clean-fid ships; not a Python pickle).

Mean and covariance are always streamed in float64 (:class:`dualvitok.metrics.GaussianStatistics`); they equal
``np.mean``/``np.cov`` of the stacked features, which is what all three packages compute.

Differences from calling the packages directly: weights are never downloaded implicitly (an explicit path, the
environment variable or the torch hub cache, as for the other metric networks; ``allow_download`` to fetch), and
torch-fidelity's file is read with ``torch.load(weights_only=True)`` before the package sees it (torch-fidelity
itself unpickles it with ``weights_only=False``).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._utils.deps import require
from .fid import FIDStatistics, frechet_distance
from .weights import FID_INCEPTION, WeightsSpec, load_state_dict, resolve_weights

FIDELITY_INCEPTION = WeightsSpec(
    "FID Inception (torch-fidelity weights-inception-2015-12-05)",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "DUALVITOK_FIDELITY_WEIGHTS", "--fid-weights")
CLEANFID_INCEPTION = WeightsSpec(
    "FID Inception (clean-fid / StyleGAN2-ADA TorchScript inception-2015-12-05.pt)",
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    "DUALVITOK_CLEANFID_WEIGHTS", "--fid-weights")

FID_BACKENDS = ("pytorch-fid", "torch-fidelity", "clean-fid")
WEIGHTS: dict[str, WeightsSpec] = {"pytorch-fid": FID_INCEPTION, "torch-fidelity": FIDELITY_INCEPTION,
                                   "clean-fid": CLEANFID_INCEPTION}


def _to_uint8(images: Tensor) -> Tensor:
    """[0, 1] images that are multiples of 1/255 -> the same images as uint8 (exact)."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


class TorchFidelityFeatures(nn.Module):
    """torch-fidelity's FID Inception (``inception-v3-compat``, feature ``2048``) on [0, 1] images -> ``[B, 2048]``.

    Args:
        state_dict: the Inception weights (keys as torch-fidelity's / pytorch-fid's file).
    """

    def __init__(self, state_dict: dict[str, Tensor]):
        super().__init__()
        fidelity = require("torch_fidelity.feature_extractor_inceptionv3", "fidelity", "--fid-backend torch-fidelity")
        buffer = io.BytesIO()
        torch.save(dict(state_dict), buffer)  # a plain tensor dict we built: safe for torch-fidelity's torch.load
        buffer.seek(0)
        try:
            self.net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                            feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            raise ValueError(f"not torch-fidelity's FID Inception weights ({str(e)[:200]})") from e

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None,
                        allow_download: bool = False) -> TorchFidelityFeatures:
        """Load ``weights-inception-2015-12-05-6726825d.pth`` (or pytorch-fid's equal file) with weights_only."""
        require("torch_fidelity", "fidelity", "--fid-backend torch-fidelity")
        return cls(load_state_dict(resolve_weights(FIDELITY_INCEPTION, weights_path, allow_download)))

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 2048]`` float32 (torch-fidelity takes uint8)."""
        with torch.no_grad():
            return self.net(_to_uint8(images))[0]


class CleanFIDFeatures(nn.Module):
    """clean-fid's "clean" features: its PIL-bicubic float resize to 299 and its TorchScript Inception -> ``[B, D]``.

    Args:
        weights_path: NVIDIA's ``inception-2015-12-05.pt`` (TorchScript), as clean-fid downloads it.
    """

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        require("cleanfid", "cleanfid", "--fid-backend clean-fid")
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = Path(weights_path)
        with tempfile.TemporaryDirectory() as folder:  # clean-fid reads <folder>/inception-2015-12-05.pt
            link = Path(folder) / "inception-2015-12-05.pt"
            link.symlink_to(path.resolve())
            try:
                with warnings.catch_warnings():  # torch marks torch.jit.load deprecated; clean-fid ships TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    self.net = InceptionV3W(folder, download=False, resize_inside=False)
            except RuntimeError as e:
                raise ValueError(f"{path} is not clean-fid's TorchScript Inception ({str(e)[:200]})") from e
        self.resize: Callable[[np.ndarray], np.ndarray] = build_resizer("clean")

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None,
                        allow_download: bool = False) -> CleanFIDFeatures:
        return cls(resolve_weights(CLEANFID_INCEPTION, weights_path, allow_download))

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> features (as ``cleanfid.fid.get_files_features`` with ``mode="clean"``)."""
        device = next(self.net.parameters(), torch.empty(0)).device
        batch = []
        for image in _to_uint8(images).permute(0, 2, 3, 1).cpu().numpy():  # [H, W, 3] uint8 each
            resized = self.resize(image)  # float32 [299, 299, 3] in 0..255
            batch.append(torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))))
        with torch.no_grad():
            return self.net(torch.stack(batch).to(device)).float()


def _fidelity_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    metric_fid = require("torch_fidelity.metric_fid", "fidelity", "--fid-backend torch-fidelity")
    out = metric_fid.fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    return float(out[metric_fid.KEY_METRIC_FID])


def _cleanfid_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    fid = require("cleanfid.fid", "cleanfid", "--fid-backend clean-fid")
    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated sqrtm(disp=False)
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def _pytorch_fid_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


@dataclass
class FIDBackend:
    """A feature extractor and the Frechet distance of one convention (see the module docstring).

    Attributes:
        name: ``pytorch-fid``, ``torch-fidelity``, ``clean-fid``, or a custom label.
        extractor: ``[B, 3, H, W]`` in [0, 1] -> ``[B, dim]``.
        dim: feature dimension.
        distance: ``(FIDStatistics, FIDStatistics) -> float``.
    """

    name: str
    extractor: nn.Module
    dim: int = 2048
    distance: Callable[[FIDStatistics, FIDStatistics], float] = _pytorch_fid_distance


DISTANCES = {"pytorch-fid": _pytorch_fid_distance, "torch-fidelity": _fidelity_distance,
             "clean-fid": _cleanfid_distance}


def build_fid_backend(name: str = "pytorch-fid", weights_path: str | os.PathLike | None = None,
                      allow_download: bool = False) -> FIDBackend:
    """The FID backend ``name`` with its pretrained Inception.

    Raises:
        ValueError: unknown name. ImportError: the package is missing (names the extra).
        WeightsNotFoundError: no weights file (the message names the file and how to provide it).
    """
    if name == "pytorch-fid":
        from .inception import InceptionFeatures

        extractor: nn.Module = InceptionFeatures.from_pretrained(weights_path, allow_download)
    elif name == "torch-fidelity":
        extractor = TorchFidelityFeatures.from_pretrained(weights_path, allow_download)
    elif name == "clean-fid":
        extractor = CleanFIDFeatures.from_pretrained(weights_path, allow_download)
    else:
        raise ValueError(f"unknown FID backend {name!r}; choose one of {', '.join(FID_BACKENDS)}")
    return FIDBackend(name, extractor, 2048, DISTANCES[name])
