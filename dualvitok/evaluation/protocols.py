"""Named evaluation protocols: how a file becomes the uint8 image that is tokenized and compared.

``imagenet256`` follows the ILLUME+ reconstruction evaluation (``tokenizer/reconstruction_vq_ddp.py`` with the
``dualvitok_fix_resolution_val`` transform, resolution 256): torchvision ``Resize(256)`` (PIL bilinear on the shorter
side, longer side ``int(256 * long / short)``) then ``CenterCrop(256)``. ``native`` keeps each image near its own
size: both sides rounded to multiples of 16 with the library's ``smart_resize`` (area capped at ``max_pixels``, PIL
bicubic), as the any-resolution model is fed. Written here rather than with torchvision transforms so that the core
evaluation needs only PIL; the tests compare ``imagenet256`` with torchvision's transforms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..processor import smart_resize


@dataclass(frozen=True)
class EvaluationProtocol:
    """How images are prepared and compared.

    Args:
        name: preset name.
        resize: ``"center_crop"`` (shorter side to ``size`` then centre crop ``size x size``) or ``"multiple_of_16"``.
        size: side of the square crop (``center_crop``).
        max_pixels: area cap of ``multiple_of_16`` (None: no cap).
        min_side: files with a shorter side below this are skipped as too small.
        description: one line for the reports.
    """

    name: str
    resize: str
    size: int | None = None
    max_pixels: int | None = None
    min_side: int = 32
    description: str = ""

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` of the prepared image."""
        if self.resize == "center_crop":
            return self.size, self.size
        return smart_resize(height, width, 16, 32 * 32, self.max_pixels)

    def prepare(self, image: Image.Image) -> Tensor:
        """RGB PIL image -> uint8 ``[3, H, W]`` (H, W multiples of 16)."""
        if self.resize == "center_crop":
            image = resize_shorter_side(image, self.size, Image.BILINEAR)
            image = center_crop(image, self.size)
        elif self.resize == "multiple_of_16":
            h, w = self.target_size(image.height, image.width)
            if (image.height, image.width) != (h, w):
                image = image.resize((w, h), Image.BICUBIC)
        else:
            raise ValueError(f"unknown resize mode {self.resize!r}")
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resize_shorter_side(image: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``size`` (longer side ``int(size * long / short)``, as torchvision ``Resize``)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre ``size x size`` crop with torchvision ``CenterCrop``'s rounding (image at least ``size`` on each side)."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


PROTOCOLS: dict[str, EvaluationProtocol] = {
    "imagenet256": EvaluationProtocol(
        "imagenet256", "center_crop", size=256,
        description="shorter side to 256 (PIL bilinear), centre crop 256x256; rFID against the cropped inputs"),
    "native": EvaluationProtocol(
        "native", "multiple_of_16", max_pixels=512 * 512,
        description="native size, sides rounded to multiples of 16 (PIL bicubic), area at most 512*512"),
}


def get_protocol(name: str | EvaluationProtocol, **overrides) -> EvaluationProtocol:
    """A preset by name (``imagenet256``, ``native``), optionally with fields replaced (e.g. ``max_pixels``)."""
    if isinstance(name, EvaluationProtocol):
        protocol = name
    elif name in PROTOCOLS:
        protocol = PROTOCOLS[name]
    else:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(protocol, **overrides) if overrides else protocol
