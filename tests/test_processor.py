"""ImageProcessor: size policy, format conversion, batching rules, exact uint8 round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualvitok import ImageProcessor
from dualvitok.processor import load_image, smart_resize


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((256, 256), (256, 256)),
        ((250, 333), (256, 336)),  # nearest multiples of 16
        ((1000, 1000), (512, 512)),  # area above 512^2: floor(1000/(1000/512)/16)*16
        ((20, 20), (32, 32)),  # below min_pixels: scaled up (ceil)
        ((600, 300), (608, 304)),  # 600 rounds up to 608, 300 to 304; area below 512^2
        ((2000, 1000), (720, 352)),  # beta = sqrt(2e6 / 512^2); floor(2000 / beta / 16) * 16 = 720
    ],
)
def test_smart_resize_policy(hw, expected):
    h, w = hw
    got = smart_resize(h, w)
    assert got == expected
    assert got[0] % 16 == 0 and got[1] % 16 == 0 and got[0] * got[1] <= 512 * 512


def test_formats_are_converted_to_rgb(tmp_path, sample_image_paths):
    src = Image.open(sample_image_paths[0]).convert("RGB").resize((64, 48))
    variants = {
        "gray.png": src.convert("L"),
        "rgba.png": src.convert("RGBA"),
        "cmyk.jpg": src.convert("CMYK"),
        "palette.png": src.convert("P"),
    }
    for name, im in variants.items():
        im.save(tmp_path / name)
    Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "gray16.png")
    for path in tmp_path.iterdir():
        im = load_image(path)
        assert im.mode == "RGB" and im.size == (64, 48), path.name
    gray16 = np.asarray(load_image(tmp_path / "gray16.png"))[..., 0]
    assert np.array_equal(gray16, np.asarray(src.convert("L")))


def test_rgba_is_composited_on_white():
    a = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    assert np.asarray(load_image(a)).min() == 255


def test_uint8_round_trip_is_exact(sample_image_paths):
    processor = ImageProcessor(size=(64, 64))
    x = processor(sample_image_paths[0])
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    pil = Image.open(sample_image_paths[0]).convert("RGB").resize((64, 64), Image.BICUBIC)
    assert np.array_equal(np.asarray(processor.postprocess(x)[0]), np.asarray(pil))


def test_mixed_sizes_are_refused_or_grouped():
    processor = ImageProcessor()
    a, b = np.zeros((64, 64, 3), np.uint8), np.zeros((32, 96, 3), np.uint8)
    with pytest.raises(ValueError, match="different sizes"):
        processor([a, b, a])
    groups = processor.group([a, b, a])
    assert sorted((idx, tuple(t.shape)) for idx, t in groups) == [([0, 2], (2, 3, 64, 64)), ([1], (1, 3, 32, 96))]


def test_bad_inputs():
    with pytest.raises(FileNotFoundError):
        load_image("/does/not/exist.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0))
    with pytest.raises(TypeError, match="unsupported"):
        load_image(3)
    with pytest.raises(ValueError, match="multiples of 16"):
        ImageProcessor(size=(30, 32))


def test_corrupt_file_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(bad)
