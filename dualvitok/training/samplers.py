"""Deterministic batch schedules: fixed-resolution batches and aspect-ratio buckets for any-resolution training.

Replaces the reference's resolution-grouped sampler and ``collate_anyres`` (illume-unified-mllm/ILLUME_plus,
``vision_tokenizer/dataset``: it resizes a batch to its smallest short side and transposes portrait images):
here each image is assigned once to the aspect-ratio bucket nearest its own, every bucket has one size with at most
``max_pixels`` pixels and sides that are multiples of 16, and portrait images stay portrait. The schedule of an epoch
is a pure function of ``(seed, stage, epoch)``, so a run resumes at the exact batch and data-parallel ranks split each
global batch into equal consecutive slices (rank r of W takes samples ``[r*b, (r+1)*b)`` of the global batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SampleSpec", "bucket_sizes", "assign_buckets", "epoch_batches"]

ASPECT_RATIOS = (1 / 3, 1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0)
"""Width / height ratios of the any-resolution buckets."""


@dataclass(frozen=True)
class SampleSpec:
    """One sample of a batch: dataset ``index``, target ``height`` x ``width``, and the ``seed`` of its augmentation."""

    index: int
    height: int
    width: int
    seed: int


def bucket_sizes(max_pixels: int, min_pixels: int = 32 * 32, multiple: int = 16,
                 ratios: tuple[float, ...] = ASPECT_RATIOS, tolerance: float = 0.1) -> list[tuple[int, int]]:
    """``(height, width)`` per ratio: sides multiples of ``multiple``, ``h*w <= max_pixels``, ``|log(w/h / ratio)|``
    within ``tolerance``, and the largest such area (ties: the closest ratio)."""
    sizes = []
    for ratio in ratios:
        best: tuple[float, float, int, int] | None = None  # (-area, error, h, w)
        for height in range(multiple, max_pixels // multiple + 1, multiple):
            fits = max_pixels // height // multiple * multiple
            if fits < multiple:
                break
            width = min(fits, round(height * ratio / multiple) * multiple)
            if width < multiple:
                continue
            error = abs(math.log(width / height / ratio))
            key = (-(height * width) if error <= tolerance else 0, error, height, width)
            if best is None or key < best:
                best = key
        _, _, height, width = best
        if height * width < min_pixels:
            raise ValueError(f"max_pixels={max_pixels} gives a {height}x{width} bucket below min_pixels={min_pixels}")
        sizes.append((height, width))
    return sizes


def assign_buckets(image_sizes: list[tuple[int, int]], ratios: tuple[float, ...] = ASPECT_RATIOS) -> list[int]:
    """Bucket id per image ``(height, width)``: the ratio nearest in log space."""
    logs = torch.tensor([math.log(r) for r in ratios])
    out = []
    for height, width in image_sizes:
        out.append(int((logs - math.log(width / height)).abs().argmin()))
    return out


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_batches(num_images: int, global_batch: int, seed: int, stage: int, epoch: int,
                  sizes: list[tuple[int, int]], buckets: list[int] | None = None) -> list[list[SampleSpec]]:
    """The global batches of one epoch, in order.

    Args:
        num_images: data set size.
        global_batch: samples per optimizer step over all processes.
        seed, stage, epoch: define the permutation and the per-sample augmentation seeds.
        sizes: ``(height, width)`` per bucket (one entry for fixed resolution).
        buckets: bucket id per image (None: all in bucket 0).

    Returns:
        A list of batches; each is ``global_batch`` :class:`SampleSpec`. Incomplete batches are dropped; a bucket
        smaller than a batch is repeated (sampled with a fresh permutation) so small data sets still give batches.
    """
    if num_images <= 0:
        raise ValueError("the training data set is empty")
    generator = torch.Generator().manual_seed(_mix(seed, stage, epoch))
    buckets = buckets if buckets is not None else [0] * num_images
    order = torch.randperm(num_images, generator=generator).tolist()
    members: dict[int, list[int]] = {}
    for i in order:
        members.setdefault(buckets[i], []).append(i)
    batches: list[list[int]] = []
    for bucket_id in sorted(members):
        idx = members[bucket_id]
        if len(idx) < global_batch:  # tiny data: repeat with fresh permutations up to one batch
            reps = [idx]
            while sum(map(len, reps)) < global_batch:
                perm = torch.randperm(len(idx), generator=generator).tolist()
                reps.append([idx[j] for j in perm])
            idx = [i for r in reps for i in r]
        for start in range(0, len(idx) - global_batch + 1, global_batch):
            batches.append([bucket_id] + idx[start:start + global_batch])
    batch_order = torch.randperm(len(batches), generator=generator).tolist()
    out = []
    for b_pos, b in enumerate(batch_order):
        bucket_id, indices = batches[b][0], batches[b][1:]
        height, width = sizes[bucket_id]
        out.append([SampleSpec(i, height, width, _mix(seed, stage, epoch, b_pos, k)) for k, i in enumerate(indices)])
    return out
