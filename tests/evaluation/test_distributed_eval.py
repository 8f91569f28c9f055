"""`dualvitok evaluate` under torchrun with 2 gloo processes equals the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_gloo_run_equals_single_process(tiny_model_dir, messy_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "th"), "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    common = ["-m", "dualvitok.cli", "evaluate", "--model", str(tiny_model_dir), "--data", str(messy_folder / "a"),
              "--protocol", "native", "--max-pixels", "4096", "--metrics", "psnr,ssim,usage", "--no-progress",
              "--batch-size", "1"]
    single = _run([sys.executable, *common, "--output", str(tmp_path / "single")], env)
    assert single.returncode == 0, single.stderr
    dist = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                 "--output", str(tmp_path / "dist")], env)
    if dist.returncode != 0 and "Address" in dist.stderr and "in use" in dist.stderr:
        pytest.skip("no free local port for the gloo rendezvous")
    assert dist.returncode == 0, dist.stderr[-3000:]
    a = json.loads((tmp_path / "single" / "results.json").read_text())
    b = json.loads((tmp_path / "dist" / "results.json").read_text())
    assert b["settings"]["world_size"] == 2 and a["settings"]["world_size"] == 1
    assert b["num_images"] == a["num_images"] == 2
    for name in ("psnr", "ssim"):
        assert b["metrics"][name] == pytest.approx(a["metrics"][name], rel=1e-9)
    assert b["codebook_usage"] == a["codebook_usage"]  # both codebooks summed over both ranks
    assert (tmp_path / "dist" / "state" / "rank1.safetensors").is_file()  # one state file per rank
    records = [json.loads(line) for line in (tmp_path / "dist" / "per_image.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in (tmp_path / "single" / "per_image.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [r["file"] for r in single_records]  # both ranks' images, in file order
    assert dist.stdout.count("| Model |") == 1  # only rank 0 prints and writes the reports
