"""The Evaluator library API: rFID through a feature extractor vs scipy, and resuming an interrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualvitok import DualViTok
from dualvitok.evaluation import Evaluator, get_protocol, read_sample, scan_folder
from dualvitok.processor import ImageProcessor

linalg = pytest.importorskip("scipy.linalg")


class PooledFeatures(torch.nn.Module):
    """A small fake feature extractor: 4x4 average-pooled pixels through a fixed projection, ``[B, 4]``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 4 * 4, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1) @ self.proj


def _evaluator(model, **kwargs):
    return Evaluator(model, get_protocol("native", max_pixels=64 * 64),
                     ["psnr", "ssim", "ssim_reference_inflated", "rfid", "usage"], fid_extractor=PooledFeatures(),
                     fid_dim=4, batch_size=2, progress=False, **kwargs)


def test_rfid_matches_scipy_on_the_same_features(tiny_model_dir, messy_folder):
    model = DualViTok.from_pretrained(tiny_model_dir).eval()
    files = scan_folder(messy_folder)[:8]  # 5 readable photos (of mixed sizes) and 3 broken files
    result = _evaluator(model).run(files)
    protocol, extractor = get_protocol("native", max_pixels=64 * 64), PooledFeatures()
    real, fake = [], []
    for i, f in enumerate(files):
        s = read_sample(i, f, protocol)
        if s.image is None:
            continue
        with torch.no_grad():
            recon = model(s.image[None].float() / 127.5 - 1).reconstruction
            real.append(extractor(s.image[None].float() / 255).double())
            fake.append(extractor(ImageProcessor.to_uint8(recon).float() / 255).double())
    real, fake = torch.cat(real).numpy(), torch.cat(fake).numpy()
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    diff = real.mean(0) - fake.mean(0)
    expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert result.num_images == len(real) == 5
    assert result.metrics["rfid"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(result.fid_real.mu, real.mean(0), rtol=1e-5, atol=1e-6)


def test_interrupted_run_resumes_to_the_same_result(tiny_model_dir, messy_folder, tmp_path):
    model = DualViTok.from_pretrained(tiny_model_dir).eval()
    files = scan_folder(messy_folder)[:8]
    full = _evaluator(model, output_dir=tmp_path / "full").run(files)

    calls = {"n": 0}
    original_decode = model.decode

    def flaky_decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the second batch
        return original_decode(*args, **kwargs)

    model.decode = flaky_decode
    with pytest.raises(KeyboardInterrupt):
        _evaluator(model, output_dir=tmp_path / "run", checkpoint_every=1).run(files)
    assert (tmp_path / "run" / "state" / "rank0.json").is_file()
    calls["n"] = -100  # no more interruptions; count the remaining batches
    resumed = _evaluator(model, output_dir=tmp_path / "run", resume=True).run(files)
    assert calls["n"] + 100 <= 3  # only unfinished images were processed again (5 images of 4 sizes: 4 batches)
    assert resumed.num_images == full.num_images and len(resumed.skipped) == len(full.skipped)
    for name, value in full.metrics.items():
        assert resumed.metrics[name] == pytest.approx(value, rel=1e-6), name
    assert resumed.codebook_usage == full.codebook_usage
    with pytest.raises(ValueError, match="cannot resume"):
        Evaluator(model, get_protocol("imagenet256"), ["psnr"], output_dir=tmp_path / "run", resume=True,
                  progress=False).run(files)
