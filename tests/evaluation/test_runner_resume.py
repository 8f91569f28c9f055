"""The Evaluator library API: rFID through a feature extractor vs scipy, and resuming an interrupted, killed or
disk-full run to exactly the uninterrupted result."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from dualvitok import DualViTok
from dualvitok.evaluation import EvaluationSettings, Evaluator, get_protocol, read_sample, scan_folder
from dualvitok.evaluation import state as state_module
from dualvitok.processor import ImageProcessor

linalg = pytest.importorskip("scipy.linalg")

METRICS = ["psnr", "ssim", "ssim_reference_inflated", "rfid", "usage"]


class PooledFeatures(torch.nn.Module):
    """A small fake feature extractor: 4x4 average-pooled pixels through a fixed projection, ``[B, 4]``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 4 * 4, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1) @ self.proj


def _evaluator(model, **kwargs):
    settings = EvaluationSettings(get_protocol("native", max_pixels=64 * 64), batch_size=2, progress=False, **kwargs)
    return Evaluator(model, settings, METRICS, fid_extractor=PooledFeatures(), fid_dim=4)


@pytest.fixture
def model(tiny_model_dir):
    return DualViTok.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def files(messy_folder):
    return scan_folder(messy_folder)[:8]  # 5 readable photos (of mixed sizes) and 3 broken files


def _same(a, b):
    """Bitwise equal results (the resume contract)."""
    assert a.num_images == b.num_images and a.skipped == b.skipped
    assert a.metrics == b.metrics and a.metrics_std == b.metrics_std
    assert a.codebook_usage == b.codebook_usage
    assert [r["psnr"] for r in a.per_image] == [r["psnr"] for r in b.per_image]


def test_rfid_matches_scipy_on_the_same_features(model, files):
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
    assert len(result.per_image) == 5 and result.settings["fid_backend"] == "custom"


def test_deprecated_keyword_call_still_works(model, files):
    with pytest.warns(DeprecationWarning, match="EvaluationSettings"):
        old = Evaluator(model, get_protocol("native", max_pixels=64 * 64), METRICS, fid_extractor=PooledFeatures(),
                        fid_dim=4, batch_size=2, progress=False)
    _same(old.run(files), _evaluator(model).run(files))


def test_interrupted_run_resumes_to_the_same_result(model, files, tmp_path):
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
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir()) == ["per_image.rank0.jsonl",
                                                                              "rank0.safetensors"]
    calls["n"] = -100  # no more interruptions; count the remaining batches
    resumed = _evaluator(model, output_dir=tmp_path / "run", resume=True).run(files)
    assert calls["n"] + 100 <= 3  # only unfinished images were processed again (5 images of 4 sizes: 4 batches)
    _same(resumed, full)
    with pytest.raises(ValueError, match="cannot resume.*protocol"):
        Evaluator(model, EvaluationSettings(get_protocol("imagenet256"), output_dir=tmp_path / "run", resume=True,
                                            progress=False), ["psnr"]).run(files)


class _Killed(BaseException):
    """The process dies: nothing after this point runs (no finally clause writes anything either)."""


def test_kill_between_writing_and_renaming_the_state_keeps_the_previous_one(model, files, tmp_path, monkeypatch):
    """Killed in the middle of the 4th state save (the file written, not yet renamed): the 3rd save survives."""
    full = _evaluator(model).run(files)
    real_replace, state_writes = os.replace, {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.path.dirname(dst)) == "state":
            state_writes["n"] += 1
            if state_writes["n"] >= 4:
                raise _Killed
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        _evaluator(model, output_dir=tmp_path / "run", checkpoint_every=1).run(files)
    monkeypatch.setattr(os, "replace", real_replace)
    resumed = _evaluator(model, output_dir=tmp_path / "run", resume=True).run(files)
    _same(resumed, full)


def test_disk_full_while_saving_keeps_the_previous_state_loadable(model, files, tmp_path, monkeypatch):
    full = _evaluator(model).run(files)
    real_save, calls = state_module.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 2:
            with open(filename, "wb") as f:
                f.write(b"partial")  # what a full disk leaves in the temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(state_module, "save_file", save_file)
    with pytest.raises(OSError, match="no space left on device while writing .*rank0.safetensors"):
        _evaluator(model, output_dir=tmp_path / "run", checkpoint_every=1).run(files)
    monkeypatch.setattr(state_module, "save_file", real_save)
    assert [p.name for p in (tmp_path / "run" / "state").iterdir() if p.name.endswith(".tmp")] == []
    resumed = _evaluator(model, output_dir=tmp_path / "run", resume=True).run(files)
    _same(resumed, full)


def test_resume_fingerprint_names_dtype_and_fid_backend(model, files, tmp_path):
    _evaluator(model, output_dir=tmp_path / "run", checkpoint_every=1).run(files[:3])
    with pytest.raises(ValueError, match=r"dtype \(saved 'float32', now 'bfloat16'\)"):
        _evaluator(model, output_dir=tmp_path / "run", resume=True, dtype_name="bfloat16").run(files[:3])
    from dualvitok.metrics.fid_backends import FIDBackend

    settings = EvaluationSettings(get_protocol("native", max_pixels=64 * 64), batch_size=2, progress=False,
                                  output_dir=tmp_path / "run", resume=True)
    other = Evaluator(model, settings, METRICS, fid_backend=FIDBackend("torch-fidelity", PooledFeatures(), 4))
    with pytest.raises(ValueError, match="metrics.*torch-fidelity"):
        other.run(files[:3])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="checkpoint_every"):
        EvaluationSettings(checkpoint_every=0)
    with pytest.raises(ValueError, match="batch_size"):
        EvaluationSettings(batch_size=-1)
    with pytest.raises(ValueError, match="resume needs an output folder"):
        EvaluationSettings(resume=True)
