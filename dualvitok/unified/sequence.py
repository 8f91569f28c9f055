"""Coarse-to-fine image blocks: building, skeletons for continuous input, and parsing.

Follows ILLUME+ (``illume/data/data_utils.encode_image_token_into_code`` and ``illume_arch.encode_images`` in
``illume-unified-mllm/ILLUME_plus``): ``<start_of_image> <start_of_level0> [w1 semantic codes <end_of_line>] x h1
<end_of_level0> <start_of_level1> [w2 pixel codes <end_of_line>] x h2 <end_of_level1> <end_of_image>``, preceded in
prompts by ``<height_H><width_W>``. The semantic grid uses DualViTok's resolution mapping
(:func:`dualvitok.semantic.semantic_grid_size`), the pixel grid is H/16 x W/16. Differences: parsing works on ids
(not on decoded text with a regex) and raises :class:`ImageBlockError` on a malformed block instead of silently
padding or truncating as the reference demo does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..semantic import semantic_grid_size
from .vocabulary import PIXEL_LEVEL, SEMANTIC_LEVEL, VisionVocabulary

SEMANTIC_SLOT, PIXEL_SLOT = -1, -2
"""Placeholder values in a block skeleton for a semantic / pixel code position."""


class ImageBlockError(ValueError):
    """A token sequence is not a well-formed image block."""


@dataclass(frozen=True)
class ImageGrids:
    """Token grids of one image: ``semantic = (hs, ws)``, ``pixel = (h, w)``."""

    semantic: tuple[int, int]
    pixel: tuple[int, int]

    @property
    def num_semantic(self) -> int:
        return self.semantic[0] * self.semantic[1]

    @property
    def num_pixel(self) -> int:
        return self.pixel[0] * self.pixel[1]

    @property
    def block_length(self) -> int:
        """Tokens from ``<start_of_image>`` to ``<end_of_image>``: ``2 + (2 + hs(ws+1)) + (2 + h(w+1))``."""
        (hs, ws), (h, w) = self.semantic, self.pixel
        return 2 + (2 + hs * (ws + 1)) + (2 + h * (w + 1))


def image_grids(height: int, width: int, semantic_unit: int = 28, pixel_factor: int = 16) -> ImageGrids:
    """Grids of an ``height x width`` image (pixels): 256x256 -> 9x9 + 16x16, 512x512 -> 18x18 + 32x32."""
    if height % pixel_factor or width % pixel_factor or height < semantic_unit or width < semantic_unit:
        raise ValueError(f"image size {height}x{width} must be multiples of {pixel_factor} and at least "
                         f"{semantic_unit}")
    return ImageGrids(semantic_grid_size(height, width, semantic_unit), (height // pixel_factor, width // pixel_factor))


def resolution_tag(height: int, width: int) -> str:
    """``<height_H><width_W>`` (pixel values, height first)."""
    return f"<height_{height}><width_{width}>"


def block_skeleton(vocabulary: VisionVocabulary, grids: ImageGrids) -> Tensor:
    """The block's ids with :data:`SEMANTIC_SLOT` / :data:`PIXEL_SLOT` at code positions: ``[block_length]``."""
    parts: list[Tensor] = [torch.tensor([vocabulary.start_of_image])]
    for level, (rows, cols), slot in ((SEMANTIC_LEVEL, grids.semantic, SEMANTIC_SLOT),
                                      (PIXEL_LEVEL, grids.pixel, PIXEL_SLOT)):
        row = torch.full((rows, cols + 1), slot, dtype=torch.long)
        row[:, -1] = vocabulary.end_of_line
        parts += [torch.tensor([vocabulary.start_of_level(level)]), row.flatten(),
                  torch.tensor([vocabulary.end_of_level(level)])]
    parts.append(torch.tensor([vocabulary.end_of_image]))
    return torch.cat(parts).long()


def build_image_block(vocabulary: VisionVocabulary, semantic_indices: Tensor, pixel_indices: Tensor) -> Tensor:
    """Token ids of image blocks.

    Shape: ``semantic_indices [B, hs, ws]``, ``pixel_indices [B, h, w]`` (or without the batch dim) ->
    ``[B, block_length]`` (or ``[block_length]``).
    """
    squeeze = semantic_indices.ndim == 2
    if squeeze:
        semantic_indices, pixel_indices = semantic_indices[None], pixel_indices[None]
    if semantic_indices.ndim != 3 or pixel_indices.ndim != 3 or len(semantic_indices) != len(pixel_indices):
        raise ValueError(f"expected semantic [B, hs, ws] and pixel [B, h, w] indices, got "
                         f"{tuple(semantic_indices.shape)} and {tuple(pixel_indices.shape)}")
    grids = ImageGrids(tuple(semantic_indices.shape[1:]), tuple(pixel_indices.shape[1:]))
    skeleton = block_skeleton(vocabulary, grids).to(semantic_indices.device)
    blocks = skeleton.expand(len(semantic_indices), -1).clone()  # [B, L]
    blocks[:, skeleton == SEMANTIC_SLOT] = vocabulary.codes_to_ids(semantic_indices.flatten(1), SEMANTIC_LEVEL)
    blocks[:, skeleton == PIXEL_SLOT] = vocabulary.codes_to_ids(pixel_indices.flatten(1), PIXEL_LEVEL)
    return blocks[0] if squeeze else blocks


@dataclass
class ParsedImage:
    """One parsed image block: ``semantic_indices [hs, ws]``, ``pixel_indices [h, w]`` and its ``[start, end)`` span."""

    semantic_indices: Tensor
    pixel_indices: Tensor
    start: int
    end: int

    @property
    def grids(self) -> ImageGrids:
        return ImageGrids(tuple(self.semantic_indices.shape), tuple(self.pixel_indices.shape))


def _parse_level(ids: list[int], pos: int, vocabulary: VisionVocabulary, level: int,
                 grid: tuple[int, int] | None) -> tuple[Tensor, int]:
    """Parse ``<start_of_level> rows <end_of_level>`` from ``ids[pos:]`` -> (``[rows, cols]`` codes, next pos)."""
    name = "semantic (level 0)" if level == SEMANTIC_LEVEL else "pixel (level 1)"

    def expect(i: int, token: int, what: str) -> None:
        got = ids[i] if i < len(ids) else None
        if got != token:
            found = "the end of the sequence" if got is None else f"id {got}"
            raise ImageBlockError(f"malformed image block: expected {what} at position {i}, found {found}")

    expect(pos, vocabulary.start_of_level(level), f"<start_of_level{level}>")
    pos += 1
    start, end = vocabulary.code_range(level)
    rows: list[list[int]] = []
    row: list[int] = []
    while True:
        if pos >= len(ids):
            raise ImageBlockError(f"malformed image block: the {name} grid is cut off after {len(rows)} rows "
                                  f"(missing <end_of_level{level}>)")
        tok = ids[pos]
        if start <= tok < end:
            row.append(tok - start)
        elif tok == vocabulary.end_of_line:
            if grid is not None and len(row) != grid[1]:
                raise ImageBlockError(f"malformed image block: {name} row {len(rows)} has {len(row)} codes, "
                                      f"expected {grid[1]}")
            if rows and len(row) != len(rows[0]):
                raise ImageBlockError(f"malformed image block: {name} row {len(rows)} has {len(row)} codes but row 0 "
                                      f"has {len(rows[0])}")
            if not row:
                raise ImageBlockError(f"malformed image block: empty {name} row {len(rows)}")
            rows.append(row)
            row = []
        elif tok == vocabulary.end_of_level(level):
            if row:
                raise ImageBlockError(f"malformed image block: the last {name} row has no <end_of_line>")
            break
        else:
            raise ImageBlockError(f"malformed image block: unexpected id {tok} at position {pos} inside the {name} "
                                  f"grid (allowed: level-{level} codes, <end_of_line>, <end_of_level{level}>)")
        pos += 1
    if not rows:
        raise ImageBlockError(f"malformed image block: the {name} grid is empty")
    if grid is not None and len(rows) != grid[0]:
        raise ImageBlockError(f"malformed image block: the {name} grid has {len(rows)} rows, expected {grid[0]}")
    return torch.tensor(rows, dtype=torch.long), pos + 1


def parse_image_block(vocabulary: VisionVocabulary, ids: Tensor | list[int], grids: ImageGrids | None = None,
                      start: int | None = None) -> ParsedImage:
    """Parse the first image block in ``ids`` (1-D).

    Args:
        vocabulary: the vision vocabulary.
        ids: token ids ``[N]``; text before and after the block is ignored.
        grids: expected grid sizes; ``None`` infers them from the ``<end_of_line>`` tokens.
        start: position of ``<start_of_image>`` (default: its first occurrence).

    Raises:
        ImageBlockError: no block, a missing marker, a wrong row length or count, or a foreign token inside.
    """
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    if start is None:
        try:
            start = ids.index(vocabulary.start_of_image)
        except ValueError:
            raise ImageBlockError("no image block: the sequence has no <start_of_image> token") from None
    elif start >= len(ids) or ids[start] != vocabulary.start_of_image:
        raise ImageBlockError(f"no <start_of_image> at position {start}")
    semantic, pos = _parse_level(ids, start + 1, vocabulary, SEMANTIC_LEVEL, grids.semantic if grids else None)
    pixel, pos = _parse_level(ids, pos, vocabulary, PIXEL_LEVEL, grids.pixel if grids else None)
    if pos >= len(ids) or ids[pos] != vocabulary.end_of_image:
        raise ImageBlockError(f"malformed image block: expected <end_of_image> at position {pos}")
    return ParsedImage(semantic, pixel, start, pos + 1)


def parse_image_blocks(vocabulary: VisionVocabulary, ids: Tensor | list[int]) -> list[ParsedImage]:
    """Parse every image block in ``ids`` (1-D), in order (interleaved text is skipped)."""
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    blocks, pos = [], 0
    while vocabulary.start_of_image in ids[pos:]:
        block = parse_image_block(vocabulary, ids, start=ids.index(vocabulary.start_of_image, pos))
        blocks.append(block)
        pos = block.end
    return blocks
