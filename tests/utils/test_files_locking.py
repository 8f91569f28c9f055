"""The one folder scan and the one-writer-per-output lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dualvitok._utils.files import IMAGE_SUFFIXES, has_image_suffix, scan_images
from dualvitok._utils.locking import OutputLockedError, output_lock


def test_scan_finds_images_sorted_and_counts_what_is_not_a_file(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.PNG", "a.jpg", "b/1.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a directory named like an image
    os.symlink(tmp_path / "missing.png", tmp_path / "broken.png")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")  # a symlink loop
    scan = scan_images(tmp_path)
    assert [scan.relative(p) for p in scan.files] == ["a.jpg", "b/1.webp", "b/2.PNG"]
    skipped = {p.name: reason for p, reason in scan.skipped}
    assert set(skipped) == {"folder.jpg", "broken.png", "loop.jpg"}
    assert "directory" in skipped["folder.jpg"]
    assert len(scan_images(tmp_path, limit=2).files) == 2


def test_scan_errors_and_single_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_images(tmp_path / "nope")
    with pytest.raises(ValueError, match=">= 0"):
        scan_images(tmp_path, limit=-1)
    (tmp_path / "x.png").write_bytes(b"x")
    assert scan_images(tmp_path / "x.png").files == [tmp_path / "x.png"]
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)
    assert has_image_suffix("A.JPEG") and not has_image_suffix("a.jpg.txt")


def test_a_second_writer_is_refused_and_the_lock_is_released(tmp_path):
    with output_lock(tmp_path, "encode"):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()}.*--output"):
            with output_lock(tmp_path, "encode"):
                pass
        with output_lock(tmp_path, "encode", rank=1):  # another rank of the same torchrun job
            pass
    with output_lock(tmp_path, "encode"):  # released
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import os, sys; from dualvitok._utils.locking import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); os._exit(9)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "held" in done.stdout and done.returncode == 9
    with output_lock(tmp_path, "train"):
        pass
