"""``dualvitok encode``: token shards for a folder, equal to direct encoding, resumable, robust to broken files."""

from __future__ import annotations

import json
import shutil

import torch

from dualvitok import DualViTok, ImageProcessor
from dualvitok.cli import main
from dualvitok.tokens import iter_tokens, read_index


def test_encode_folder_matches_direct_encoding_and_resumes(tiny_model, tmp_path, sample_image_paths, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for p in sample_image_paths[:3]:
        shutil.copy(p, images / p.name)
    shutil.copy(sample_image_paths[3], images / "sub" / sample_image_paths[3].name)
    (images / "broken.jpg").write_text("not a jpeg")
    args = ["encode", str(images), "--output", str(tmp_path / "tokens"), "--model", str(tmp_path / "model"),
            "--size", "64", "64", "--batch-size", "2", "--shard-size", "3", "--fp32",
            "--default-malloc"]  # keep the test process's allocator settings
    assert main(args) == 0
    assert "skipped 1 unreadable: broken.jpg" in capsys.readouterr().out
    records = list(iter_tokens(tmp_path / "tokens"))
    assert len(records) == 4 and len(list((tmp_path / "tokens").glob("tokens-*.safetensors"))) == 2
    model = DualViTok.from_pretrained(tmp_path / "model")
    processor = ImageProcessor(size=(64, 64))
    for r in records:
        with torch.no_grad():
            enc = model.encode(processor(images / r.path))
        assert torch.equal(r.semantic_indices, enc.semantic_indices[0])
        assert torch.equal(r.pixel_indices, enc.pixel_indices[0])
    # a second run adds only new images
    shutil.copy(sample_image_paths[4], images / sample_image_paths[4].name)
    assert main(args) == 0
    assert len(read_index(tmp_path / "tokens")) == 5
    assert not list((tmp_path / "tokens").glob("*.tmp"))


def test_encode_missing_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["encode", str(tmp_path / "nope"), "--output", str(tmp_path / "t"), "--model", "dualvitok_tiny"])
    assert code == 1 and "not a folder" in capsys.readouterr().err


def test_encode_fast_path_equals_the_optimized_model(tiny_model, tmp_path, sample_image_paths):
    """The default (fast) path writes what ``optimize_for_inference()`` encodes; pixel tokens equal float32 ones."""
    tiny_model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for p in sample_image_paths[:2]:
        shutil.copy(p, images / p.name)
    args = ["encode", str(images), "--output", str(tmp_path / "tokens"), "--model", str(tmp_path / "model"),
            "--size", "64", "64", "--default-malloc"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["fast_path"] is True
    reference = DualViTok.from_pretrained(tmp_path / "model")
    fast = DualViTok.from_pretrained(tmp_path / "model").optimize_for_inference()
    processor = ImageProcessor(size=(64, 64))
    for r in iter_tokens(tmp_path / "tokens"):
        x = processor(images / r.path)
        with torch.inference_mode():
            enc, enc32 = fast.encode(x), reference.encode(x)
        assert torch.equal(r.semantic_indices, enc.semantic_indices[0])
        assert torch.equal(r.pixel_indices, enc.pixel_indices[0])
        assert torch.equal(r.pixel_indices, enc32.pixel_indices[0])


def test_encode_keeps_freed_memory_unless_told_not_to(tiny_model, tmp_path, sample_image_paths, monkeypatch):
    import dualvitok.devices

    calls = []
    monkeypatch.setattr(dualvitok.devices, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    tiny_model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sample_image_paths[0], images / sample_image_paths[0].name)
    base = ["encode", str(images), "--model", str(tmp_path / "model"), "--size", "64", "64"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 0 and calls == [1]
    assert main([*base, "--output", str(tmp_path / "b"), "--default-malloc"]) == 0 and calls == [1]
