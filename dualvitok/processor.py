"""Image files / PIL images / arrays <-> model tensors ``[B, 3, H, W]`` in [-1, 1].

Size policy (the reference's ``MoVQImageProcessor.smart_resize`` with factor 16, as Qwen2-VL's ``smart_resize``):
each side is rounded to the nearest multiple of 16; if the area is then above ``max_pixels`` both sides are scaled
down (floor to multiples of 16), if below ``min_pixels`` scaled up (ceil); every side is at least 32. For extreme
aspect ratios (a short side under 32 after scaling) the short side is raised to 32 and the long side shortened so
that the area stays within ``max_pixels`` (the aspect ratio then changes, with a warning). The image is resized (PIL
bicubic) to that size: no cropping; otherwise the aspect ratio changes by at most a few pixels. A fixed ``size``
can be given instead. Images of different sizes in one call are refused with a clear error, or grouped with
:meth:`ImageProcessor.group`.

Pixel formats: 8-bit images as they are; 16-bit (``I;16``) and 32-bit integer (``I``) images are scaled from their
range (values up to 255: 8-bit data; up to 65535: 16-bit; above: the int32 range); float images (mode ``F``, float
arrays and tensors) must be in [0, 1]. The settings are saved as ``preprocessor_config.json``
(:meth:`ImageProcessor.save_pretrained` / :meth:`ImageProcessor.from_pretrained`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._utils import write_json

logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 32 * 32,
                 max_pixels: int | None = 512 * 512) -> tuple[int, int]:
    """Target ``(H, W)``, multiples of ``factor``, for an ``height x width`` image (see the module docstring).

    The result always has sides of at least ``2 * factor`` and an area of at most ``max_pixels``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image has an empty side: {height}x{width}")
    min_side = 2 * factor
    if max_pixels is not None and max_pixels < min_side * min_side:
        raise ValueError(f"max_pixels={max_pixels} is below the smallest image, {min_side}x{min_side} = "
                         f"{min_side * min_side} pixels; use max_pixels >= {min_side * min_side}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if max_pixels is not None and h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    h, w = max(min_side, h), max(min_side, w)
    if max_pixels is not None and h * w > max_pixels:  # a side was raised to min_side: shorten the other one
        if h >= w:
            h = max(min_side, max_pixels // w // factor * factor)
        else:
            w = max(min_side, max_pixels // h // factor * factor)
        logger.warning("a %dx%d image has an extreme aspect ratio: it is resized to %dx%d (max_pixels=%d); crop it "
                       "first to keep its aspect ratio", height, width, h, w, max_pixels)
    return h, w


def load_image(image: ImageInput) -> Image.Image:
    """Any supported input -> an RGB PIL image (grayscale, palette, RGBA/LA on white, CMYK, 16-bit converted)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # CHW -> HWC
        image = image.numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__name__}: use a path, PIL image, array or tensor")
    return _to_rgb(image)


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"arrays must be HxW, HxWx1, HxWx3 or HxWx4 (or CxHxW tensors), got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("image array contains NaN or infinite values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(f"float image arrays must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]; "
                             "pass uint8 arrays for 0..255 data")
        a = (a * 255.0).round().astype(np.uint8)
    else:
        raise TypeError(f"unsupported array dtype {a.dtype}: use uint8, uint16 or float in [0, 1]")
    if a.shape[2] == 1:
        return Image.fromarray(a[:, :, 0], mode="L")
    return Image.fromarray(a, mode="RGB" if a.shape[2] == 3 else "RGBA")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(image, dtype=np.float64)
        if a.size and a.min() < 0:
            raise ValueError(f"integer image (mode {image.mode}) has negative values (min {a.min():.0f}); "
                             "rescale it to 0..255 and pass a uint8 array")
        peak = a.max() if a.size else 0.0
        scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(2**31 - 1)
        return Image.fromarray((a / scale * 255.0).round().clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":  # 32-bit float: values in [0, 1], as float arrays (PIL's own convert would clip to 0/1)
        return _array_to_pil(np.asarray(image, dtype=np.float32)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


class ImageProcessor:
    """Convert images to DualViTok input and back.

    Args:
        factor: sides become multiples of this (16, the pixel encoder's stride).
        min_pixels, max_pixels: area bounds of the size policy (``max_pixels=None``: no upper bound).
        size: fixed output ``(H, W)`` instead of the size policy (multiples of ``factor``).

    Example:
        >>> processor = ImageProcessor()
        >>> images = processor(["a.jpg"])  # [1, 3, H, W] in [-1, 1]  # doctest: +SKIP
        >>> pil = processor.postprocess(model(images).reconstruction)  # doctest: +SKIP
    """

    def __init__(self, factor: int = 16, min_pixels: int = 32 * 32, max_pixels: int | None = 512 * 512,
                 size: tuple[int, int] | None = None):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageProcessor {name} must be a positive integer, got {value!r}")

        positive_int("factor", factor)
        positive_int("min_pixels", min_pixels)
        if max_pixels is not None:
            positive_int("max_pixels", max_pixels)
            smallest = (2 * factor) ** 2
            if max_pixels < smallest:
                raise ValueError(f"ImageProcessor max_pixels={max_pixels} is below the smallest image "
                                 f"({2 * factor}x{2 * factor} = {smallest} pixels)")
            if min_pixels > max_pixels:
                raise ValueError(f"ImageProcessor min_pixels={min_pixels} is above max_pixels={max_pixels}")
        if size is not None:
            if len(size) != 2:
                raise ValueError(f"size must be (H, W), got {size!r}")
            for side in size:
                positive_int("size", side)
            if size[0] % factor or size[1] % factor:
                raise ValueError(f"size must be multiples of {factor}, got {tuple(size)}")
            size = (int(size[0]), int(size[1]))
        self.factor, self.min_pixels, self.max_pixels, self.size = factor, min_pixels, max_pixels, size

    def __repr__(self) -> str:
        return (f"ImageProcessor(factor={self.factor}, min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, "
                f"size={self.size})")

    def to_dict(self) -> dict:
        """The settings as a JSON-serialisable dict (the content of ``preprocessor_config.json``)."""
        return {"processor_class": "ImageProcessor", "library_name": "dualvitok", "factor": self.factor,
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "size": list(self.size) if self.size is not None else None}

    @classmethod
    def from_dict(cls, data: dict, source: str = "processor config") -> ImageProcessor:
        """Inverse of :meth:`to_dict`; unknown keys, wrong types and bad values raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {"factor", "min_pixels", "max_pixels", "size"}
        unknown = sorted(set(data) - known - {"processor_class", "library_name"})
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known: {sorted(known)}")
        kwargs = {k: data[k] for k in known if k in data}
        if isinstance(kwargs.get("size"), list):
            kwargs["size"] = tuple(kwargs["size"])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``save_directory`` (atomically); returns its path."""
        return write_json(Path(save_directory) / PROCESSOR_CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | None = None,
                        local_files_only: bool | None = None) -> ImageProcessor:
        """Load the settings from a folder, a ``preprocessor_config.json`` file or a Hub repo.

        A model folder or repo without ``preprocessor_config.json`` gives the defaults (with an info log).
        """
        source = Path(pretrained_model_name_or_path)
        if source.is_file():
            path = source
        else:
            from ._hubfiles import HubFiles

            files = HubFiles(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                             local_files_only=local_files_only)
            found = files.find(PROCESSOR_CONFIG_NAME)
            if found is None:
                if files.offline_reason is not None:
                    raise files.not_found(PROCESSOR_CONFIG_NAME)
                logger.info("no %s in %s: using the default ImageProcessor settings", PROCESSOR_CONFIG_NAME,
                            pretrained_model_name_or_path)
                return cls()
            path = Path(found)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON processor config ({e})") from e
        return cls.from_dict(data, source=str(path))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` an ``height x width`` image is resized to."""
        if self.size is not None:
            return tuple(self.size)
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def to_tensor(self, image: ImageInput) -> Tensor:
        """One image -> ``[3, H, W]`` float32 in [-1, 1], resized by the size policy."""
        pil = load_image(image)
        h, w = self.target_size(pil.height, pil.width)
        if (pil.height, pil.width) != (h, w):
            pil = pil.resize((w, h), Image.BICUBIC)
        a = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
        return a.float() / 127.5 - 1.0

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Images -> ``[B, 3, H, W]`` in [-1, 1]. All images must end up with the same size (else see ``group``)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        tensors = [self.to_tensor(im) for im in images]
        sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
        if len(sizes) > 1:
            raise ValueError(f"images have different sizes after resizing: {sizes}. "
                             "Use ImageProcessor(size=(H, W)) for one size, "
                             "or ImageProcessor.group(...) to batch images of each size separately")
        return torch.stack(tensors)

    def group(self, images: Iterable[ImageInput]) -> list[tuple[list[int], Tensor]]:
        """Batch images of each size separately: ``[(positions in the input, [b, 3, H, W]), ...]``."""
        groups: dict[tuple[int, int], tuple[list[int], list[Tensor]]] = {}
        for i, im in enumerate(images):
            t = self.to_tensor(im)
            idx, ts = groups.setdefault(tuple(t.shape[-2:]), ([], []))
            idx.append(i)
            ts.append(t)
        return [(idx, torch.stack(ts)) for idx, ts in groups.values()]

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, 3, H, W]``, rounded as the reference saves PNGs."""
        return (images.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)

    def postprocess(self, images: Tensor) -> list[Image.Image]:
        """``[B, 3, H, W]`` in [-1, 1] -> RGB PIL images."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        arrays = self.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arrays]
