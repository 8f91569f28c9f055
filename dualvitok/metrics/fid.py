"""Frechet Inception Distance: streaming Gaussian statistics, a robust Frechet distance, pytorch-fid ``.npz`` I/O.

Follows pytorch-fid (``pytorch_fid/fid_score.py``): statistics are the feature mean ``mu`` and the unbiased covariance
``sigma`` (``np.cov(rowvar=False)``, divisor N - 1), saved as ``.npz`` with keys ``mu`` and ``sigma`` (we add
``num_samples``, which pytorch-fid ignores). Differs in two ways:

* the statistics are accumulated in float64 batch by batch (Chan et al.'s pairwise update of mean and co-moment
  matrix), so memory is constant in the number of images and results merge exactly across processes;
* ``Tr(sqrt(sigma1 sigma2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
  ``R^T sigma2 R`` with ``sigma1 = R R^T`` (Cholesky factor, or the symmetric square root when ``sigma1`` is singular),
  which has the eigenvalues of ``sigma1 sigma2``, instead of ``scipy.linalg.sqrtm`` of a non-symmetric product: no
  imaginary parts to discard, near-singular covariances need no ad-hoc ``eps``, and it is several times faster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .._utils import atomic_write


def _as_float64(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _trace_sqrt_product(s1: Tensor, s2: Tensor) -> float:
    """``Tr(sqrt(s1 s2))`` for symmetric PSD ``[D, D]`` float64 matrices.

    ``s1 s2`` has the eigenvalues of the symmetric PSD matrix ``R^T s2 R`` for any ``s1 = R R^T``: ``R`` is the
    Cholesky factor when ``s1`` is positive definite (fast), else ``sqrt(s1)`` from an eigendecomposition.
    """
    factor, info = torch.linalg.cholesky_ex(s1)
    if int(info) != 0:  # singular (e.g. fewer samples than dimensions): symmetric square root instead
        w, v = torch.linalg.eigh(s1)
        factor = (v * w.clamp(min=0).sqrt()) @ v.T  # [D, D]
    m = factor.T @ s2 @ factor
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(eig.clamp(min=0).sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`` of two Gaussians.

    Args:
        mu1, mu2: means ``[D]`` (numpy or torch).
        sigma1, sigma2: covariances ``[D, D]`` (symmetric positive semi-definite).

    Returns:
        The distance as a Python float (>= 0).
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1, "mu1")), np.atleast_1d(_as_float64(mu2, "mu2"))
    s1, s2 = np.atleast_2d(_as_float64(sigma1, "sigma1")), np.atleast_2d(_as_float64(sigma2, "sigma2"))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    tr_covmean = _trace_sqrt_product(torch.from_numpy(s1), torch.from_numpy(s2))
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)


@dataclass
class FIDStatistics:
    """Mean ``mu [D]`` and covariance ``sigma [D, D]`` (float64 numpy) of a feature set, and its size."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None


def save_statistics(path: str | os.PathLike, mu, sigma, num_samples: int | None = None) -> Path:
    """Write ``mu``/``sigma`` to a pytorch-fid compatible ``.npz`` (atomically); returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files end in .npz (pytorch-fid's format), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": _as_float64(mu, "mu"), "sigma": _as_float64(sigma, "sigma")}
    if num_samples is not None:
        arrays["num_samples"] = np.asarray(num_samples, dtype=np.int64)
    with atomic_write(path, suffix=".npz") as tmp:  # numpy appends .npz to other names
        np.savez_compressed(tmp, **arrays)
    return path


def load_statistics(path: str | os.PathLike) -> FIDStatistics:
    """Read a pytorch-fid ``.npz`` (keys ``mu``, ``sigma``; pickles refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(f.keys())}); is it a pytorch-fid .npz?")
        n = int(f["num_samples"]) if "num_samples" in f else None
        return FIDStatistics(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n)


class GaussianStatistics:
    """Running mean and covariance of feature vectors in float64, constant memory in the number of samples.

    Args:
        dim: feature dimension D.

    Example:
        >>> stats = GaussianStatistics(4)
        >>> stats.update(torch.randn(10, 4)); stats.update(torch.randn(5, 4))
        >>> stats.count, stats.sigma.shape
        (15, (4, 4))
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64)
        self.comoment = torch.zeros(self.dim, self.dim, dtype=torch.float64)  # sum of (x - mean)(x - mean)^T

    def _merge(self, count: int, mean: Tensor, comoment: Tensor) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.comoment = self.comoment + comoment + torch.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def update(self, features: Tensor) -> None:
        """Add a batch of features ``[N, D]``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(features.shape)}")
        x = features.detach().to("cpu", torch.float64)
        if x.shape[0] == 0:
            return
        mean = x.mean(0)
        centred = x - mean  # [N, D]
        self._merge(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: GaussianStatistics) -> GaussianStatistics:
        """Add another accumulator's samples into this one (in place); returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self._merge(other.count, other.mean, other.comoment)
        return self

    def all_gather(self, group=None) -> GaussianStatistics:
        """Merge the statistics of all processes (in rank order) into this one; no-op outside torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.mean,
                            self.comoment.flatten()]).to(device)  # [1 + D + D*D]
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        merged = GaussianStatistics(self.dim)
        for p in gathered:
            p = p.cpu()
            merged._merge(int(p[0].item()), p[1:1 + self.dim], p[1 + self.dim:].reshape(self.dim, self.dim))
        self.count, self.mean, self.comoment = merged.count, merged.mean, merged.comoment
        return self

    @property
    def mu(self) -> np.ndarray:
        """Mean ``[D]`` (float64)."""
        return self.mean.numpy().copy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``[D, D]`` (float64, divisor N - 1 as ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        return (self.comoment / (self.count - 1)).numpy().copy()

    def statistics(self) -> FIDStatistics:
        return FIDStatistics(self.mu, self.sigma, self.count)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a pytorch-fid compatible ``.npz``."""
        return save_statistics(path, self.mu, self.sigma, self.count)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStatistics:
        """Restore an accumulator from a ``.npz`` written by :meth:`save` (needs ``num_samples``)."""
        s = load_statistics(path)
        if s.num_samples is None:
            raise ValueError(f"{path} has no num_samples: it can be compared against but not extended")
        out = cls(s.mu.shape[0])
        out.count = s.num_samples
        out.mean = torch.from_numpy(s.mu)
        out.comoment = torch.from_numpy(s.sigma) * max(s.num_samples - 1, 0)
        return out


def fid_from_statistics(a: GaussianStatistics | FIDStatistics, b: GaussianStatistics | FIDStatistics) -> float:
    """FID between two sets of statistics."""
    a = a.statistics() if isinstance(a, GaussianStatistics) else a
    b = b.statistics() if isinstance(b, GaussianStatistics) else b
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


class FrechetInceptionDistance:
    """Streaming rFID: reference and reconstruction features through one feature extractor.

    Args:
        feature_extractor: maps ``[B, 3, H, W]`` in [0, 1] to ``[B, D]`` (default: the FID Inception,
            :meth:`InceptionFeatures.from_pretrained`, which needs its weights).
        dim: feature dimension D.
    """

    def __init__(self, feature_extractor: torch.nn.Module, dim: int = 2048):
        self.feature_extractor = feature_extractor
        self.real = GaussianStatistics(dim)
        self.fake = GaussianStatistics(dim)

    def update(self, real: Tensor, fake: Tensor | None = None) -> None:
        """Add originals (and optionally reconstructions), ``[B, 3, H, W]`` in [0, 1]."""
        self.real.update(self.feature_extractor(real))
        if fake is not None:
            self.fake.update(self.feature_extractor(fake))

    def all_gather(self) -> None:
        self.real.all_gather()
        self.fake.all_gather()

    def compute(self) -> float:
        return fid_from_statistics(self.real, self.fake)
