"""The shared atomic file writer."""

from __future__ import annotations

import os

import pytest

from dualvitok._utils import atomic_write


def test_atomic_write_replaces_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "new"
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, suffix=".npz", fsync=True) as tmp:
            assert tmp.name.endswith(".npz")
            tmp.write_text("partial")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path):
    import errno

    target = tmp_path / "state.json"
    target.write_text("previous")
    with pytest.raises(OSError) as info:
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value) and "MiB free" in str(info.value)
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_library_wrapped_disk_full_error_becomes_oserror(tmp_path):
    import errno

    target = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as info:
        with atomic_write(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos; No space left on device")
    assert info.value.errno == errno.ENOSPC and "model.safetensors" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_write(tmp_path / "x"):
            raise KeyError("not a write error")


def test_json_path_escapes_undecodable_file_names(tmp_path):
    import json

    from dualvitok._utils import json_path, write_json

    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name on a UTF-8 system: '\udce9' inside
    assert json_path(name) == "caf\\xe9.jpg"
    assert json_path("plain/é.png") == "plain/é.png"
    out = write_json(tmp_path / "index.json", {"file": json_path(name)})
    assert json.loads(out.read_text(encoding="utf-8")) == {"file": "caf\\xe9.jpg"}


def test_save_image_grid_layout(tmp_path):
    import torch
    from PIL import Image

    from dualvitok._utils import save_image_grid

    rows = [torch.full((2, 3, 4, 5), -1.0), torch.ones(2, 3, 4, 5)]
    path = save_image_grid(rows, tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.size == (10, 8)
        assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((9, 7)) == (255, 255, 255)
