"""Fixtures of the evaluation tests: a tiny saved model and a folder of real photos with odd and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# file name -> expected outcome ("ok", or the start of the skip reason)
MESSY_EXPECTED = {
    "a/rgb.jpg": "ok",
    "a/b/gray.jpg": "ok",
    "rgba.png": "ok",
    "la.png": "ok",
    "cmyk.jpg": "ok",
    "sixteen_bit.png": "ok",
    "palette.gif": "ok",
    "large.png": "ok",
    "tall.webp": "ok",
    "broken/truncated.jpg": "unreadable",
    "broken/not_an_image.jpg": "unreadable",
    "broken/empty.png": "unreadable",
    "tiny.png": "too small",
}
MESSY_MODES = {"L": 1, "RGBA": 1, "LA": 1, "CMYK": 1, "I;16": 1, "P": 1}


@pytest.fixture(scope="session")
def messy_expected() -> dict[str, str]:
    return dict(MESSY_EXPECTED)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random DualViTok saved with save_pretrained."""
    from dualvitok import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    create_model("dualvitok_tiny").eval().save_pretrained(path)
    return path


def _photo(path: Path, size: tuple[int, int]) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB").resize(size, Image.BICUBIC)


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory, sample_image_paths) -> Path:
    """Real photos of mixed sizes and formats, with broken files among them (see ``MESSY_EXPECTED``)."""
    root = tmp_path_factory.mktemp("messy")
    for sub in ("a/b", "broken"):
        (root / sub).mkdir(parents=True)
    photos = sample_image_paths
    _photo(photos[0], (120, 90)).save(root / "a/rgb.jpg", quality=90)
    _photo(photos[1], (80, 112)).convert("L").save(root / "a/b/gray.jpg")
    rgba = _photo(photos[2], (96, 96)).convert("RGBA")
    alpha = np.full((96, 96), 255, np.uint8)
    alpha[:, :30] = 0  # a transparent band
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "rgba.png")
    _photo(photos[3], (70, 64)).convert("LA").save(root / "la.png")
    _photo(photos[4], (100, 75)).convert("CMYK").save(root / "cmyk.jpg")
    g16 = (np.asarray(_photo(photos[5], (64, 80)).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(g16).save(root / "sixteen_bit.png")  # mode I;16
    _photo(photos[6], (90, 60)).convert("P", palette=Image.ADAPTIVE).save(root / "palette.gif")
    _photo(photos[0], (1200, 900)).save(root / "large.png")
    _photo(photos[1], (48, 160)).save(root / "tall.webp")
    jpeg = (root / "a/rgb.jpg").read_bytes()
    (root / "broken/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "broken/not_an_image.jpg").write_text("this is not a JPEG\n")
    (root / "broken/empty.png").write_bytes(b"")
    _photo(photos[2], (8, 8)).save(root / "tiny.png")
    (root / "notes.txt").write_text("ignored: not an image suffix\n")
    with Image.open(root / "sixteen_bit.png") as im:
        assert im.mode.startswith("I;16") or im.mode == "I", im.mode
    return root
