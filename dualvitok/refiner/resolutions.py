"""Output sizes of the diffusion refiner and their micro-conditioning index.

Follows ILLUME+ ``vision_tokenizer/tokenizer/sdxl_decoder_pipe.py`` (``resolution_group``): the SDXL ``add_time_ids``
are ``[0, 0, 0, 0, 0, resolution_index]`` where the index is the position of the output size in a fixed list written
as ``(width, height)``. Any other output size is refused. The list is 2x the 11 ILLUME+ generation anchors plus 2x of
256x256. Difference: a custom list can be configured (for tiny test models or new training runs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

REFERENCE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (768, 1024), (1024, 768), (512, 2048), (2048, 512), (640, 1920),
    (1920, 640), (768, 1536), (1536, 768), (768, 1152), (1152, 768), (512, 512),
)
"""The reference's supported output sizes as ``(width, height)``; the position is the micro-conditioning index."""


def normalize_resolutions(resolutions: Sequence[Sequence[int]] | None) -> tuple[tuple[int, int], ...]:
    """Validate a list of ``(width, height)`` output sizes (``None`` -> :data:`REFERENCE_RESOLUTIONS`)."""
    if resolutions is None:
        return REFERENCE_RESOLUTIONS
    out = []
    for item in resolutions:
        if len(item) != 2 or any(int(v) != v or int(v) <= 0 for v in item):
            raise ValueError(f"resolutions must be (width, height) pairs of positive integers, got {item!r}")
        out.append((int(item[0]), int(item[1])))
    if not out:
        raise ValueError("resolutions must not be empty")
    if len(set(out)) != len(out):
        raise ValueError(f"resolutions contain duplicates: {out}")
    return tuple(out)


def format_resolutions(resolutions: Sequence[tuple[int, int]]) -> str:
    """``"1024x1024, 768x1024 (WxH), ..."`` for error messages."""
    return ", ".join(f"{w}x{h}" for w, h in resolutions) + " (width x height)"


def resolution_index(height: int, width: int, resolutions: Sequence[tuple[int, int]] = REFERENCE_RESOLUTIONS) -> int:
    """Micro-conditioning index of an output size; a clear ValueError listing the supported sizes otherwise."""
    try:
        return list(resolutions).index((int(width), int(height)))
    except ValueError:
        inputs = ", ".join(f"{w // 2}x{h // 2}" for w, h in resolutions if w % 2 == 0 and h % 2 == 0)
        raise ValueError(
            f"the refiner cannot produce {width}x{height} (width x height) images; supported output sizes are "
            f"{format_resolutions(resolutions)}, i.e. tokens of {inputs} images (it upsamples 2x)"
        ) from None


def nearest_resolution(height: int, width: int, resolutions: Sequence[tuple[int, int]] = REFERENCE_RESOLUTIONS
                       ) -> tuple[int, int]:
    """The ``(width, height)`` in ``resolutions`` whose aspect ratio is closest (in log ratio) to ``width/height``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(resolutions, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - target), -wh[0] * wh[1]))
