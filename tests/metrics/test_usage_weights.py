"""Codebook usage of both codebooks against numpy, and where metric weights are looked up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualvitok.metrics import DualCodebookUsage
from dualvitok.metrics.weights import FID_INCEPTION, WeightsNotFoundError, find_local_weights, resolve_weights


def test_dual_codebook_usage_matches_numpy(tiny_model, tmp_path):
    usage = DualCodebookUsage.for_model(tiny_model)
    sem_all, pix_all = [], []
    with torch.no_grad():
        for _ in range(2):
            enc = tiny_model.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
            usage.update(enc)
            sem_all.append(enc.semantic_indices.flatten().numpy())
            pix_all.append(enc.pixel_indices.flatten().numpy())
    for name, idx, size in (("semantic", np.concatenate(sem_all), tiny_model.semantic_quantizer.codebook_size),
                            ("pixel", np.concatenate(pix_all), tiny_model.pixel_quantizer.codebook_size)):
        counts = np.bincount(idx, minlength=size)
        p = counts[counts > 0] / counts.sum()
        d = usage.to_dict()[name]
        assert d["codebook_size"] == size and d["tokens"] == idx.size
        assert d["used_codes"] == len(np.unique(idx))
        assert d["utilisation"] == pytest.approx(len(np.unique(idx)) / size)
        assert d["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
        np.testing.assert_array_equal(getattr(usage, name).histogram().numpy(), counts)
    path = usage.save_histograms(tmp_path / "h.npz")
    with np.load(path) as f:
        np.testing.assert_array_equal(f["pixel"], usage.pixel.histogram().numpy())
    usage.all_reduce()  # no process group: unchanged
    assert usage.semantic.total == sum(a.size for a in sem_all)


def test_weights_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv(FID_INCEPTION.env, raising=False)
    assert find_local_weights(FID_INCEPTION) is None
    cached = tmp_path / "th" / "hub" / "checkpoints" / FID_INCEPTION.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_local_weights(FID_INCEPTION) == cached
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"y")
    monkeypatch.setenv(FID_INCEPTION.env, str(explicit))
    assert find_local_weights(FID_INCEPTION) == explicit  # env var before the cache
    assert find_local_weights(FID_INCEPTION, cached) == cached  # argument before the env var
    monkeypatch.setenv(FID_INCEPTION.env, str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsNotFoundError, match=FID_INCEPTION.env):
        find_local_weights(FID_INCEPTION)
    monkeypatch.delenv(FID_INCEPTION.env)
    cached.unlink()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DUALVITOK_OFFLINE", raising=False)

    def failing_download(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)
    with pytest.raises(WeightsNotFoundError, match="download failed: network unreachable"):
        resolve_weights(FID_INCEPTION)
    with pytest.raises(WeightsNotFoundError, match="offline"):
        resolve_weights(FID_INCEPTION, allow_download=False)
