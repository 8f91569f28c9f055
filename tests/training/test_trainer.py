"""End-to-end training on real photos: the loss goes down, resume is exact, DDP equals the combined batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dualvitok.training import TrainConfig, Trainer, load_checkpoint

yaml = pytest.importorskip("yaml")
pytest.importorskip("skimage")


def tiny_config(**run) -> TrainConfig:
    """The shipped tiny CPU recipe shrunk to 64x64 crops, with a small active discriminator and EMA."""
    data = {
        "model": {"name": "dualvitok_tiny", "overrides": {"pixel_drop_rate": 0.5, "pixel_drop_batch_rate": 0.5}},
        "loss": {"perceptual_weight": 0.0, "disc_start": 3, "disc_weight": 0.1, "disc_dim": 8, "disc_num_layers": 2},
        "optimizer": {"lr": 1e-3, "scheduler": "warmup", "warmup_steps": 2},
        "data": {"sources": ["builtin:skimage"], "batch_size": 2, "cache_images": True,
                 "stages": [{"mode": "fixed", "resolution": 64, "crop_scale": [0.3, 1.0]}]},
        "run": {"max_steps": 10, "seed": 3, "ema_decay": 0.9, "checkpoint_every": 0, "sample_every": 0,
                "plot_every": 0, "threads": 1, **run},
    }
    return TrainConfig.from_dict(data)


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_reconstruction_loss(tmp_path):
    cfg = tiny_config(max_steps=20, sample_every=20, plot_every=20)
    cfg.model.overrides.clear()  # no token noise: a clean signal
    cfg.loss.disc_start = 10**6
    cfg.data.batch_size = 4
    result = Trainer(cfg, tmp_path, progress=False).train()
    rec = [r["rec_loss"] for r in records(tmp_path)]
    assert len(rec) == 20 and [r["step"] for r in records(tmp_path)] == list(range(1, 21))
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "loss_curve.png").is_file() and (tmp_path / "samples" / "step-00000020.png").is_file()
    assert (result.final_model / "model.safetensors").is_file()
    from dualvitok import DualViTok

    DualViTok.from_pretrained(result.final_model)  # the final folder loads


def test_generator_step_applies_the_token_noise(tmp_path, monkeypatch):
    """The trainer, not the model's mode, adds the config's token noise: once per generator step."""
    from dualvitok import DualViTok

    calls = []
    original = DualViTok.add_token_noise

    def counting(self, pixel_codes, generator=None):
        calls.append(tuple(pixel_codes.shape))
        return original(self, pixel_codes, generator)

    monkeypatch.setattr(DualViTok, "add_token_noise", counting)
    trainer = Trainer(tiny_config(max_steps=1), tmp_path, progress=False)
    trainer.setup()
    trainer.train_step(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert calls == [(2, 8, 4, 4)]


def test_resume_is_exact(tmp_path):
    """10 steps in one go == 5 steps, then resume for 5 more (losses, weights, EMA, discriminator)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(tiny_config(), straight, progress=False).train()
    Trainer(tiny_config(), split, max_steps=5, progress=False).train()
    assert (split / "checkpoints" / "checkpoint-00000005.pt").is_file()
    Trainer(tiny_config(), split, resume=True, progress=False).train()
    a, b = records(straight), records(split)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert any(r.get("d_loss") for r in a)  # the discriminator was active
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "rec_loss", "g_adv_loss", "semantic_cos_loss", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
        assert ra.get("d_loss") == rb.get("d_loss")
    sa = load_checkpoint(straight / "checkpoints" / "checkpoint-00000010.pt")
    sb = load_checkpoint(split / "checkpoints" / "checkpoint-00000010.pt")
    for part in ("model", "discriminator"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    for k in sa["ema"]["shadow"]:
        assert torch.equal(sa["ema"]["shadow"][k], sb["ema"]["shadow"][k]), k
    assert sa["data"] == sb["data"]


def test_resume_needs_checkpoint_and_fresh_run_needs_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        Trainer(tiny_config(), tmp_path, resume=True, progress=False).setup()
    Trainer(tiny_config(), tmp_path, max_steps=1, progress=False).train()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_config(), tmp_path, progress=False).setup()


def _run_cli(args, nproc: int | None, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               "-m", "dualvitok.cli", *args]
    else:
        cmd = [sys.executable, "-m", "dualvitok.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_processes_equal_one_process_with_combined_batch(tmp_path):
    """torchrun + gloo, 2 CPU processes x batch 2 == 1 process x batch 4 (no GAN/token noise: they are batch-local)."""
    base = tiny_config(max_steps=2).to_dict()
    base["model"]["overrides"] = {}
    base["loss"]["disc_start"] = 10**6
    base["run"]["ema_decay"] = None
    one, two = dict(base), json.loads(json.dumps(base))
    one["data"] = dict(base["data"], batch_size=4)
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    _run_cli(["train", "--config", "one.yaml", "--output", "out1", "--no-progress"], None, tmp_path)
    _run_cli(["train", "--config", "two.yaml", "--output", "out2", "--no-progress"], 2, tmp_path)
    r1, r2 = records(tmp_path / "out1"), records(tmp_path / "out2")
    assert [r["batch"] for r in r2] == [4, 4]
    for a, b in zip(r1, r2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["rec_loss"] == pytest.approx(a["rec_loss"], rel=1e-5, abs=1e-7)
    w1 = load_file(str(tmp_path / "out1" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "out2" / "final" / "model.safetensors"))
    from dualvitok.training import build_model

    torch.manual_seed(3)  # the trainer's initialisation
    w0 = build_model(TrainConfig.from_dict(one)).state_dict()
    d1 = torch.cat([(w1[k] - w0[k]).flatten() for k in w0 if w0[k].is_floating_point()])
    d2 = torch.cat([(w2[k] - w0[k]).flatten() for k in w0 if w0[k].is_floating_point()])
    assert d1.norm() > 0.01  # the weights moved
    # same update up to float reordering of the gradient sum (Adam can amplify it for near-zero gradients)
    assert (d1 - d2).norm() / d1.norm() < 1e-3, ((d1 - d2).norm() / d1.norm()).item()


def test_fsdp_two_processes_equal_one_process_and_resume_exactly(tmp_path):
    """run.parallel: fsdp under torchrun (gloo, 2 CPU processes x batch 2) == 1 process x batch 4, EMA included; and
    2 FSDP steps + a resume for 2 more == 4 FSDP steps in one go."""
    base = tiny_config(max_steps=4).to_dict()
    base["model"]["overrides"] = {}
    base["loss"]["disc_start"] = 10**6
    one, two = json.loads(json.dumps(base)), json.loads(json.dumps(base))
    one["data"]["batch_size"] = 4
    two["run"]["parallel"] = "fsdp"
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    _run_cli(["train", "--config", "one.yaml", "--output", "out1", "--no-progress"], None, tmp_path)
    log = _run_cli(["train", "--config", "two.yaml", "--output", "out2", "--no-progress"], 2, tmp_path).stderr
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP: rank \d holds (\d+) of (\d+) parameter elements", log)]
    assert len(held) == 2 and all(local < 0.6 * total for local, total in held), held  # each holds about half
    assert sum(local for local, _ in held) >= held[0][1]
    _run_cli(["train", "--config", "two.yaml", "--output", "split", "--no-progress", "--max-steps", "2"], 2, tmp_path)
    sharded = tmp_path / "split" / "checkpoints" / "checkpoint-00000002"  # torch.distributed.checkpoint folder
    state = load_checkpoint(sharded / "trainer_state.pt")
    assert state["parallel"] == "fsdp" and "model" not in state and "optimizer" not in state  # tensors in shards
    shards = sorted(p.stat().st_size for p in sharded.glob("__*_0.distcp"))
    assert len(shards) == 2 and shards[0] > 0.3 * sum(shards), shards  # each rank wrote its own part
    _run_cli(["train", "--config", "two.yaml", "--output", "split", "--no-progress", "--resume"], 2, tmp_path)

    r1, r2, r3 = records(tmp_path / "out1"), records(tmp_path / "out2"), records(tmp_path / "split")
    assert [r["batch"] for r in r2] == [4] * 4 and [r["step"] for r in r3] == [1, 2, 3, 4]
    for a, b in zip(r1, r2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    for a, b in zip(r2, r3, strict=True):  # resume under FSDP continues exactly
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    w1, w2, w3 = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("out1", "out2", "split"))
    from dualvitok.training import build_model

    torch.manual_seed(3)  # the trainer's initialisation
    w0 = build_model(TrainConfig.from_dict(one)).state_dict()
    keys = [k for k in w0 if w0[k].is_floating_point()]
    d1 = torch.cat([(w1[k] - w0[k]).flatten() for k in keys])  # final = EMA weights
    d2 = torch.cat([(w2[k] - w0[k]).flatten() for k in keys])
    assert d1.norm() > 0.01
    assert (d1 - d2).norm() / d1.norm() < 1e-3, ((d1 - d2).norm() / d1.norm()).item()
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    from dualvitok.loading import load_model  # a sharded checkpoint loads on one process (EMA weights = final/)

    from_shards = load_model(tmp_path / "split" / "checkpoints" / "checkpoint-00000004").state_dict()
    assert all(torch.equal(w3[k], from_shards[k]) for k in w3)


def test_fsdp_config_on_one_process_and_refusals(tmp_path):
    """run.parallel: fsdp on one process trains unsharded, writes the FSDP checkpoint format and resumes from it;
    resuming it as ddp, an unknown mode and the adaptive GAN weight under FSDP are refused with clear errors."""
    with pytest.raises(ValueError, match="run.parallel"):
        tiny_config(parallel="zero3")
    Trainer(tiny_config(parallel="fsdp"), tmp_path, max_steps=1, progress=False).train()
    state = load_checkpoint(tmp_path / "checkpoints" / "checkpoint-00000001.pt")
    assert state["parallel"] == "fsdp" and set(state["optimizer"]["state"]) <= set(state["model"])  # by name
    with pytest.raises(ValueError, match="resume it with run.parallel: fsdp"):
        Trainer(tiny_config(), tmp_path, resume=True, max_steps=2, progress=False).setup()
    Trainer(tiny_config(parallel="fsdp"), tmp_path, resume=True, max_steps=2, progress=False).train()
    assert [r["step"] for r in records(tmp_path)] == [1, 2]

    cfg = tiny_config(max_steps=1, parallel="fsdp").to_dict()
    cfg["loss"]["disc_adaptive_weight"] = True
    (tmp_path / "adaptive.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "dualvitok.cli", "train", "--config", "adaptive.yaml", "--output", "adaptive",
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "disc_adaptive_weight" in proc.stdout + proc.stderr


def test_progressive_stages_buckets_and_bf16(tmp_path):
    """Fixed 64 for two steps, then aspect-ratio buckets of <= 96*96 pixels; bf16 autocast on CPU."""
    from dualvitok.training.samplers import bucket_sizes

    cfg = tiny_config(max_steps=4, mixed_precision="bf16", ema_decay=None)
    cfg.data.stages = TrainConfig.from_dict({"data": {"stages": [
        {"mode": "fixed", "resolution": 64, "until_step": 2},
        {"mode": "anyres", "max_pixels": 96 * 96, "min_pixels": 32 * 32}]}}).data.stages
    Trainer(cfg, tmp_path, progress=False).train()
    recs = records(tmp_path)
    assert [(r["height"], r["width"]) for r in recs[:2]] == [(64, 64), (64, 64)]
    allowed = set(bucket_sizes(96 * 96, 32 * 32))
    assert all((r["height"], r["width"]) in allowed for r in recs[2:])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
