"""One CLI convention across subcommands: shared flags, help texts with defaults, no overwritten outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dualvitok.cli import COMMANDS, build_parser
from dualvitok.commands.reconstruct import output_names


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_option_has_help_text():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.option_strings and action.help != "==SUPPRESS==":
                assert action.help, f"dualvitok {name} {action.option_strings} has no help text"
                if action.default not in (None, False, [], "==SUPPRESS=="):
                    assert "default" in action.help.lower(), f"dualvitok {name} {action.option_strings}: no default"


@pytest.mark.parametrize("command", ["reconstruct", "generate", "edit", "chat"])
def test_device_is_auto_by_default(command):
    sub = _subparsers()[command]
    device = next(a for a in sub._actions if "--device" in a.option_strings)
    assert device.default == "auto" and "cuda > mps > npu > cpu" in device.help
    dtype = next(a for a in sub._actions if "--dtype" in a.option_strings)
    assert set(dtype.choices) == {"float32", "bfloat16", "float16"}


def test_all_commands_registered():
    assert set(_subparsers()) >= {c for c in COMMANDS if c not in ("train-refiner",)}


def test_log_level_and_quiet(capsys):
    from dualvitok.cli import main

    assert main(["--log-level", "warning", "info"]) == 0
    assert main(["-q", "info"]) == 0
    assert "registered models" in capsys.readouterr().out


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "dualvitok", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dualvitok_tiny" in result.stdout


def test_same_named_inputs_get_distinct_outputs(tmp_path):
    paths = [tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.jpg", tmp_path / "c.png"]
    names = output_names(paths)
    assert len(set(names)) == 3 and names[2] == "c_reconstruction.png"
    assert names[0].endswith("a_photo_reconstruction.png") and names[1].endswith("b_photo_reconstruction.png")
    with pytest.raises(ValueError, match="same output"):
        output_names([Path("x/photo.jpg"), Path("x/photo.jpg")])


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
@pytest.mark.parametrize("argv, message", [(["--max-pixels", "0"], "must be at least 1024"),
                                           (["--size", "-16", "-16"], "positive multiples of 16"),
                                           (["--size", "100", "64"], "positive multiples of 16")])
def test_nonsense_sizes_are_refused_by_the_parser(command, argv, message, capsys):
    """Every command that resizes images checks --size and --max-pixels the same way, before any work."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, *argv, *(["x", "--output", "y"] if command == "encode" else [])])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_refiner_flag_without_an_attached_refiner_fails_before_generating():
    from dualvitok.unified.cli_support import attach_refiner

    class Model:
        refiner = None

        def generate_image(self, *args, **kwargs):  # pragma: no cover - must not be reached
            raise AssertionError("generated before checking the refiner")

    model = Model()
    assert attach_refiner(model, None) is model
    with pytest.raises(ValueError, match="--refiner PATH"):
        attach_refiner(model, "attached")


def test_reconstruct_takes_folders_and_refuses_directories_named_like_images(tmp_path, sample_image_paths, capsys):
    import shutil

    from dualvitok.cli import main

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(sample_image_paths[0], folder / "sub" / "a.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    code = main(["reconstruct", str(folder), "--model", "dualvitok_tiny", "--output", str(tmp_path / "out"),
                 "--size", "32", "32"])
    captured = capsys.readouterr()
    assert code == 0 and "| a.png | 32x32 |" in captured.out and "broken.jpg" in captured.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_reconstruction.png"]
    (tmp_path / "x.jpg").mkdir()
    assert main(["reconstruct", str(tmp_path / "x.jpg"), "--model", "dualvitok_tiny"]) == 1
    assert "is a directory, not an image file" in capsys.readouterr().err


def test_fast_path_commands_keep_freed_memory_unless_told_not_to(tmp_path, monkeypatch):
    """encode, decode, reconstruct and evaluate hand ``--default-malloc`` to the fast path's plan (its CPU default
    keeps freed buffers for the whole process)."""
    import dualvitok.inference
    from dualvitok.assets import sample_images
    from dualvitok.cli import main

    photos = sample_images()[0].parent

    seen = []
    monkeypatch.setattr(dualvitok.inference, "optimize_for_inference",  # record, and stay float32 (fast)
                        lambda model, *a, **k: seen.append(k["keep_freed_memory"]) or model)
    monkeypatch.setattr(dualvitok.inference, "agree_on_kernels", lambda model: None)
    tokens = tmp_path / "tokens"
    common = ["--dtype", "bfloat16", "--device", "cpu"]
    runs = {
        "encode": lambda out: ["encode", str(photos), "--output", str(out), "--size", "64", "64", "--limit", "1",
                               "--no-progress", *common],
        "decode": lambda out: ["decode", str(tokens), "--output", str(out), "--limit", "1", "--no-progress", *common],
        "reconstruct": lambda out: ["reconstruct", "--output", str(out), "--size", "32", "32", *common],
        "evaluate": lambda out: ["evaluate", "--output", str(out), "--limit", "1", "--metrics", "psnr", *common],
    }
    for name, argv in runs.items():
        for flag in ([], ["--default-malloc"]):
            out = tokens if name == "encode" and not flag else tmp_path / f"{name}{len(flag)}"
            seen.clear()
            assert main([*argv(out), *flag]) == 0, name
            assert seen == [not flag], f"dualvitok {name} {flag}: optimize_for_inference got {seen}"
