"""Editing's resize-with-padding and its way back match the reference's arithmetic and filter.

The expected values come from an independent implementation of the reference's description (ILLUME+
``ILLUME/illume/data/data_utils.py``: ``resize_with_padding`` / ``unpad_and_resize_back``): ratio ``min(W/w, H/h)``,
sides truncated with ``int``, Lanczos, padding ``delta // 2`` on the left and top, white fill.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dualvitok.unified import pad_to_size, unpad_and_resize


def _expected_box(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int, int, int]:
    ratio = min(canvas_w / width, canvas_h / height)
    new_w, new_h = int(width * ratio), int(height * ratio)
    return (canvas_w - new_w) // 2, (canvas_h - new_h) // 2, new_w, new_h


def _expected_canvas(image: Image.Image, canvas_w: int, canvas_h: int) -> np.ndarray:
    left, top, w, h = _expected_box(image.width, image.height, canvas_w, canvas_h)
    out = np.full((canvas_h, canvas_w, 3), 255, dtype=np.uint8)
    out[top:top + h, left:left + w] = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS))
    return out


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)  # smooth, like a photo


def test_box_of_a_1920x1080_source_on_the_2_to_1_anchor():
    canvas, box = pad_to_size(Image.new("RGB", (1920, 1080), (0, 0, 0)), 384, 768)
    assert (box.left, box.top, box.width, box.height) == (43, 0, 682, 384)  # int(1920 * 0.3556) = 682
    assert (box.left, box.top, box.width, box.height) == _expected_box(1920, 1080, 768, 384)
    a = np.asarray(canvas)
    assert (a[:, :43] == 255).all() and (a[:, 43 + 682:] == 255).all() and (a[:, 43:43 + 682] == 0).all()


@pytest.mark.parametrize("size, canvas", [((1920, 1080), (768, 384)), ((333, 517), (384, 512)),
                                          ((1000, 301), (960, 320)), ((64, 64), (512, 512))])
def test_pixels_match_the_reference_description(size, canvas):
    image = _photo(*size)
    got, box = pad_to_size(image, canvas[1], canvas[0])
    assert got.size == canvas
    np.testing.assert_array_equal(np.asarray(got), _expected_canvas(image, *canvas))
    assert (box.original_width, box.original_height) == size


def test_lanczos_not_bicubic_on_a_real_photo(sample_image_paths):
    with Image.open(sample_image_paths[0]) as im:
        photo = im.convert("RGB")
    got, _ = pad_to_size(photo, 512, 512)
    np.testing.assert_array_equal(np.asarray(got), _expected_canvas(photo, 512, 512))
    left, top, w, h = _expected_box(photo.width, photo.height, 512, 512)
    bicubic = np.asarray(photo.resize((w, h), Image.Resampling.BICUBIC))
    assert (np.asarray(got)[top:top + h, left:left + w] != bicubic).any()  # the test can tell the filters apart


@pytest.mark.parametrize("scale", [1, 2])  # the refiner returns twice the canvas
def test_unpad_recomputes_the_box_from_the_image_size(scale):
    source = _photo(1920, 1080)
    canvas, box = pad_to_size(source, 384, 768)
    big = canvas.resize((768 * scale, 384 * scale), Image.Resampling.NEAREST)
    left, top, w, h = _expected_box(1920, 1080, 768 * scale, 384 * scale)
    expected = big.crop((left, top, left + w, top + h)).resize((1920, 1080), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(unpad_and_resize(big, box)), np.asarray(expected))


def test_degenerate_sizes_are_refused():
    with pytest.raises(ValueError, match="aspect ratio is too extreme"):
        pad_to_size(Image.new("RGB", (10000, 1)), 512, 512)
