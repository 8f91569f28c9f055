"""Checkpoints: atomic writes, weights_only loading, RNG capture/restore, latest_checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from dualvitok.training.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "loss": 0.25, "name": "run",
        "nested": {"list": [1, 2.5, "x", None, (3, 4)], "flag": True}, "rng": capture_rng_state(),
    }


def test_round_trip_weights_only(tmp_path):
    state = _state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    loaded = torch.load(path, weights_only=True)  # the contract: loadable without unpickling code
    assert loaded["step"] == 7 and loaded["loss"] == 0.25 and loaded["name"] == "run"
    assert loaded["nested"]["list"][:4] == [1, 2.5, "x", None]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left


def test_rng_restore_reproduces_all_generators(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(0, 1000, 4).tolist(),
                torch.rand(3).tolist(), random.gauss(0, 1))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(0, 1000, 4).tolist(),
           torch.rand(3).tolist(), random.gauss(0, 1))
    assert got == expected


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    for step in (5, 40, 300):
        save_checkpoint(tmp_path / "checkpoints" / f"checkpoint-{step:08d}.pt", {"step": step})
    (tmp_path / "checkpoints" / ".checkpoint-00000900.pt.abc.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000300.pt"
    assert latest_checkpoint(tmp_path / "checkpoints").name == "checkpoint-00000300.pt"


def test_exception_during_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")
def test_killed_while_writing_keeps_previous(tmp_path):
    """A process killed (SIGKILL) in the middle of torch.save leaves the previous checkpoint intact."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(4.0)})
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import os, time, torch
        from dualvitok.training.checkpoint import save_checkpoint
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            f.write(b"x" * 100000)
            f.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(60)  # killed here, mid-write
            real_save(obj, f, *a, **k)
        torch.save = slow_save
        save_checkpoint({str(path)!r}, {{"step": 2, "w": torch.zeros(4)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.time() < deadline, "writer never started writing"
            time.sleep(0.05)
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert temps, "the write must go to a temporary file"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert latest_checkpoint(tmp_path) is None  # 'ckpt.pt' is not a checkpoint-N.pt name; temp files are never picked
