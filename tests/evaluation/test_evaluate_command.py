"""`dualvitok evaluate` end to end: a saved tiny model, a messy folder of real photos, the default invocation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualvitok import DualViTok
from dualvitok.cli import main
from dualvitok.processor import ImageProcessor

skimage_metrics = pytest.importorskip("skimage.metrics")


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No LPIPS/Inception weights anywhere, downloads disabled."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DUALVITOK_FID_WEIGHTS", "DUALVITOK_LPIPS_VGG_WEIGHTS", "DUALVITOK_LPIPS_ALEX_WEIGHTS", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_evaluate_messy_folder_with_saved_model(tiny_model_dir, messy_folder, messy_expected, tmp_path,
                                                offline_empty_cache, capsys):
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", str(tiny_model_dir), "--data", str(messy_folder), "--protocol", "native",
               "--max-pixels", str(64 * 64), "--batch-size", "3", "--output", str(out), "--grid", "4", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| Model | Protocol | Images |" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    n_ok = sum(v == "ok" for v in messy_expected.values())
    assert results["num_files"] == len(messy_expected)
    assert results["num_images"] == n_ok
    assert results["skipped"]["count"] == len(messy_expected) - n_ok
    assert results["skipped"]["by_reason"] == {"unreadable": 3, "too small": 1}
    skipped = {Path(p["path"]).relative_to(messy_folder).as_posix(): p["reason"] for p in results["skipped"]["files"]}
    assert set(skipped) == {k for k, v in messy_expected.items() if v != "ok"}
    assert results["converted"] == {"L": 1, "RGBA": 1, "LA": 1, "CMYK": 1, "I;16": 1, "P": 1}
    assert results["protocol"]["name"] == "native" and results["protocol"]["max_pixels"] == 64 * 64
    assert results["model"] == str(tiny_model_dir) and results["version"]
    assert set(results["metrics"]) == {"psnr", "ssim", "ssim_reference_inflated"}
    assert any("rFID skipped" in n for n in results["notes"]) and any("LPIPS skipped" in n for n in results["notes"])
    for name in ("semantic", "pixel"):
        u = results["codebook_usage"][name]
        assert 0 < u["utilisation"] <= 1 and u["tokens"] > 0
    table = (out / "results.md").read_text()
    assert table.startswith("| Model |") and "PSNR" in table and "Skipped 4 of 13 files" in table
    with Image.open(out / "grid.png") as grid:  # 4 rows of 192 px, each under a 16 px caption
        assert grid.height == 4 * (192 + 16) and grid.mode == "RGB"
        caption = np.asarray(grid.convert("L"))[:16]
        assert (caption < 128).any() and (caption > 250).mean() > 0.5  # dark text on white
    assert (out / "codebook_histograms.npz").is_file()

    # PSNR/SSIM recomputed independently: processor -> model (one image at a time) -> uint8 -> skimage
    model = DualViTok.from_pretrained(tiny_model_dir).eval()
    processor = ImageProcessor(max_pixels=64 * 64)
    psnrs, ssims, names = [], [], []
    for name, outcome in sorted(messy_expected.items()):
        if outcome != "ok":
            continue
        x = processor(messy_folder / name)
        with torch.no_grad():
            recon = processor.to_uint8(model(x).reconstruction)[0].permute(1, 2, 0).numpy() / 255.0
        orig = processor.to_uint8(x)[0].permute(1, 2, 0).numpy() / 255.0
        psnrs.append(skimage_metrics.peak_signal_noise_ratio(orig, recon, data_range=1.0))
        names.append(name)
        ssims.append(skimage_metrics.structural_similarity(recon, orig, gaussian_weights=True, sigma=1.5,
                                                           use_sample_covariance=False, data_range=1.0,
                                                           channel_axis=-1))
    assert results["metrics"]["psnr"] == pytest.approx(float(np.mean(psnrs)), abs=0.02)
    assert results["metrics"]["ssim"] == pytest.approx(float(np.mean(ssims)), abs=2e-3)
    # per_image.jsonl: one record per evaluated image, in file order, with its own PSNR/SSIM and the file's size
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    by_name = {Path(r["file"]).relative_to(messy_folder).as_posix(): r for r in records}
    assert set(by_name) == set(names) and len(records) == n_ok
    for name, p, s in zip(names, psnrs, ssims, strict=True):
        assert by_name[name]["psnr"] == pytest.approx(p, abs=0.02)
        assert by_name[name]["ssim"] == pytest.approx(s, abs=2e-3)
    with Image.open(messy_folder / "large.png") as im:
        assert by_name["large.png"]["size"] == [im.height, im.width]
    assert set(records[0]) == {"file", "size", "evaluated_size", "psnr", "ssim", "ssim_reference_inflated"}


def test_default_invocation_uses_bundled_demo(tiny_model_dir, tmp_path, monkeypatch, offline_empty_cache, capsys):
    import dualvitok.assets as assets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(assets, "DEMO_MODEL_DIR", tmp_path / "no_demo_here")
    assert main(["evaluate"]) == 1
    err = capsys.readouterr().err
    assert "bundled demo model" in err and "--model" in err and "save_pretrained" in err

    monkeypatch.setattr(assets, "DEMO_MODEL_DIR", tiny_model_dir)  # stands in for the shipped demo model
    assert main(["evaluate", "--limit", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "demo (bundled)" in printed and "imagenet256" in printed
    results = json.loads((tmp_path / "dualvitok_eval" / "results.json").read_text())
    assert results["num_images"] == 2 and results["data"].startswith("bundled sample photos")


def test_registered_name_and_bad_arguments(messy_folder, tmp_path, offline_empty_cache, capsys):
    out = tmp_path / "o"
    assert main(["evaluate", "--model", "dualvitok_tiny", "--data", str(messy_folder / "a"), "--protocol", "native",
                 "--max-pixels", "4096", "--metrics", "psnr,usage", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"psnr"} and results["num_images"] == 2
    assert main(["evaluate", "--model", "dualvitok_tiny", "--data", str(messy_folder), "--metrics", "psnr,bogus",
                 "--output", str(out)]) == 1
    assert "unknown metrics" in capsys.readouterr().err
    # an explicitly requested metric whose weights are missing is an error with instructions, not a silent skip
    assert main(["evaluate", "--model", "dualvitok_tiny", "--data", str(messy_folder), "--metrics", "rfid",
                 "--output", str(out)]) == 1
    assert "--fid-weights" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing_model"), "--data", str(messy_folder),
                 "--output", str(out)]) == 1


@pytest.mark.slow
def test_rfid_and_lpips_with_explicit_weight_files(tiny_model_dir, messy_folder, tmp_path, offline_empty_cache):
    """--fid-weights / --lpips-weights with (random) weight files: rFID, LPIPS and the .npz statistics are produced."""
    torchvision = pytest.importorskip("torchvision")
    from dualvitok.metrics import InceptionFeatures, frechet_distance, load_statistics

    torch.manual_seed(0)
    inception = tmp_path / "pt_inception.pth"
    torch.save(InceptionFeatures().inception.state_dict(), inception)
    alex = tmp_path / "alexnet.pth"
    torch.save({k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                if k.startswith("features.")}, alex)
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(messy_folder), "--protocol", "native",
                 "--max-pixels", "4096", "--metrics", "psnr,lpips,rfid,usage", "--lpips-net", "alex",
                 "--lpips-weights", str(alex), "--fid-weights", str(inception), "--output", str(out),
                 "--no-progress", "--dtype", "bfloat16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"psnr", "lpips_alex", "rfid"} and results["settings"]["dtype"] == "bfloat16"
    assert results["fid_backend"] == results["settings"]["fid_backend"] == "pytorch-fid"
    a, b = load_statistics(out / "fid_stats_originals.npz"), load_statistics(out / "fid_stats_reconstructions.npz")
    assert a.num_samples == b.num_samples == results["num_images"]
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(results["metrics"]["rfid"], rel=1e-9)
    assert "rFID ↓" in (out / "results.md").read_text() and results["metrics"]["lpips_alex"] >= 0


@pytest.mark.slow
def test_evaluate_records_the_fid_backend(tiny_model_dir, messy_folder, tmp_path, offline_empty_cache):
    """--fid-backend torch-fidelity with a (random) Inception file: results.json and results.md name the backend."""
    pytest.importorskip("torch_fidelity")
    from dualvitok.metrics import InceptionFeatures

    torch.manual_seed(0)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(InceptionFeatures().inception.state_dict(), weights)  # pytorch-fid's keys = torch-fidelity's keys
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(messy_folder / "a"), "--protocol",
                 "native", "--max-pixels", "4096", "--metrics", "psnr,rfid", "--fid-backend", "torch-fidelity",
                 "--fid-weights", str(weights), "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["fid_backend"] == "torch-fidelity" and results["metrics"]["rfid"] >= 0
    assert "rFID convention: torch-fidelity" in (out / "results.md").read_text()
