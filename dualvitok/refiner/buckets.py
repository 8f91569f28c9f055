"""Aspect-ratio buckets for refiner training: every image goes to the supported output size of closest aspect ratio.

The ILLUME+ refiner training code is not released; it follows the usual SDXL bucketing practice: an image
is resized to cover its bucket's size and center-cropped, and every batch holds images of one bucket. The batch order
is a pure function of ``(seed, epoch)``, so a resumed run replays exactly the batches a straight run would see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .._utils.files import IMAGE_SUFFIXES, scan_images
from .resolutions import nearest_resolution, normalize_resolutions


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (the library's suffix list) under ``folder``, recursively, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    files = scan_images(folder).files
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def resize_cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic) so the image covers ``width x height``, then center-crop to exactly that size."""
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


class BucketImageDataset(Dataset):
    """Images assigned to aspect-ratio buckets; item ``i`` is a ``[3, H_b, W_b]`` tensor in [-1, 1].

    Args:
        paths: image files.
        resolutions: the buckets, as ``(width, height)`` output sizes (the refiner's supported sizes).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], resolutions: Sequence[Sequence[int]] | None = None):
        from ..processor import load_image

        self._load = load_image
        self.paths = [Path(p) for p in paths]
        self.resolutions = normalize_resolutions(resolutions)
        self.buckets: list[int] = []
        self.unreadable: dict[int, str] = {}  # index -> reason (header unreadable; bucket 0, substituted on load)
        from ..training.data import UNREADABLE

        for i, path in enumerate(self.paths):
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
            except UNREADABLE as e:
                self.unreadable[i] = f"{type(e).__name__}: {e}"
                w, h = self.resolutions[0]
            self.buckets.append(self.resolutions.index(nearest_resolution(h, w, self.resolutions)))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self._render(i, self.buckets[i])

    def _render(self, i: int, bucket: int) -> Tensor:
        width, height = self.resolutions[bucket]
        image = resize_cover_crop(self._load(self.paths[i]), width, height)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
        return x.permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]

    def load(self, i: int) -> tuple[Tensor, list[tuple[int, str, str]]]:
        """``self[i]``, but an unreadable image is replaced by the next readable one, resized to image ``i``'s
        bucket (batches stay one size); also returns the ``(index, name, reason)`` of the images passed over."""
        from ..training.data import MAX_SUBSTITUTES, UNREADABLE

        skipped = []
        for attempt in range(min(len(self), MAX_SUBSTITUTES)):
            j = (i + attempt) % len(self)
            try:
                return self._render(j, self.buckets[i]), skipped
            except UNREADABLE as e:
                skipped.append((j, str(self.paths[j]), f"{type(e).__name__}: {e}"))
        raise ValueError(f"{len(skipped)} images in a row from {self.paths[i]} cannot be read; the data set looks "
                         "broken (see the warnings)")


def bucket_batches(buckets: Sequence[int], batch_size: int, seed: int, epoch: int,
                   drop_last: bool = False) -> list[list[int]]:
    """All batches of one epoch: indices shuffled inside each bucket, cut into batches, batches shuffled.

    Deterministic in ``(seed, epoch)``; every batch holds indices of a single bucket.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    by_bucket: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(int(b), []).append(i)
    batches: list[list[int]] = []
    for b in sorted(by_bucket):
        members = by_bucket[b]
        order = torch.randperm(len(members), generator=g).tolist()
        shuffled = [members[j] for j in order]
        for start in range(0, len(shuffled), batch_size):
            chunk = shuffled[start : start + batch_size]
            if len(chunk) == batch_size or not drop_last:
                batches.append(chunk)
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in order]


class BucketBatchSampler(Sampler[list[int]]):
    """Batch sampler over one epoch of :func:`bucket_batches`, starting after ``skip`` batches (for resuming)."""

    def __init__(self, buckets: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0, skip: int = 0,
                 drop_last: bool = False):
        self.batches = bucket_batches(buckets, batch_size, seed, epoch, drop_last)[skip:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
