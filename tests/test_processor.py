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


@pytest.mark.parametrize("hw", [(1, 100000), (100000, 1), (3, 4000), (20, 20000), (1, 1), (7000, 5)])
def test_smart_resize_respects_max_pixels_for_extreme_aspect_ratios(hw):
    h, w = smart_resize(*hw)
    assert h * w <= 512 * 512, (hw, h, w)
    assert h % 16 == 0 and w % 16 == 0 and min(h, w) >= 32
    if hw[0] < hw[1]:  # the long side stays the long one
        assert w >= h
    elif hw[0] > hw[1]:
        assert h >= w


def test_smart_resize_bounds_are_checked():
    with pytest.raises(ValueError, match="max_pixels=100 is below the smallest image"):
        smart_resize(100, 100, max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels"):
        ImageProcessor(max_pixels=0)
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor(min_pixels=10**6, max_pixels=64 * 64)
    with pytest.raises(ValueError, match="positive integer"):
        ImageProcessor(size=(-16, -16))


def _gradient(h: int = 32, w: int = 32) -> np.ndarray:
    return np.linspace(0.0, 1.0, h * w, dtype=np.float64).reshape(h, w)


def _expected_from_unit(g: np.ndarray) -> torch.Tensor:
    """[-1, 1] tensor [3, H, W] of a gray [0, 1] image quantised to 8 bits (independent of the processor)."""
    u8 = torch.from_numpy((g * 255.0).round().astype(np.uint8))
    return (u8.float() / 127.5 - 1.0).expand(3, *g.shape)


def test_float_images_mode_f_keep_their_values(tmp_path):
    g = _gradient()
    image = Image.fromarray(g.astype(np.float32), mode="F")
    processor = ImageProcessor(size=(32, 32))
    got = processor(image)[0]
    torch.testing.assert_close(got, _expected_from_unit(g), atol=1 / 127.5, rtol=0)
    image.save(tmp_path / "f.tif")
    torch.testing.assert_close(processor(tmp_path / "f.tif")[0], got)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(Image.fromarray((g * 255).astype(np.float32), mode="F"))


@pytest.mark.parametrize("peak", [255, 65535, 2**31 - 1])
def test_32_bit_integer_images_are_scaled_from_their_range(tmp_path, peak):
    g = _gradient()
    image = Image.fromarray((g * peak).round().astype(np.int32), mode="I")
    assert image.mode == "I"
    processor = ImageProcessor(size=(32, 32))
    got = processor(image)[0]
    torch.testing.assert_close(got, _expected_from_unit(g), atol=1 / 127.5, rtol=0)
    image.save(tmp_path / "i.tif")
    torch.testing.assert_close(processor(tmp_path / "i.tif")[0], got)


def test_unit_range_input_warns_at_the_model_entry(tiny_model):
    x = torch.rand(1, 3, 32, 32)  # 0..1 data passed without 2 * x - 1
    with pytest.warns(UserWarning, match=r"expects \[-1, 1\]"):
        tiny_model.encode(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.encode(x * 2 - 1)


def test_settings_round_trip_through_preprocessor_config(tmp_path):
    processor = ImageProcessor(factor=16, min_pixels=64 * 64, max_pixels=256 * 256)
    path = processor.save_pretrained(tmp_path)
    assert path.name == "preprocessor_config.json" and not list(tmp_path.glob(".*tmp*"))
    import json

    assert json.loads(path.read_text())["max_pixels"] == 256 * 256
    for source in (tmp_path, path):
        loaded = ImageProcessor.from_pretrained(source)
        assert (loaded.factor, loaded.min_pixels, loaded.max_pixels, loaded.size) == (16, 64 * 64, 256 * 256, None)
        assert loaded.target_size(1000, 1000) == processor.target_size(1000, 1000)
    fixed = ImageProcessor.from_pretrained(ImageProcessor(size=(64, 96)).save_pretrained(tmp_path / "fixed"))
    assert fixed.size == (64, 96)
    empty = tmp_path / "model_without_processor"
    empty.mkdir()
    assert ImageProcessor.from_pretrained(empty).max_pixels == ImageProcessor().max_pixels


def test_bad_preprocessor_config_names_the_file_and_field(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json.*not a valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)
    path.write_text('{"max_pixels": "512"}')
    with pytest.raises(ValueError, match="preprocessor_config.json.*max_pixels"):
        ImageProcessor.from_pretrained(tmp_path)
    path.write_text('{"max_pxels": 4096}')
    with pytest.raises(ValueError, match="unknown keys.*max_pxels"):
        ImageProcessor.from_pretrained(tmp_path)


def test_processor_from_an_uncached_hub_repo_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained("dualvitok-test/not-cached", cache_dir=str(tmp_path))
