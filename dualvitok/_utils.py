"""Small private helpers shared across the package."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and dicts -> nested plain dicts and lists (JSON/YAML-serialisable)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a partial file.

    Yields a temporary path in the same folder (ending in ``suffix``, for writers that infer the format from the
    name); when the block succeeds the file gets the usual permissions (``0o666 & ~umask``, not ``mkstemp``'s 0600),
    is optionally fsync'ed, and is renamed over ``path``. On an exception the temporary file is removed.

    Example:
        >>> with atomic_write("out/config.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
