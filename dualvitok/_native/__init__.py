"""Small native CPU kernels, compiled on first use with the system C compiler and cached per machine.

Some element-wise work of the fast path cannot be fused with PyTorch's eager operators on CPU (a ``torch.compile``d
GroupNorm + modulation + SiLU was no faster there). The kernels here are plain C (no PyTorch headers, so a build takes
under a second), called through :mod:`ctypes` on tensors' memory; every caller keeps its PyTorch fallback, used when
this returns ``None``:

* no C compiler (``$CC``, else ``cc``), not Linux or macOS, or ``DUALVITOK_NATIVE=0`` in the environment;
* the build fails (logged once per process, with the compiler's message), or the library fails its self-check.

Build: ``$CC -O3 -march=native -fPIC -shared`` (plus ``-mprefer-vector-width=512`` on x86) and the value-safe subset
of fast-math that vectorisation needs (``-fno-math-errno -fno-trapping-math -ffinite-math-only -fno-signed-zeros``;
the last two not for the sources of :data:`VALUE_EXACT`); never ``-ffast-math``, which would link code that
changes the whole process's denormal handling. Cache: a file per (source, flags, compiler version, CPU model and
flags) under ``$DUALVITOK_CACHE`` or ``$XDG_CACHE_HOME/dualvitok`` (default ``~/.cache/dualvitok``), in ``native/``;
it is written into a fresh temporary folder there and renamed, so
concurrent processes (ranks of one job) never load a partial file. The library loaded is the one built from the
source shipped with this package: the cache folder is made private (0700), and a folder or library that is a
symlink, another user's or writable by others is refused (loading a library runs its code).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fno-trapping-math",
         "-ffinite-math-only", "-fno-signed-zeros")
"""Compiler flags of every build (``-mprefer-vector-width=512`` is added on x86)."""

_loaded: dict[str, ctypes.CDLL | None] = {}  # name -> library (None: unavailable), once per process

lock = threading.Lock()
"""Held by a kernel module while it loads and self-checks its library (:mod:`dualvitok.blocks.norm_silu`,
:mod:`dualvitok.blocks.native_rope`), so each does it once; a fresh one in a forked child, which may have been forked
while another thread held it."""


def _new_lock_after_fork() -> None:
    global lock
    lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def enabled() -> bool:
    """Whether native kernels may be built and used here (``DUALVITOK_NATIVE=0`` turns them off)."""
    if os.environ.get("DUALVITOK_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return sys.platform.startswith("linux") or sys.platform == "darwin"


def cache_dir() -> Path:
    """Where built libraries are kept: ``native/`` in ``$DUALVITOK_CACHE`` or ``$XDG_CACHE_HOME/dualvitok``
    (default ``~/.cache/dualvitok``)."""
    root = os.environ.get("DUALVITOK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dualvitok")
    return Path(root) / "native"


VALUE_EXACT = ("rope",)
"""Sources whose results must be PyTorch's bit for bit: built without ``-ffinite-math-only`` and
``-fno-signed-zeros``, which would let the compiler rewrite signed zeros and non-finite values."""

_VALUE_CHANGING = ("-ffinite-math-only", "-fno-signed-zeros")


def _flags(name: str) -> list[str]:
    flags = [f for f in FLAGS if name not in VALUE_EXACT or f not in _VALUE_CHANGING]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")
    return flags


def _cpu_identity() -> str:
    """The CPU model and feature flags (a library built with -march=native must not run on another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(dict.fromkeys(keep))  # one copy per distinct line
    except OSError:
        pass
    try:  # macOS
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                               "hw.optional.arm64"], capture_output=True, text=True, timeout=30, check=False)
        return done.stdout + platform.machine()
    except (OSError, subprocess.SubprocessError):
        return platform.processor() + platform.machine()


def _compiler_version(compiler: list[str]) -> str | None:
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _private(path: Path, folder: bool) -> str | None:
    """Why ``path`` may not be trusted (a symlink, another owner, writable by others), or ``None``."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or (stat.S_ISDIR(info.st_mode) != folder):
        return "a symlink" if stat.S_ISLNK(info.st_mode) else "not a folder" if folder else "not a file"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return "owned by another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by other users"
    return None


def build(name: str) -> Path | None:
    """Compile ``<name>.c`` of this folder into the cache (or find it there); its path, or ``None`` (logged).

    The cache folder is made private (mode 0700; an existing one of the user's that others can only read is made so
    too): a folder or library that is a symlink, belongs to another user or is writable by others is refused, since
    loading a library runs its code. The library is written
    into a fresh temporary folder beside it and renamed into place, so concurrent builders never see a partial file.
    """
    source = SOURCE_DIR / f"{name}.c"
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # e.g. CC="ccache gcc"
    if shutil.which(compiler[0]) is None:
        logger.info("native kernel %s: no C compiler (%r) found; PyTorch operators are used instead", name,
                    compiler[0])
        return None
    version = _compiler_version(compiler)
    if version is None:
        logger.warning("native kernel %s: %r --version failed; PyTorch operators are used instead", name,
                       " ".join(compiler))
        return None
    flags = _flags(name)
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(compiler), " ".join(flags), version,
                                     _cpu_identity()]).encode())
    folder = cache_dir()
    target = folder / f"{name}-{key.hexdigest()[:20]}{'.dylib' if sys.platform == 'darwin' else '.so'}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        checked, problem = folder, _private(folder, folder=True)
        if problem is None and stat.S_IMODE(folder.stat().st_mode) != 0o700:
            folder.chmod(0o700)  # an older folder others could only read: the user's own, made private
        if problem is None and (target.exists() or target.is_symlink()):
            checked, problem = target, _private(target, folder=False)
            if problem is None:
                return target
        if problem is not None:
            logger.warning("native kernel %s: %s is %s; not using it (PyTorch operators are used instead)", name,
                           checked, problem)
            return None
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}-") as scratch:
            output = Path(scratch) / target.name
            done = subprocess.run([*compiler, *flags, str(source), "-o", str(output), "-lm"], capture_output=True,
                                  text=True, timeout=300, check=False)
            if done.returncode != 0:
                logger.warning("native kernel %s: the build failed (%s %s); PyTorch operators are used instead:\n%s",
                               name, " ".join(compiler), " ".join(flags), (done.stderr or done.stdout).strip()[-2000:])
                return None
            output.chmod(0o700)
            os.replace(output, target)  # atomic: a concurrent builder's rename leaves one complete file
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("native kernel %s: could not build into %s (%s); PyTorch operators are used instead", name,
                       folder, err)
        return None
    logger.info("native kernel %s: built %s", name, target)
    return target


def library(name: str) -> ctypes.CDLL | None:
    """The loaded library ``<name>`` (built on first use), or ``None`` where native kernels are unavailable."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    if enabled():
        path = build(name)
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:  # e.g. a truncated file from a full disk: build it again, once
                logger.warning("native kernel %s: could not load %s (%s); building it again", name, path, err)
                path.unlink(missing_ok=True)
                path = build(name)
                try:
                    lib = ctypes.CDLL(str(path)) if path is not None else None
                except OSError as again:
                    logger.warning("native kernel %s: could not load %s (%s); PyTorch operators are used instead",
                                   name, path, again)
    _loaded[name] = lib
    return lib
