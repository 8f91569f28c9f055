"""Trainer features at scale and under faults: gradient accumulation, one writer per run folder, a corrupt newest
checkpoint, orphan temp files, unreadable images, TensorBoard, and run folders / checkpoints used as ``--model``."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from PIL import Image

from dualvitok.training import TrainConfig, Trainer, load_checkpoint

pytest.importorskip("yaml")
pytest.importorskip("skimage")


def config(**run) -> TrainConfig:
    """Tiny model, 64x64 crops, no GAN and no token noise (both are batch-local random), constant LR."""
    data = {
        "model": {"name": "dualvitok_tiny"},
        "loss": {"perceptual_weight": 0.0, "disc_start": 10**6, "disc_dim": 8, "disc_num_layers": 2},
        "optimizer": {"lr": 1e-3},
        "data": {"sources": ["builtin:skimage"], "batch_size": 2, "cache_images": True,
                 "stages": [{"mode": "fixed", "resolution": 64, "crop_scale": [0.3, 1.0]}]},
        "run": {"max_steps": 2, "seed": 3, "checkpoint_every": 0, "sample_every": 0, "plot_every": 0, "threads": 1,
                **run},
    }
    return TrainConfig.from_dict(data)


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_equals_the_combined_batch(tmp_path):
    """batch 4 in one step == 2 micro-batches of 2 accumulated (losses and weight updates, up to float reordering)."""
    one = config()
    one.data.batch_size = 4
    two = config()
    two.optimizer.accumulation_steps = 2
    Trainer(one, tmp_path / "one", progress=False).train()
    Trainer(two, tmp_path / "two", progress=False).train()
    r1, r2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["batch"] for r in r2] == [4, 4]
    for a, b in zip(r1, r2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1 = load_checkpoint(tmp_path / "one" / "checkpoints" / "checkpoint-00000002.pt")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "checkpoint-00000002.pt")["model"]
    from dualvitok.training import build_model

    torch.manual_seed(3)
    w0 = build_model(one).state_dict()
    keys = [k for k in w0 if w0[k].is_floating_point()]
    d1 = torch.cat([(w1[k] - w0[k]).flatten() for k in keys])
    d2 = torch.cat([(w2[k] - w0[k]).flatten() for k in keys])
    assert d1.norm() > 0.01
    assert (d1 - d2).norm() / d1.norm() < 1e-3, ((d1 - d2).norm() / d1.norm()).item()
    with pytest.raises(ValueError, match="disc_adaptive_weight"):
        bad = config()
        bad.optimizer.accumulation_steps = 2
        bad.loss.disc_adaptive_weight = True
        Trainer(bad, tmp_path / "bad", progress=False).setup()


def test_second_run_into_the_same_folder_is_refused(tmp_path):
    from dualvitok._utils.locking import OutputLockedError

    first = Trainer(config(), tmp_path, progress=False)
    first.setup()
    try:
        with pytest.raises(OutputLockedError, match="another dualvitok train"):
            Trainer(config(), tmp_path, progress=False, overwrite=True).setup()
    finally:
        first.close()
    Trainer(config(max_steps=1), tmp_path, progress=False, overwrite=True).train()  # the lock went with close()
    assert [r["step"] for r in records(tmp_path)] == [1]


def test_corrupt_newest_checkpoint_resumes_from_the_previous_exactly(tmp_path, caplog):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    Trainer(config(max_steps=6), straight, progress=False).train()
    Trainer(config(max_steps=4, checkpoint_every=2, keep_checkpoints=3), broken, progress=False).train()
    ckpts = broken / "checkpoints"
    newest = ckpts / "checkpoint-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:4096])  # truncated
    orphan = ckpts / ".checkpoint-00000006.pt.k2j3.tmp"
    orphan.write_bytes(b"\0" * 10000)  # a write killed mid-way
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and a torn metrics line
    with caplog.at_level(logging.WARNING):
        Trainer(config(max_steps=6, checkpoint_every=2, keep_checkpoints=3), broken, resume=True,
                progress=False).train()
    assert "checkpoint-00000004.pt cannot be read" in caplog.text and "temporary file" in caplog.text
    assert not orphan.exists() and (ckpts / "checkpoint-00000004.pt.corrupt").is_file()
    a, b = records(straight), records(broken)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], ra["step"]
    sa = load_checkpoint(straight / "checkpoints" / "checkpoint-00000006.pt")["model"]
    sb = load_checkpoint(ckpts / "checkpoint-00000006.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _photo_folder(folder, bad: int):
    from dualvitok.training.data import builtin_photos

    folder.mkdir()
    for i, src in enumerate(builtin_photos()[:6]):
        Image.open(src).convert("RGB").resize((96, 80)).save(folder / f"good{i}.png")
    if bad >= 1:
        buffer = io.BytesIO()
        Image.open(builtin_photos()[0]).convert("RGB").resize((96, 80)).save(buffer, format="JPEG")
        (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    if bad >= 2:
        (folder / "text.png").write_bytes(b"this is not an image")
    return folder


def test_unreadable_images_are_skipped_counted_and_capped(tmp_path):
    data = _photo_folder(tmp_path / "data", bad=2)
    cfg = config(max_steps=4)
    cfg.data.sources = (str(data),)
    cfg.data.batch_size = 4
    cfg.data.cache_images = False
    cfg.data.max_skipped_fraction = 0.3
    Trainer(cfg, tmp_path / "run", progress=False).train()
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in listed) == ["text.png", "truncated.jpg"]
    assert all(r["reason"] for r in listed)
    assert records(tmp_path / "run")[-1]["skipped_images"] == 2 and len(records(tmp_path / "run")) == 4

    cfg.data.max_skipped_fraction = 0.1  # 2 of 8 is over the cap: the run stops loudly
    from dualvitok.cli import main

    (tmp_path / "capped.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    code = main(["train", "--config", str(tmp_path / "capped.yaml"), "--output", str(tmp_path / "capped"),
                 "--no-progress"])
    assert code == 1


def test_tensorboard_tracker_mirrors_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(config(max_steps=3, tracker="tensorboard"), tmp_path, progress=False).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in records(tmp_path)]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_run_folder_and_checkpoint_load_as_model(tmp_path):
    from dualvitok.loading import load_model

    cfg = config(max_steps=2, checkpoint_every=1, keep_checkpoints=3, ema_decay=0.5)
    result = Trainer(cfg, tmp_path / "run", progress=False).train()
    final = load_model(result.final_model)
    from_run = load_model(tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-00000002.pt")
    from_ckpt = load_model(tmp_path / "run" / "checkpoints" / "checkpoint-00000002.pt")
    for name, p in final.named_parameters():
        assert torch.equal(from_run.state_dict()[name], p), name
        assert torch.equal(from_ckpt.state_dict()[name], p), name  # the checkpoint's EMA weights == final/
        if name in ckpt["ema"]["shadow"]:
            assert torch.equal(ckpt["ema"]["shadow"][name], p), name
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")  # an unfinished run: its newest checkpoint
    unfinished = load_model(tmp_path / "run")
    assert all(torch.equal(unfinished.state_dict()[k], v) for k, v in from_ckpt.state_dict().items())
    from dualvitok.cli import main
    from dualvitok.training.data import builtin_photos

    assert main(["reconstruct", str(builtin_photos()[0]), "--model", str(tmp_path / "run"), "--output",
                 str(tmp_path / "rec"), "--size", "64", "64"]) == 0
    assert list((tmp_path / "rec").glob("*.png"))
