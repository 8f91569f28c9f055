"""Building and caching the native kernels (dualvitok._native): the cache, a missing or failing compiler, the switch."""

from __future__ import annotations

import os
import shlex
import shutil
import stat

import pytest

from dualvitok import _native

needs_compiler = pytest.mark.skipif(shutil.which((shlex.split(os.environ.get("CC", "cc")) or ["cc"])[0]) is None,
                                    reason="no C compiler here")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder and loader state, whatever the caller's DUALVITOK_NATIVE switch."""
    monkeypatch.setenv("DUALVITOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DUALVITOK_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_loaded", {})
    return tmp_path / "cache" / "native"


def _fake_compiler(folder, exit_code: int, message: str = "") -> str:
    """A 'compiler' script: answers --version, else prints ``message`` and exits with ``exit_code``."""
    script = folder / "fake-cc"
    script.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake-cc 1.0; exit 0; fi\n"
                      f"echo '{message}' >&2\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@needs_compiler
def test_build_caches_one_library_per_machine_and_leaves_no_temporary_file(cache, monkeypatch):
    path = _native.build("norm_silu")
    assert path is not None and path.parent == cache and path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    stamp = path.stat().st_mtime_ns
    calls = []
    real_run = _native.subprocess.run
    monkeypatch.setattr(_native.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert _native.build("norm_silu") == path and path.stat().st_mtime_ns == stamp
    assert all("--version" in cmd for cmd in calls)  # found in the cache: only the version was asked
    lib = _native.library("norm_silu")
    assert lib is not None and hasattr(lib, "dvt_norm_silu_bf16_bf16")
    assert _native.library("norm_silu") is lib  # once per process


@needs_compiler
def test_the_cache_key_follows_the_flags(cache, monkeypatch):
    first = _native.build("norm_silu")
    monkeypatch.setattr(_native, "FLAGS", (*_native.FLAGS, "-DDVT_TEST_VARIANT=1"))
    second = _native.build("norm_silu")
    assert first != second and first.is_file() and second.is_file()


def test_no_compiler_means_no_library(cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("INFO"):
        assert _native.library("norm_silu") is None
    assert "no C compiler" in caplog.text
    assert not cache.exists() or not any(cache.iterdir())


def test_a_failing_build_is_logged_and_leaves_nothing(cache, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, 1, "error: this compiler is broken"))
    with caplog.at_level("WARNING"):
        assert _native.library("norm_silu") is None
    assert "the build failed" in caplog.text and "this compiler is broken" in caplog.text
    assert not any(cache.iterdir())


def test_a_build_that_writes_nothing_is_an_error_not_a_crash(cache, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, 0))  # "succeeds" without an output file
    with caplog.at_level("WARNING"):
        assert _native.library("norm_silu") is None
    assert "could not build" in caplog.text
    assert not any(cache.iterdir())


def test_switched_off_by_the_environment(cache, monkeypatch):
    monkeypatch.setenv("DUALVITOK_NATIVE", "0")
    assert not _native.enabled()
    assert _native.library("norm_silu") is None


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("DUALVITOK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _native.cache_dir() == tmp_path / "dualvitok" / "native"


def test_the_sources_ship_with_the_package():
    """pyproject's package data covers every C source the loader builds (an installed wheel has them too)."""
    import fnmatch
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dualvitok"]
    sources = sorted(p.relative_to(root / "dualvitok").as_posix() for p in _native.SOURCE_DIR.glob("*.c"))
    assert sources == ["_native/norm_silu.c", "_native/rope.c"]
    assert all(any(fnmatch.fnmatch(source, pattern) for pattern in patterns) for source in sources)


@needs_compiler
def test_a_cache_others_can_write_is_refused(cache, caplog):
    path = _native.build("norm_silu")
    assert path is not None
    cache.chmod(0o777)
    try:
        with caplog.at_level("WARNING"):
            assert _native.build("norm_silu") is None
        assert "writable by other users" in caplog.text
    finally:
        cache.chmod(0o700)
    assert _native.build("norm_silu") == path


@needs_compiler
def test_a_symlinked_library_is_refused(cache, tmp_path, caplog):
    path = _native.build("norm_silu")
    elsewhere = tmp_path / "elsewhere.so"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with caplog.at_level("WARNING"):
        assert _native.build("norm_silu") is None
    assert "a symlink" in caplog.text


@needs_compiler
def test_the_folder_is_private_and_a_compiler_with_arguments_works(cache, monkeypatch):
    monkeypatch.setenv("CC", f"env {os.environ.get('CC', 'cc')}")  # like CC="ccache gcc"
    path = _native.build("norm_silu")
    assert path is not None and path.is_file()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


@needs_compiler
def test_an_older_folder_others_can_read_is_made_private(cache):
    cache.mkdir(parents=True, mode=0o755)
    cache.chmod(0o755)
    assert _native.build("norm_silu") is not None
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
