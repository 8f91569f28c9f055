"""Generation / editing resolutions: the 11 aspect-ratio anchors, anchor matching and white resize-with-padding.

Follows ILLUME+ (``illume-unified-mllm/ILLUME_plus``: ``ILLUME/illume/data/aspect_ratio_utils.py`` ``RATIOS`` /
``AspectRatioCrop`` in inference mode, ``ILLUME/illume/data/data_utils.py`` ``resize_with_padding`` and
``unpad_and_resize_back``): the anchor with the closest w/h ratio is chosen (ties broken by area distance); the image
is resized with Lanczos to ``int(side * ratio)`` (truncated), ``ratio = min(W / w, H / h)``, and padded with white,
``delta // 2`` on the left and top and the rest on the right and bottom. The way back recomputes that box from the
size of the image it is given (so a 2x refiner output is cropped at twice the offsets) and resizes with Lanczos.
The only addition: the box is also returned, as a :class:`PaddingBox`.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

ANCHORS: tuple[tuple[int, int], ...] = (
    (512, 512), (384, 512), (512, 384), (384, 768), (768, 384), (384, 576), (576, 384), (320, 960), (960, 320),
    (256, 1024), (1024, 256),
)
"""The reference's generation anchors ``(H, W)`` (about 512x512 pixels each)."""


def nearest_anchor(height: int, width: int, anchors: tuple[tuple[int, int], ...] = ANCHORS) -> tuple[int, int]:
    """Anchor ``(H, W)`` whose width/height ratio is closest to the image's (ties: closest area)."""
    ratio, area = width / height, width * height
    return min(anchors, key=lambda a: (round(abs(a[1] / a[0] - ratio), 9), abs(a[0] * a[1] - area)))


@dataclass(frozen=True)
class PaddingBox:
    """Where the resized image sits in the padded canvas (``left, top, width, height``), the canvas size and the
    original size."""

    left: int
    top: int
    width: int
    height: int
    original_width: int
    original_height: int
    canvas_width: int
    canvas_height: int


def _fit(width: int, height: int, canvas_width: int, canvas_height: int) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a ``width x height`` image fitted into the canvas as the reference does."""
    ratio = min(canvas_width / width, canvas_height / height)
    w, h = int(width * ratio), int(height * ratio)
    return (canvas_width - w) // 2, (canvas_height - h) // 2, w, h


def pad_to_size(image: Image.Image, height: int, width: int, fill=(255, 255, 255)) -> tuple[Image.Image, PaddingBox]:
    """Resize ``image`` (Lanczos) to fit ``height x width`` keeping its aspect ratio and pad it with ``fill``.

    As the reference's ``resize_with_padding``: sides ``int(side * ratio)``, padding ``delta // 2`` left and top.
    Returns the ``height x width`` RGB canvas and where the image sits in it.
    """
    if height < 1 or width < 1 or image.width < 1 or image.height < 1:
        raise ValueError(f"cannot pad a {image.width}x{image.height} image to {width}x{height} (width x height)")
    left, top, w, h = _fit(image.width, image.height, width, height)
    if w < 1 or h < 1:
        raise ValueError(f"a {image.width}x{image.height} image (width x height) would be resized to {w}x{h} in a "
                         f"{width}x{height} canvas: its aspect ratio is too extreme; crop it first")
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(image.convert("RGB").resize((w, h), Image.LANCZOS), (left, top))
    return canvas, PaddingBox(left, top, w, h, image.width, image.height, width, height)


def unpad_and_resize(image: Image.Image, box: PaddingBox) -> Image.Image:
    """Crop the padding of a generated image and resize it (Lanczos) to the original size.

    As the reference's ``unpad_and_resize_back``: the box is recomputed from ``image``'s own size and the original
    size, so an image larger than the canvas (the refiner's 2x output) is cropped at its own scale.
    """
    left, top, w, h = _fit(box.original_width, box.original_height, image.width, image.height)
    cropped = image.crop((left, top, left + w, top + h))
    return cropped.resize((box.original_width, box.original_height), Image.LANCZOS)
