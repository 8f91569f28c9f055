"""Training images: folders, files, webdataset-style tar shards and the permissively licensed scikit-image photos.

Images are addressed by index (tar members through their offsets, so shards need no ``webdataset``
package and support exact resume), decoded with :func:`dualvitok.processor.load_image` (robust RGB conversion), and
cropped deterministically from a per-sample seed (:class:`dualvitok.training.samplers.SampleSpec`): a random-resized
square or bucket-shaped crop, resized (bicubic, antialiased) to the target size, optional horizontal flip, scaled
to [-1, 1].
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .._utils.deps import require
from .._utils.files import IMAGE_SUFFIXES, has_image_suffix, scan_images
from ..processor import load_image
from .samplers import SampleSpec

logger = logging.getLogger(__name__)

__all__ = ["ImageSource", "TrainImageDataset", "BatchDataset", "collect_sources", "SKIMAGE_PHOTOS", "builtin_photos",
           "UNREADABLE"]

UNREADABLE: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What decoding a broken file raises (truncated data, not an image, bad header, a decompression bomb)."""

MAX_SUBSTITUTES = 32  # a batch slot tries at most this many images before giving up

SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
                  "ihc.png", "camera.png", "grass.png", "gravel.png", "brick.png", "moon.png", "horse.png")
"""scikit-image sample photos in the public domain or CC0 (see each loader's docstring in ``skimage.data``)."""


def builtin_photos() -> list[Path]:
    """Paths of :data:`SKIMAGE_PHOTOS` in the installed scikit-image (``builtin:skimage``)."""
    skimage_data = require("skimage.data", "dev", "'builtin:skimage'")
    folder = Path(skimage_data.__file__).parent
    found = [folder / name for name in SKIMAGE_PHOTOS if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no scikit-image sample photos in {folder}")
    return found


@dataclass(frozen=True)
class ImageSource:
    """Where one image lives: a file, or a member of a tar shard (``member`` name, byte ``offset``, ``size``)."""

    path: str
    member: str | None = None
    offset: int = 0
    size: int = 0

    @property
    def name(self) -> str:
        """The file, or ``shard.tar:member``."""
        return self.path if self.member is None else f"{self.path}:{self.member}"

    def read(self) -> Image.Image:
        """Decode to an RGB PIL image."""
        if self.member is None:
            return load_image(self.path)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        return load_image(Image.open(io.BytesIO(data)))


def _tar_sources(path: Path) -> list[ImageSource]:
    out = []
    with tarfile.open(path, "r:") as tar:  # uncompressed shards only (random access)
        for info in tar:
            if info.isfile() and has_image_suffix(info.name):
                out.append(ImageSource(str(path), info.name, info.offset_data, info.size))
    return out


def collect_sources(sources: tuple[str, ...] | list[str]) -> list[ImageSource]:
    """Expand folders (recursively), image files, ``.tar`` shards and ``builtin:skimage`` into image sources."""
    if not sources:
        raise ValueError("data.sources is empty; list image folders, files, .tar shards or 'builtin:skimage'")
    out: list[ImageSource] = []
    for spec in sources:
        if spec == "builtin:skimage":
            out += [ImageSource(str(p)) for p in builtin_photos()]
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = scan_images(path).files
            tars = sorted(path.rglob("*.tar"))
            out += [ImageSource(str(p)) for p in files]
            for t in tars:
                out += _tar_sources(t)
        elif path.suffix == ".tar" and path.is_file():
            out += _tar_sources(path)
        elif path.is_file():
            out.append(ImageSource(str(path)))
        else:
            raise FileNotFoundError(f"training data source not found: {spec} (a folder, image file, .tar shard or "
                                    "'builtin:skimage')")
    if not out:
        raise ValueError(f"no images found in {list(sources)} (suffixes {IMAGE_SUFFIXES})")
    return out


def random_resized_crop(image: Image.Image, height: int, width: int, scale: tuple[float, float],
                        flip: bool, generator: torch.Generator) -> Tensor:
    """Crop a random window of aspect ``width/height`` covering ``scale`` of the fitting window, resize, flip.

    Returns:
        ``[3, height, width]`` float in [-1, 1].
    """
    img_w, img_h = image.size
    target_ratio = width / height
    # the largest window of the target aspect ratio inside the image
    fit_w, fit_h = (img_w, img_w / target_ratio) if img_w / img_h < target_ratio else (img_h * target_ratio, img_h)
    u = torch.rand(4, generator=generator).tolist()
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    crop_w, crop_h = fit_w * s, fit_h * s
    left = (img_w - crop_w) * u[1]
    top = (img_h - crop_h) * u[2]
    crop = image.resize((width, height), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h),
                        reducing_gap=None)
    array = np.asarray(crop, dtype=np.float32)  # (H, W, 3)
    if flip and u[3] < 0.5:
        array = array[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (3, H, W)
    return (tensor / 127.5 - 1.0).clamp(-1.0, 1.0)


class TrainImageDataset(Dataset):
    """Images addressed by :class:`SampleSpec`: ``dataset[spec] -> [3, spec.height, spec.width]`` in [-1, 1]."""

    def __init__(self, sources: list[ImageSource], crop_scale: tuple[float, float] = (1.0, 1.0),
                 random_flip: bool = True, cache_images: bool = False):
        self.sources = sources
        self.crop_scale = tuple(crop_scale)
        self.random_flip = random_flip
        self.cache_images = cache_images
        self._cache: dict[int, Image.Image] = {}
        self.unreadable: dict[int, str] = {}  # found by image_sizes(): index -> reason

    def __len__(self) -> int:
        return len(self.sources)

    def image(self, index: int) -> Image.Image:
        if self.cache_images:
            if index not in self._cache:
                self._cache[index] = self.sources[index].read()
            return self._cache[index]
        return self.sources[index].read()

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image (header read only). Unreadable files get a square placeholder and
        are listed in :attr:`unreadable` (their batch slots are filled by :meth:`load`'s substitutes)."""
        sizes = []
        for i, src in enumerate(self.sources):
            try:
                if src.member is None:
                    with Image.open(src.path) as im:
                        sizes.append((im.height, im.width))
                else:
                    im = src.read()
                    sizes.append((im.height, im.width))
            except UNREADABLE as e:
                self.unreadable[i] = f"{type(e).__name__}: {e}"
                sizes.append((256, 256))
        return sizes

    def unreadable_items(self) -> list[tuple[int, str, str]]:
        """``(index, name, reason)`` of the files :meth:`image_sizes` could not read."""
        return [(i, self.sources[i].name, reason) for i, reason in sorted(self.unreadable.items())]

    def __getitem__(self, spec: SampleSpec) -> Tensor:
        generator = torch.Generator().manual_seed(spec.seed)
        return random_resized_crop(self.image(spec.index), spec.height, spec.width, self.crop_scale,
                                   self.random_flip, generator)

    def load(self, spec: SampleSpec) -> tuple[Tensor, list[tuple[int, str, str]]]:
        """``self[spec]``, but an unreadable image is replaced by the next readable one (same crop draw).

        Returns:
            the ``[3, H, W]`` crop and the ``(index, name, reason)`` of each unreadable image passed over.
            Deterministic, so a resumed run sees the same substitutes.
        """
        skipped = []
        for attempt in range(min(len(self), MAX_SUBSTITUTES)):
            index = (spec.index + attempt) % len(self)
            try:
                return self[SampleSpec(index, spec.height, spec.width, spec.seed)], skipped
            except UNREADABLE as e:
                skipped.append((index, self.sources[index].name, f"{type(e).__name__}: {e}"))
        raise ValueError(f"{len(skipped)} images in a row from {self.sources[spec.index].name} cannot be read; "
                         "the data set looks broken (see the warnings)")


class BatchDataset(Dataset):
    """Batches (lists of :class:`SampleSpec`) -> stacked ``[B, 3, H, W]`` tensors (use ``batch_size=None``)."""

    def __init__(self, images: TrainImageDataset, batches: list[list[SampleSpec]], report_skipped: bool = False):
        self.images = images
        self.batches = batches
        self.report_skipped = report_skipped

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, list[tuple[int, str, str]]]:
        """``[B, 3, H, W]``; with ``report_skipped`` also the unreadable images replaced (see
        :meth:`TrainImageDataset.load`), as ``(batch, [(index, name, reason), ...])``."""
        if not self.report_skipped:
            return torch.stack([self.images[spec] for spec in self.batches[i]])  # (B, 3, H, W)
        crops, skipped = [], []
        for spec in self.batches[i]:
            crop, passed = self.images.load(spec)
            crops.append(crop)
            skipped += passed
        return torch.stack(crops), skipped
