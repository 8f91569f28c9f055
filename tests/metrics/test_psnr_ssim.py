"""PSNR and SSIM against scikit-image on the bundled real photos (independent reference implementation)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dualvitok.metrics import psnr, ssim, ssim_reference_inflated

skimage_metrics = pytest.importorskip("skimage.metrics")


def _distortions(path):
    """(original, distorted) float64 HxWx3 arrays in [0, 1]: JPEG q=15, Gaussian blur, noise (a 300x260 crop)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    im = im.crop((0, 0, min(im.width, 300), min(im.height, 260)))  # keeps the test fast; a real photo region
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=15)
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    blur = im.filter(ImageFilter.GaussianBlur(2))
    x = np.asarray(im, dtype=np.float64) / 255
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.08, x.shape), 0, 1)
    return x, [np.asarray(jpeg, dtype=np.float64) / 255, np.asarray(blur, dtype=np.float64) / 255, noisy]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # [1, 3, H, W]


def test_psnr_ssim_match_skimage_on_real_photos(sample_image_paths):
    assert len(sample_image_paths) >= 5
    for path in sample_image_paths:
        x, distorted = _distortions(path)
        preds = torch.cat([_t(d) for d in distorted])  # [3, 3, H, W]
        target = _t(x).expand_as(preds)
        ours_psnr, ours_ssim = psnr(preds, target), ssim(preds, target)
        ours_ref = ssim_reference_inflated(preds, target)
        assert ours_psnr.shape == ours_ssim.shape == ours_ref.shape == (3,)
        for i, d in enumerate(distorted):
            ref_psnr = skimage_metrics.peak_signal_noise_ratio(x, d, data_range=1.0)
            ref_ssim = skimage_metrics.structural_similarity(d, x, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                                             use_sample_covariance=False, channel_axis=-1)
            ref_inflated = skimage_metrics.structural_similarity(d, x, data_range=2.0, channel_axis=-1)
            assert abs(float(ours_psnr[i]) - ref_psnr) < 1e-3, path.name
            assert abs(float(ours_ssim[i]) - ref_ssim) < 2e-3, path.name
            assert abs(float(ours_ssim[i]) - ref_ssim) < 1e-6, path.name  # in fact exact up to rounding
            assert abs(float(ours_ref[i]) - ref_inflated) < 1e-6, path.name
            assert ours_ref[i] > ours_ssim[i] - 0.05  # data_range=2 inflates (sanity, not the definition)


def test_uint8_rounded_inputs_match_skimage_uint8(sample_image_paths):
    """Same numbers whether skimage gets uint8 (data_range 255) or we get x / 255."""
    with Image.open(sample_image_paths[0]) as im:
        a = np.asarray(im.convert("RGB").resize((96, 80)))
    b = np.clip(a.astype(int) + np.random.default_rng(1).integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ref = skimage_metrics.peak_signal_noise_ratio(a, b, data_range=255)
    assert abs(float(psnr(_t(b / 255.0), _t(a / 255.0))[0]) - ref) < 1e-9


def test_identities_and_errors():
    x = torch.rand(2, 3, 32, 32)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ssim_reference_inflated(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(x * 2 - 1, x)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[:, :, :16])
    with pytest.raises(TypeError, match="float"):
        ssim((x * 255).to(torch.uint8), x)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unsqueeze"):
        psnr(x[0], x[0])
