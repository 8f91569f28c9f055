"""The one image-suffix list and folder scan, used by evaluate, encode, train and train-refiner alike.

A scan never follows a symlink loop and never takes a folder for a file: entries that carry an image suffix but are
not readable regular files are returned as skipped, with the reason, so commands can count and list them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm",
                                   ".pgm", ".jfif")


def has_image_suffix(name: str | os.PathLike) -> bool:
    """True if the name ends in one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return os.fspath(name).lower().endswith(IMAGE_SUFFIXES)


@dataclass
class FolderScan:
    """Image files found under a root (sorted by relative POSIX path) and image-named entries that are not files."""

    root: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, with ``/`` separators (the stable key of a file)."""
        return path.relative_to(self.root).as_posix() if path != self.root else path.name


def scan_images(root: str | os.PathLike, limit: int | None = None) -> FolderScan:
    """Image files under ``root`` (recursive, symlinks to files followed, symlinked folders not), at most ``limit``.

    A file given as ``root`` is returned on its own. Directories or broken links named like images, and symlink
    loops, are listed in :attr:`FolderScan.skipped`.

    Raises:
        FileNotFoundError: ``root`` does not exist. ValueError: ``limit`` is negative.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (or None for all files), got {limit}")
    root = Path(root)
    if root.is_file():
        return FolderScan(root.parent, [root])
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    scan = FolderScan(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:  # folders named like images are not images: say so
            if has_image_suffix(name):
                scan.skipped.append((base / name, "a directory, not an image file"))
        for name in filenames:
            if not has_image_suffix(name):
                continue
            path = base / name
            try:
                if path.is_file():
                    scan.files.append(path)
                else:
                    scan.skipped.append((path, "not a regular file (broken link?)"))
            except OSError as e:  # symlink loops raise ELOOP
                scan.skipped.append((path, f"cannot stat: {e.strerror or e}"))
    scan.files.sort(key=lambda p: p.relative_to(root).as_posix())
    scan.skipped.sort(key=lambda item: item[0].as_posix())
    if limit is not None:
        scan.files = scan.files[:limit]
    return scan
