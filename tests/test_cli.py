"""The ``dualvitok`` command line: reconstruct and info."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from dualvitok.cli import main


def test_reconstruct_with_a_saved_model(tiny_model, tmp_path, sample_image_paths, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    code = main(["reconstruct", str(sample_image_paths[0]), "--model", str(tmp_path / "model"),
                 "--output", str(tmp_path / "out"), "--size", "64", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| 64x64 | 4 | 16 |" in out
    written = list((tmp_path / "out").iterdir())
    assert [p.name for p in written] == [f"{sample_image_paths[0].stem}_reconstruction.png"]
    assert Image.open(written[0]).size == (64, 64)


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    code = main(["reconstruct", str(tmp_path / "missing.png"), "--model", "dualvitok_tiny", "--output", str(tmp_path)])
    assert code == 1
    assert "image file not found" in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "dualvitok.cli", "info"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "dualvitok_anyres_max512" in result.stdout
