"""Finding image files and reading them robustly: odd images are converted, broken ones skipped and counted.

Conversions (by :func:`dualvitok.processor.load_image`): grayscale, palette, RGBA/LA (composited on white), CMYK and
16-bit images become 8-bit RGB. Skipped, never fatal: unreadable or truncated files, non-images with an image suffix,
images with a side below the protocol's ``min_side``, and decompression bombs (PIL's ``MAX_IMAGE_PIXELS`` guard).
EXIF orientation is not applied, as in the reference evaluation (torchvision ``ImageFolder``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .._utils.files import IMAGE_SUFFIXES, scan_images
from ..processor import load_image
from .protocols import EvaluationProtocol


def scan_folder(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, by suffix, sorted by relative path), at most ``limit``.

    Raises:
        FileNotFoundError: if ``folder`` does not exist. ValueError: if it holds no image files.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    scan = scan_images(root, limit)
    if not scan.files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return scan.files


@dataclass
class Sample:
    """One file after reading: the prepared image, or why it was skipped."""

    index: int  # position in the full file list
    path: str
    image: Tensor | None  # uint8 [3, H, W], None when skipped
    skip_reason: str | None = None
    original_mode: str | None = None  # PIL mode before conversion to RGB
    original_size: tuple[int, int] | None = None  # (H, W) of the file


def read_sample(index: int, path: str | os.PathLike, protocol: EvaluationProtocol) -> Sample:
    """Read and prepare one file; never raises for bad image data (the sample is marked skipped instead)."""
    path = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode, (w, h) = im.mode, im.size
                if min(w, h) < protocol.min_side:
                    return Sample(index, path, None, f"too small ({w}x{h} < {protocol.min_side} px)", mode, (h, w))
                im.load()
                pil = load_image(im.copy())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Sample(index, path, None, f"too large: {e}")
    except Exception as e:  # truncated, corrupt, not an image, unsupported mode ...
        return Sample(index, path, None, f"unreadable: {type(e).__name__}: {e}")
    try:
        image = protocol.prepare(pil)
    except Exception as e:
        return Sample(index, path, None, f"cannot prepare: {type(e).__name__}: {e}", mode, (h, w))
    return Sample(index, path, image, None, mode, (h, w))


class ImageFileDataset(Dataset):
    """Map-style dataset over ``(index, path)`` pairs yielding :class:`Sample` (for a DataLoader with workers)."""

    def __init__(self, items: list[tuple[int, Path]], protocol: EvaluationProtocol):
        self.items = items
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        index, path = self.items[i]
        return read_sample(index, path, self.protocol)
