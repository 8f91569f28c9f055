"""Files shipped with the package: sample photos and the small demo model."""

from __future__ import annotations

from pathlib import Path

from .._utils.files import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # noqa: F401 (kept for old imports)
from .._utils.files import has_image_suffix

ASSETS_DIR = Path(__file__).resolve().parent
IMAGES_DIR = ASSETS_DIR / "images"
DEMO_MODEL_DIR = ASSETS_DIR / "demo_model"


def sample_images() -> list[Path]:
    """The bundled sample photos, sorted by name."""
    return sorted(p for p in IMAGES_DIR.iterdir() if has_image_suffix(p.name))


def demo_model_path() -> Path:
    """Folder of the bundled demo DualViTok (``config.json`` + ``model.safetensors``).

    Raises:
        FileNotFoundError: if this installation ships no demo model.
    """
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            "this dualvitok installation has no bundled demo model (dualvitok/assets/demo_model); pass --model "
            "with a folder saved by save_pretrained, a Hub repo id, or a registered name"
        )
    return DEMO_MODEL_DIR
