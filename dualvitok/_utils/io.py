"""Atomic file writers: a file holds its old content or the complete new one, never a partial file.

Write errors (a full disk above all) are re-raised as :class:`OSError` naming the file and, for ENOSPC, the space
that was left, so a caller can say what to free; the temporary file is removed and the previous file stays intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
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
        try:
            yield tmp
        except Exception as e:  # torch.save and safetensors wrap ENOSPC in their own exception types
            if isinstance(e, OSError) or _is_disk_full(e):
                raise _explain_write_error(e, path) from e
            raise
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


def _explain_write_error(error: Exception, path: Path) -> OSError:
    """An OSError that names ``path`` and, when the disk is full, how much space is left there."""
    if _is_disk_full(error):
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = -1
        left = f"{free / 2**20:.1f} MiB free" if free >= 0 else "free space unknown"
        return OSError(errno.ENOSPC, f"no space left on device while writing {path} ({left} in {path.parent}); "
                                     "free some space and run again (the previous file, if any, is unchanged)")
    return OSError(getattr(error, "errno", None), f"cannot write {path}: {getattr(error, 'strerror', None) or error}")


def _is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC, also when a library wraps it in another exception type (safetensors, torch.save)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(error) or "enforce fail at inline_container" in str(error)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON atomically; file names that are not valid UTF-8 are escaped (see json_path)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8",
                       errors="backslashreplace")
    return Path(path)


def json_path(path: str | os.PathLike) -> str:
    """A path as a JSON-safe string: undecodable bytes of a file name (``\\udce9`` surrogates) become ``\\xe9``."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def save_image(image: Any, path: str | os.PathLike, format: str | None = None) -> Path:
    """Save a PIL image atomically; the format is ``format``, else the suffix's (PNG when there is none)."""
    path = Path(path)
    fmt = format or path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    with atomic_write(path) as tmp:
        image.save(tmp, format=fmt)
    return path


def image_grid(rows: list[Any]) -> Any:
    """Rows of images ``[B, 3, H, W]`` in [-1, 1] (tensors) -> one PIL image ``R*H x B*W``."""
    import torch
    from PIL import Image

    grid_rows = []
    for row in rows:
        row = row.detach().float().cpu().clamp(-1, 1)
        grid_rows.append(torch.cat(list(row), dim=-1))  # (3, H, B*W)
    grid = torch.cat(grid_rows, dim=-2)  # (3, R*H, B*W)
    array = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_image_grid(rows: list[Any], path: str | os.PathLike) -> Path:
    """Save rows of images ``[B, 3, H, W]`` in [-1, 1] (e.g. inputs, reconstructions) as one PNG grid, atomically."""
    return save_image(image_grid(rows), path)
