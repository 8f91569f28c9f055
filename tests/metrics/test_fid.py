"""Frechet distance vs scipy's sqrtm formula, streaming statistics vs numpy, pytorch-fid .npz compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualvitok.metrics import (
    FrechetInceptionDistance,
    GaussianStatistics,
    fid_from_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)

linalg = pytest.importorskip("scipy.linalg")


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """Textbook formula with scipy.linalg.sqrtm (as pytorch-fid, without its eps retry)."""
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_cov(rng, d, n):
    a = rng.standard_normal((n, d)) * rng.uniform(0.1, 2.0, d)
    return np.atleast_2d(np.cov(a, rowvar=False))


@pytest.mark.parametrize("dim", [1, 8, 64, 256, pytest.param(1024, marks=pytest.mark.slow),
                                 pytest.param(2048, marks=pytest.mark.slow)])
def test_frechet_distance_matches_scipy(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) * 0.5
    s1, s2 = _random_cov(rng, dim, dim + 50), _random_cov(rng, dim, dim + 50)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_frechet_distance_2048_closed_form():
    """Full Inception dimension, dense covariances: sigma2 = c^2 sigma1 gives (1 - c)^2 Tr(sigma1) + |mu1 - mu2|^2."""
    d = 2048
    rng = np.random.default_rng(3)
    a = rng.standard_normal((d, d + 64)) * rng.uniform(0.2, 2.0, (d, 1))
    s1 = a @ a.T / (d + 64)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    for c in (1.0, 0.7):
        expected = float((1 - c) ** 2 * np.trace(s1) + ((mu1 - mu2) ** 2).sum())
        assert frechet_distance(mu1, s1, mu2, c * c * s1) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_near_singular_and_closed_forms():
    rng = np.random.default_rng(0)
    d = 64
    # rank-deficient covariances (fewer samples than dimensions), as with small evaluation sets
    s1, s2 = _random_cov(rng, d, 20), _random_cov(rng, d, 30)
    mu = rng.standard_normal(d)
    ours = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(ours) and ours == pytest.approx(_scipy_fd(mu, s1, mu, s2), rel=1e-4)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    mu2 = mu + 1.0
    assert frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + d), rel=1e-10)
    # identical Gaussians, even singular: exactly 0 up to rounding, never negative
    assert 0.0 <= frechet_distance(mu, s1, mu, s1) < 1e-8 * np.trace(s1)
    # torch inputs and shape errors
    assert frechet_distance(torch.zeros(3), torch.eye(3), torch.ones(3), torch.eye(3)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((301, 48)) * 3 + 100.0  # large offset: catches naive sum-of-squares cancellation
    stats = GaussianStatistics(48)
    for chunk in np.split(x, [1, 2, 50, 51, 200]):  # uneven batches, incl. single samples
        stats.update(torch.from_numpy(chunk))
    assert stats.count == 301
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
    # merging two accumulators equals one over the concatenation (the distributed path)
    a, b = GaussianStatistics(48), GaussianStatistics(48)
    a.update(torch.from_numpy(x[:120]))
    b.update(torch.from_numpy(x[120:]))
    a.merge(b)
    np.testing.assert_allclose(a.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match=r"\[N, 48\]"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2"):
        _ = GaussianStatistics(3).sigma


def test_fid_of_a_set_with_itself_is_zero_and_matches_numpy_reference():
    torch.manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 32, dtype=torch.float64)

    def features(images):  # a small fake feature extractor: pooled pixels through a fixed projection
        return torch.nn.functional.adaptive_avg_pool2d(images.double(), 8).flatten(1) @ proj

    real = torch.rand(40, 3, 32, 32)
    fake = (real + 0.1 * torch.randn_like(real)).clamp(0, 1)
    fid = FrechetInceptionDistance(features, dim=32)
    for i in range(0, 40, 16):
        fid.update(real[i:i + 16], real[i:i + 16])
    assert abs(fid.compute()) < 1e-6
    fid = FrechetInceptionDistance(features, dim=32)
    for i in range(0, 40, 7):
        fid.update(real[i:i + 7], fake[i:i + 7])
    fr, ff = features(real).numpy(), features(fake).numpy()
    ref = _scipy_fd(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    assert fid.compute() == pytest.approx(ref, rel=1e-6)
    assert fid.compute() > 1e-3


def test_npz_round_trip_and_pytorch_fid_compatibility(tmp_path):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 16))
    stats = GaussianStatistics(16)
    stats.update(torch.from_numpy(x))
    path = stats.save(tmp_path / "ours.npz")
    # pytorch-fid reads our file
    mu, sigma = fid_score.compute_statistics_of_path(str(path), model=None, batch_size=1, dims=16, device="cpu")
    np.testing.assert_array_equal(mu, stats.mu)
    np.testing.assert_array_equal(sigma, stats.sigma)
    # we read a file written the way pytorch-fid writes it (mu, sigma only)
    np.savez_compressed(tmp_path / "theirs.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    theirs = load_statistics(tmp_path / "theirs.npz")
    assert theirs.num_samples is None
    assert fid_from_statistics(theirs, stats) < 1e-9
    # pytorch-fid's own distance agrees with ours on these files
    y = rng.standard_normal((60, 16)) + 0.3
    save_statistics(tmp_path / "other.npz", y.mean(0), np.cov(y, rowvar=False), 60)
    other = load_statistics(tmp_path / "other.npz")
    assert other.num_samples == 60
    ref = fid_score.calculate_frechet_distance(stats.mu, stats.sigma, other.mu, other.sigma)
    assert fid_from_statistics(stats, other) == pytest.approx(ref, rel=1e-6)
    # an accumulator restored from its .npz continues exactly
    restored = GaussianStatistics.load(path)
    restored.update(torch.from_numpy(y))
    np.testing.assert_allclose(restored.sigma, np.cov(np.concatenate([x, y]), rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match=".npz"):
        save_statistics(tmp_path / "x.txt", x.mean(0), np.eye(16))
    with pytest.raises(FileNotFoundError):
        load_statistics(tmp_path / "missing.npz")
    assert not list(tmp_path.glob("*.tmp"))
