"""Generation / editing resolutions: the 11 aspect-ratio anchors, anchor matching and white resize-with-padding.

Follows ILLUME+ (``illume/data/aspect_ratio_utils.py`` ``RATIOS`` / ``AspectRatioCrop`` in inference mode and the
processor's ``unpad_and_resize_back`` in ``illume-unified-mllm/ILLUME_plus``): the anchor with the closest w/h ratio
is chosen (ties broken by area distance), the image is resized to fit inside it and padded with white. Difference:
the padding is centred and the box is returned explicitly (the reference's exact offsets are not specified in the
reference notes).
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


def pad_to_size(image: Image.Image, height: int, width: int, fill=(255, 255, 255)) -> tuple[Image.Image, PaddingBox]:
    """Resize ``image`` (bicubic) to fit ``height x width`` keeping its aspect ratio, pad with ``fill`` (centred)."""
    scale = min(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (width, height), fill)
    left, top = (width - w) // 2, (height - h) // 2
    canvas.paste(image.convert("RGB").resize((w, h), Image.BICUBIC), (left, top))
    return canvas, PaddingBox(left, top, w, h, image.width, image.height, width, height)


def unpad_and_resize(image: Image.Image, box: PaddingBox) -> Image.Image:
    """Crop the padding of a generated image and resize to the original size.

    The image may be larger than the canvas (the refiner's 2x output): the box is scaled to it.
    """
    sx, sy = image.width / box.canvas_width, image.height / box.canvas_height
    cropped = image.crop((round(box.left * sx), round(box.top * sy), round((box.left + box.width) * sx),
                          round((box.top + box.height) * sy)))
    return cropped.resize((box.original_width, box.original_height), Image.BICUBIC)
