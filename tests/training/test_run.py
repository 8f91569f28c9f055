"""The run toolkit shared by both trainers: schedule, checkpoint folder, metrics.jsonl, skipped images, overrides,
activation checkpointing, quantizer options from configs, and the train CLI's config checks."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from dualvitok import DualViTokConfig, create_model
from dualvitok.training import TrainConfig
from dualvitok.training.checkpoint import save_checkpoint
from dualvitok.training.run import (
    CheckpointError,
    CheckpointFolder,
    SkippedImages,
    TooManySkippedError,
    apply_activation_checkpointing,
    apply_overrides,
    read_metrics,
    truncate_metrics,
    warmup_factor,
    warmup_scheduler,
)


def test_warmup_is_linear_then_constant():
    f = warmup_factor(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0)(0) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_scheduler(opt, 2)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 2.0, 2.0]


def test_checkpoint_folder_names_rotates_and_cleans(tmp_path):
    folder = CheckpointFolder(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        folder.save(step, {"step": step})
    assert [p.name for _, p in folder.entries()] == ["checkpoint-00000002.pt", "checkpoint-00000003.pt"]
    (tmp_path / "checkpoints" / ".checkpoint-00000004.pt.ab12.tmp").write_bytes(b"x" * 100)
    (tmp_path / "checkpoints" / ".checkpoint-00000005.tmp").mkdir()  # a sharded save's temporary folder
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    removed = folder.clean_temporary()
    assert sorted(p.name for p in removed) == [".checkpoint-00000004.pt.ab12.tmp", ".checkpoint-00000005.tmp"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-00000002.pt", "checkpoint-00000003.pt", "notes.txt"]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    folder = CheckpointFolder(tmp_path, keep=3)
    for step in (1, 2):
        folder.save(step, {"step": step, "w": torch.full((1000,), float(step))})
    newest = folder.path(2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated: power loss mid-copy
    with caplog.at_level(logging.WARNING):
        path, state = folder.load_latest()
    assert path == folder.path(1) and state["step"] == 1
    assert "cannot be read" in caplog.text and "checkpoint-00000002.pt" in caplog.text
    assert (tmp_path / "checkpoint-00000002.pt.corrupt").is_file()  # set aside, never loaded again
    assert folder.latest() == folder.path(1)
    folder.path(1).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        folder.load_latest()
    with pytest.raises(FileNotFoundError):
        CheckpointFolder(tmp_path / "empty").load_latest()


def test_disk_full_during_a_checkpoint_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    folder = CheckpointFolder(tmp_path, keep=2)
    folder.save(1, {"step": 1, "w": torch.ones(3)})

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on device while writing .*checkpoint-00000002\.pt") as info:
        folder.save(2, {"step": 2, "w": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000001.pt"]  # no temp file left behind
    path, state = folder.load_latest()
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_metrics_torn_last_line_is_dropped_middle_damage_is_an_error(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "incomplete last line" in caplog.text
    assert [r["step"] for r in truncate_metrics(path, 1)] == [1]
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not a valid record"):
        read_metrics(path)


def test_skipped_images_are_counted_once_listed_and_capped(tmp_path):
    skipped = SkippedImages(total=10, max_fraction=0.2, path=tmp_path / "skipped.jsonl")
    skipped.update([(3, "a.jpg", "truncated"), (3, "a.jpg", "truncated")])
    skipped.update([(5, "b.png", "not an image")])
    lines = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [r["path"] for r in lines] == ["a.jpg", "b.png"] and len(skipped.seen) == 2
    with pytest.raises(TooManySkippedError, match="3 of 10"):
        skipped.update([(7, "c.jpg", "bad")])
    restored = SkippedImages(10, 0.5)
    restored.load_state_dict(skipped.state_dict())
    assert restored.seen == skipped.seen


def test_override_rule_applies_or_refuses_never_ignores(tmp_path):
    base = create_model("dualvitok_tiny").config
    model = apply_overrides(base, {"pixel_drop_rate": 0.3, "pixel_quantizer": {"codebook_size": 64}})
    assert model.config.pixel_drop_rate == 0.3 and model.pixel_quantizer.codebook_size == 64
    with pytest.raises(ValueError, match="unknown DualViTok config field 'pixel_quantizer.size'"):
        apply_overrides(base, {"pixel_quantizer": {"size": 3}})
    torch.manual_seed(0)
    pretrained = create_model("dualvitok_tiny")
    tuned = apply_overrides(pretrained, {"pixel_drop_rate": 0.25}, "t")  # no weight changes: applied
    assert tuned.config.pixel_drop_rate == 0.25
    assert all(torch.equal(a, b) for a, b in zip(pretrained.state_dict().values(), tuned.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ValueError, match=r"change the weights of init_from.*reshaped"):
        apply_overrides(pretrained, {"pixel_quantizer": {"codebook_size": 64}}, "t")

    pretrained.save_pretrained(tmp_path / "t")  # through the trainer's build_model
    from dualvitok.training import build_model

    cfg = TrainConfig.from_dict({"model": {"init_from": str(tmp_path / "t"), "overrides": {"pixel_drop_rate": 0.2}}})
    assert build_model(cfg).config.pixel_drop_rate == 0.2
    cfg.model.overrides = {"semantic_quantizer": {"dim": 16}}
    with pytest.raises(ValueError):
        build_model(cfg)


def test_quantizer_options_from_config_and_refusals():
    from dualvitok.quantizers import SimVQ, VectorQuantizer

    overrides = {"pixel_quantizer": {"type": "VectorQuantizer", "beta": 0.5, "l2_normalize": True, "ema_decay": 0.9,
                                     "dead_code_threshold": 0.01, "init": "normal"},
                 "semantic_quantizer": {"commitment_weight": 2.0, "input_to_quantize_commit_loss_weight": 0.5,
                                        "rotation_trick": True}}
    cfg = TrainConfig.from_dict({"model": {"name": "dualvitok_tiny", "overrides": overrides}})
    from dualvitok.training import build_model

    model = build_model(cfg)
    pq, sq = model.pixel_quantizer, model.semantic_quantizer
    assert isinstance(pq, VectorQuantizer) and isinstance(sq, SimVQ)
    assert (pq.beta, pq.l2_normalize, pq.ema_decay, pq.dead_code_threshold) == (0.5, True, 0.9, 0.01)
    assert not isinstance(pq.embedding, torch.nn.Parameter)  # EMA codebook: a buffer
    assert (sq.commitment_weight, sq.input_to_quantize_commit_loss_weight, sq.rotation_trick) == (2.0, 0.5, True)
    # the two inits differ in distribution: N(0, 1) vs U(-1/K, 1/K)
    uniform = VectorQuantizer(8, 256, init="uniform").embedding.detach()
    normal = VectorQuantizer(8, 256, init="normal").embedding.detach()
    assert uniform.abs().max() <= 1 / 256 and 0.8 < normal.std() < 1.2
    # options of the other type are refused, with the field, the type and what it takes
    tiny = create_model("dualvitok_tiny").config.to_dict()
    for section, bad, match in (("pixel_quantizer", {"type": "VectorQuantizer", "rotation_trick": True},
                                 r"pixel_quantizer.rotation_trick \(True\) does not apply to type 'VectorQuantizer'"),
                                ("semantic_quantizer", {"ema_decay": 0.99},
                                 r"ema_decay \(0.99\) does not apply to type 'SimVQ'"),
                                ("pixel_quantizer", {"type": "VectorQuantizer", "init": "zeros"}, "init must be"),
                                ("pixel_quantizer", {"type": "VectorQuantizer", "ema_decay": 1.5}, "ema_decay")):
        data = json.loads(json.dumps(tiny))
        data[section].update(bad)
        with pytest.raises(ValueError, match=match):
            DualViTokConfig.from_dict(data)


def test_activation_checkpointing_same_gradients_less_saved_memory():
    """Checkpointed transformer / MoVQ blocks give the same gradients while keeping fewer activations for backward
    (measured as the bytes of the tensors autograd saves during the forward pass)."""
    torch.manual_seed(0)
    plain = create_model("dualvitok_tiny").train()
    checkpointed = create_model("dualvitok_tiny").train()
    checkpointed.load_state_dict(plain.state_dict())
    count = apply_activation_checkpointing(checkpointed)
    assert count > 0
    assert list(plain.state_dict()) == list(checkpointed.state_dict())  # keys unchanged: checkpoints interchangeable
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def run(model):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            loss = out.reconstruction.square().mean() + out.semantic_loss + out.pixel_loss
        loss.backward()
        return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    bytes_plain, grads_plain = run(plain)
    bytes_ckpt, grads_ckpt = run(checkpointed)
    print(f"saved activations: {bytes_plain / 2**20:.2f} MiB plain, {bytes_ckpt / 2**20:.2f} MiB checkpointed")
    assert bytes_ckpt < 0.6 * bytes_plain
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_train_config_types_and_cli_edges(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from dualvitok.cli import main
    from dualvitok.training import load_train_config

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"data": {"batch_size": "4"}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: .*data\.batch_size must be an integer, got '4'"):
        load_train_config(tmp_path / "bad.yaml")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "o")]) == 1
    assert "data.batch_size must be an integer, got '4'" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("[1, 2, 3]\n")
    with pytest.raises(ValueError, match="mapping of sections"):
        load_train_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="run.checkpoint_every must be >= 0"):
        TrainConfig.from_dict({"run": {"checkpoint_every": -1}})
    with pytest.raises(ValueError, match="accumulation_steps must be >= 1"):
        TrainConfig.from_dict({"optimizer": {"accumulation_steps": 0}})
    with pytest.raises(SystemExit):  # argparse refuses a negative period
        main(["train", "--config", "tiny_cpu", "--output", str(tmp_path / "o"), "--checkpoint-every", "-1"])

    from dualvitok.cli import build_parser
    from dualvitok.commands.train import apply_cli_overrides

    args = build_parser().parse_args(["train", "--config", "tiny_cpu", "--output", "o", "--checkpoint-every", "0",
                                      "--dtype", "bfloat16", "--batch-size", "3", "--num-workers", "1", "--seed", "7",
                                      "--device", "cpu", "--max-skipped-fraction", "0.5"])
    cfg = apply_cli_overrides(load_train_config("tiny_cpu"), args)
    assert (cfg.run.checkpoint_every, cfg.run.mixed_precision, cfg.run.seed, cfg.run.device) == (0, "bf16", 7, "cpu")
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.data.max_skipped_fraction) == (3, 1, 0.5)
    old = build_parser().parse_args(["train", "--config", "tiny_cpu", "--output", "o", "--mixed-precision", "bf16"])
    assert apply_cli_overrides(load_train_config("tiny_cpu"), old).run.mixed_precision == "bf16"  # deprecated alias
    untouched = apply_cli_overrides(load_train_config("tiny_cpu"),
                                    build_parser().parse_args(["train", "--config", "tiny_cpu", "--output", "o"]))
    assert untouched == load_train_config("tiny_cpu")


def test_checkpoint_in_a_sharded_folder_is_not_listed_until_complete(tmp_path):
    folder = CheckpointFolder(tmp_path)
    (tmp_path / ".checkpoint-00000003.tmp").mkdir()  # a sharded save in progress
    (tmp_path / "checkpoint-00000002").mkdir()
    save_checkpoint(tmp_path / "checkpoint-00000001.pt", {"step": 1})
    assert [s for s, _ in folder.entries()] == [1, 2]


def _shards(folder, text):
    folder.mkdir()
    (folder / "shard.distcp").write_text(text)


def test_replacing_a_sharded_folder_keeps_one_complete_folder_through_a_kill(tmp_path, monkeypatch):
    folder = CheckpointFolder(tmp_path)
    final = folder.path(3, sharded=True)
    _shards(final, "old")
    _shards(tmp_path / ".checkpoint-00000003.tmp", "new")
    folder.replace_folder(tmp_path / ".checkpoint-00000003.tmp", final)
    assert (final / "shard.distcp").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003"]  # nothing set aside is left

    # killed after the old folder was moved aside, before the new one was renamed into place
    _shards(tmp_path / ".checkpoint-00000003.tmp", "newer")
    real_replace = os.replace
    calls = []

    def dies_on_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        folder.replace_folder(tmp_path / ".checkpoint-00000003.tmp", final)
    monkeypatch.setattr(os, "replace", real_replace)
    aside = tmp_path / ".checkpoint-00000003.old"
    assert not final.exists() and aside.is_dir()
    assert folder.entries() == [(3, aside)]  # readers that do not clean up still find a complete folder of step 3
    # start-up: the complete old folder comes back, the unfinished one goes
    removed = folder.clean_temporary()
    assert [p.name for p in removed] == [".checkpoint-00000003.tmp"]
    assert (final / "shard.distcp").read_text() == "new"
    assert [s for s, _ in folder.entries()] == [3]

    # killed after the new folder arrived, before the old one was deleted: the old one is removed at start-up
    _shards(tmp_path / ".checkpoint-00000003.old", "stale")
    assert [p.name for p in folder.clean_temporary()] == [".checkpoint-00000003.old"]
    assert (final / "shard.distcp").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003"]


def test_replacing_a_sharded_folder_deletes_the_old_one_under_a_temporary_name(tmp_path, monkeypatch):
    """A delete of the old folder that fails part-way leaves a temporary folder (cleaned at start-up), never one
    that start-up would put back; a symlinked checkpoint loses its link, not its target."""
    import shutil

    folder = CheckpointFolder(tmp_path)
    final = folder.path(4, sharded=True)
    _shards(final, "old")
    _shards(tmp_path / ".checkpoint-00000004.tmp", "new")
    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: deleted.append(Path(path).name))
    folder.replace_folder(tmp_path / ".checkpoint-00000004.tmp", final)
    monkeypatch.undo()
    assert deleted[-1] == ".checkpoint-00000004.old.tmp"  # the old folder, renamed before it was deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-00000004.old.tmp", "checkpoint-00000004"]
    assert [s for s, _ in folder.entries()] == [4] and (final / "shard.distcp").read_text() == "new"
    folder.clean_temporary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000004"]

    elsewhere = tmp_path.parent / f"{tmp_path.name}-target"
    _shards(elsewhere, "kept")
    link = folder.path(5, sharded=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    _shards(tmp_path / ".checkpoint-00000005.tmp", "new")
    folder.replace_folder(tmp_path / ".checkpoint-00000005.tmp", link)
    assert not link.is_symlink() and (link / "shard.distcp").read_text() == "new"
    assert (elsewhere / "shard.distcp").read_text() == "kept"
