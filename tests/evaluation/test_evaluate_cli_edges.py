"""`dualvitok evaluate` edges: one writer per --output, unfinished runs, the resume command, --resume with another
--dtype, non-UTF-8 file names, bad numbers, a failed --download-weights and the deprecated --workers."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from PIL import Image

from dualvitok._utils.locking import output_lock
from dualvitok.cli import main


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DUALVITOK_FID_WEIGHTS", "DUALVITOK_LPIPS_VGG_WEIGHTS", "DUALVITOK_LPIPS_ALEX_WEIGHTS", "WORLD_SIZE",
                "RANK"):
        monkeypatch.delenv(var, raising=False)


def _args(model, data, out, *extra):
    return ["evaluate", "--model", str(model), "--data", str(data), "--protocol", "native", "--max-pixels", "4096",
            "--metrics", "psnr,ssim,usage", "--output", str(out), "--no-progress", *extra]


def test_second_writer_into_one_output_is_refused(tiny_model_dir, messy_folder, tmp_path, offline, capsys):
    out = tmp_path / "out"
    with output_lock(out, "evaluate", rank=0):  # another evaluate is running into the same folder
        assert main(_args(tiny_model_dir, messy_folder / "a", out)) == 1
    err = capsys.readouterr().err
    assert "another dualvitok evaluate" in err and str(out) in err
    assert not (out / "results.json").exists()
    assert main(_args(tiny_model_dir, messy_folder / "a", out)) == 0  # the lock went with its holder


def test_interrupted_run_prints_the_exact_resume_command(tiny_model_dir, messy_folder, tmp_path, offline, capsys,
                                                        monkeypatch):
    from dualvitok.evaluation.runner import Evaluator

    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, messy_folder / "a", full, "--batch-size", "1")) == 0
    expected = json.loads((full / "results.json").read_text())
    capsys.readouterr()

    original, calls = Evaluator._process, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "_process", interrupted)
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, messy_folder / "a", out, "--batch-size", "1", "--checkpoint-every", "1")) == 130
    err = capsys.readouterr().err
    assert "interrupted; the progress is saved in" in err
    command = next(line.strip() for line in err.splitlines() if line.strip().startswith("dualvitok evaluate "))
    assert command.endswith("--resume") and str(out) in command
    # without --resume or --overwrite the unfinished run is not silently thrown away
    assert main(_args(tiny_model_dir, messy_folder / "a", out, "--batch-size", "1")) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(shlex.split(command)[1:]) == 0  # the printed command, as printed
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["metrics"] == expected["metrics"] and resumed["codebook_usage"] == expected["codebook_usage"]
    assert calls["n"] == 3  # 2 images: 1 done before the interruption, 1 after resuming
    # --overwrite starts over
    assert main(_args(tiny_model_dir, messy_folder / "a", out, "--overwrite")) == 0


def test_resume_with_another_dtype_is_refused(tiny_model_dir, messy_folder, tmp_path, offline, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, messy_folder / "a", out)) == 0
    capsys.readouterr()
    assert main(_args(tiny_model_dir, messy_folder / "a", out, "--resume", "--dtype", "bfloat16")) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "dtype (saved 'float32', now 'bfloat16')" in err


def test_non_utf8_file_names(tiny_model_dir, sample_image_paths, tmp_path, offline):
    data = tmp_path / "data"
    data.mkdir()
    with Image.open(sample_image_paths[0]) as im:
        im.convert("RGB").resize((64, 48)).save(os.fsdecode(os.fsencode(str(data)) + b"/caf\xe9.png"))
    (Path(os.fsdecode(os.fsencode(str(data)) + b"/bro\xefken.jpg"))).write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, data, out)) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["num_images"] == 1 and results["skipped"]["files"][0]["path"].endswith("bro\\xefken.jpg")
    record = json.loads((out / "per_image.jsonl").read_text(encoding="utf-8"))
    assert record["file"].endswith("caf\\xe9.png")


@pytest.mark.parametrize("option", [("--limit", "-1"), ("--checkpoint-every", "0"), ("--batch-size", "0"),
                                    ("--grid", "-2"), ("--num-workers", "-1")])
def test_bad_numbers_are_argument_errors(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--output", str(tmp_path / "o"), *option])
    assert e.value.code == 2 and option[0] in capsys.readouterr().err


def test_failed_download_weights_exits_non_zero(tiny_model_dir, messy_folder, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("HF_HUB_OFFLINE", "DUALVITOK_OFFLINE", "DUALVITOK_LPIPS_VGG_WEIGHTS", "DUALVITOK_FID_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)

    def no_network(url, dst, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    args = ["evaluate", "--model", str(tiny_model_dir), "--data", str(messy_folder / "a"), "--output",
            str(tmp_path / "o"), "--no-progress", "--download-weights"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "download failed" in err and "name resolution" in err


def test_deprecated_workers_alias(tiny_model_dir, messy_folder, tmp_path, offline, caplog):
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, messy_folder / "a", out, "--workers", "0")) == 0
    assert "--workers is deprecated" in caplog.text


def test_evaluate_follows_the_cli_convention(capsys):
    from dualvitok.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["evaluate"])
    assert (args.device, args.dtype, args.num_workers, args.model, args.output) == ("auto", "float32", 0, "demo",
                                                                                    "dualvitok_eval")
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["evaluate"]
    dtype = next(a for a in sub._actions if "--dtype" in a.option_strings)
    assert set(dtype.choices) == {"float32", "bfloat16", "float16"}
    assert all(a.help for a in sub._actions if a.option_strings)
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--resume", "--overwrite"])  # one or the other
    assert "not allowed with" in capsys.readouterr().err
