"""Protocol presets against torchvision's transforms, and robust reading of odd/broken files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dualvitok.evaluation import get_protocol, read_sample, scan_folder
from dualvitok.processor import ImageProcessor


def test_imagenet256_equals_torchvision_resize_and_center_crop(sample_image_paths):
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256), transforms.PILToTensor()])
    protocol = get_protocol("imagenet256")
    for path in sample_image_paths:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        for image in (rgb, rgb.transpose(Image.Transpose.ROTATE_90), rgb.resize((301, 517))):
            ours = protocol.prepare(image)
            assert ours.dtype == torch.uint8 and ours.shape == (3, 256, 256)
            assert torch.equal(ours, reference(image)), path.name


def test_native_equals_image_processor(sample_image_paths):
    protocol = get_protocol("native", max_pixels=128 * 128)
    processor = ImageProcessor(max_pixels=128 * 128)
    for path in sample_image_paths:
        sample = read_sample(0, path, protocol)
        expected = ((processor.to_tensor(path) + 1) * 127.5).round().to(torch.uint8)
        assert sample.image.shape[-1] % 16 == 0 and sample.image.shape[-2] % 16 == 0
        assert torch.equal(sample.image, expected), path.name
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        get_protocol("imagenet512")


def test_messy_folder_is_converted_or_skipped(messy_folder, messy_expected, tmp_path):
    MESSY_EXPECTED = messy_expected
    files = scan_folder(messy_folder)
    rel = [p.relative_to(messy_folder).as_posix() for p in files]
    assert sorted(rel) == sorted(MESSY_EXPECTED) and rel == sorted(rel)  # notes.txt ignored, sorted order
    protocol = get_protocol("native", max_pixels=64 * 64)
    for i, (name, path) in enumerate(zip(rel, files, strict=True)):
        s = read_sample(i, path, protocol)
        if MESSY_EXPECTED[name] == "ok":
            assert s.skip_reason is None and s.image.dtype == torch.uint8 and s.image.shape[0] == 3, name
            assert s.image.shape[1] * s.image.shape[2] <= 64 * 64
        else:
            assert s.image is None and s.skip_reason.startswith(MESSY_EXPECTED[name]), (name, s.skip_reason)
    # the transparent band of the RGBA photo is composited on white
    rgba = read_sample(0, messy_folder / "rgba.png", get_protocol("imagenet256"))
    assert int(rgba.image[:, :, :40].min()) >= 250
    assert scan_folder(messy_folder, limit=3) == files[:3]
    with pytest.raises(FileNotFoundError):
        scan_folder(messy_folder / "nope")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        scan_folder(tmp_path / "only_text")


def test_decompression_bomb_is_skipped(messy_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # large.png (1200x900) now counts as a bomb
    s = read_sample(0, messy_folder / "large.png", get_protocol("imagenet256"))
    assert s.image is None and s.skip_reason.startswith("too large")
