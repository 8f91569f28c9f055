"""Input validation of the index paths: clear messages in eager mode, nothing data-dependent while compiling.

Two kinds of checks:

* **Metadata checks** (type, dtype, rank, channels, sizes, empty batches and grids) read only shapes, cost no host
  synchronisation and always run in eager mode. While ``torch.compile`` / ``torch.export`` trace, the checks on
  static sizes become trace-time checks; the empty-batch checks are skipped there (a dynamic batch stays dynamic).
* **Value checks** (finite, in range, indices inside the codebook) need one reduction and one host synchronisation
  per call: they run in eager mode, are skipped while tracing (a compiled or exported graph has no host
  synchronisation), and can be switched off for hot loops with :func:`value_checks` (``with value_checks(False):``)
  or :func:`set_value_checks`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
"""Integer dtypes accepted as code indices."""

_value_checks = True


def version_counter(t: Tensor) -> int:
    """The in-place version counter of ``t`` (-1 for inference tensors, which have none): caches of values derived
    from a weight compare it to notice in-place updates."""
    return -1 if t.is_inference() else t._version


def is_tracing() -> bool:
    """True while ``torch.compile`` or ``torch.export`` traces (data-dependent checks are skipped then)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        if compiler.is_compiling():
            return True
        is_exporting = getattr(compiler, "is_exporting", None)
        return bool(is_exporting is not None and is_exporting())
    return False


def value_checks_enabled() -> bool:
    """True when the data-dependent checks run: eager mode and not switched off."""
    return _value_checks and not is_tracing()


def set_value_checks(enabled: bool) -> bool:
    """Switch the data-dependent input checks (finite, range, indices) on or off globally; returns the old state."""
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager: ``with value_checks(False): model.encode(x)`` skips the host-synchronising checks."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def check_images(images: Tensor, multiple: int = 16, min_size: int = 28) -> None:
    """Raise a clear error unless ``images`` is a float ``[B, 3, H, W]`` batch in [-1, 1], H, W multiples of 16.

    Args:
        images: the batch to check. Shape: ``[B, 3, H, W]``.
        multiple: H and W must be multiples of this (the pixel branch's downsampling factor).
        min_size: smallest H and W (the semantic branch needs 28).
    """
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}; "
                        "use dualvitok.ImageProcessor to convert PIL images, arrays or files")
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1], got dtype {images.dtype}; convert uint8 data with "
                        "dualvitok.ImageProcessor or (x / 127.5 - 1)")
    if images.ndim != 4:
        hint = "; add a batch dimension with images.unsqueeze(0)" if images.ndim == 3 else ""
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}{hint}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels in dim 1, got {images.shape[1]} (shape "
                         f"{tuple(images.shape)}); convert grayscale/RGBA to RGB, channels first")
    f = multiple
    h, w = images.shape[-2:]
    if h % f or w % f:
        raise ValueError(f"image height and width must be multiples of {f}, got {h}x{w}; resize or crop to "
                         f"{max(f, round(h / f) * f)}x{max(f, round(w / f) * f)} "
                         "(dualvitok.ImageProcessor does this)")
    if h < min_size or w < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size} for the semantic branch, got {h}x{w}")
    if is_tracing():
        return
    if images.shape[0] == 0:
        raise ValueError(f"images is an empty batch (shape {tuple(images.shape)}); pass at least one image")
    if not _value_checks:
        return
    extremes = torch.aminmax(images.detach())  # one pass; a NaN propagates into both
    lo, hi = torch.stack([extremes.min, extremes.max]).float().tolist()  # one host synchronisation
    if lo != lo or hi != hi:
        raise ValueError("images contain NaN values")
    if lo == float("-inf") or hi == float("inf"):
        raise ValueError("images contain infinite values")
    if lo < -1.5 or hi > 1.5:
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; for 0..255 data use "
                         "x / 127.5 - 1, for 0..1 data use 2 * x - 1")
    if lo >= 0.0:  # no extra sync: lo is already on the host
        warnings.warn(f"images are all in [0, 1] (values in [{lo:.3g}, {hi:.3g}]) but DualViTok expects [-1, 1]: "
                      "convert 0..1 data with 2 * x - 1 (dualvitok.ImageProcessor does this); ignore this if "
                      "the images really are that bright", UserWarning, stacklevel=4)


def check_indices(indices: Tensor, codebook_size: int, name: str = "indices") -> None:
    """Raise a clear error for indices of the wrong dtype or out of ``[0, codebook_size)``.

    The range check (one ``aminmax`` and one host synchronisation) runs in eager mode only; see the module notes.
    """
    if not torch.is_tensor(indices) or indices.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor (int64 preferred), got {getattr(indices, 'dtype', type(indices))}"
        )
    if not value_checks_enabled() or indices.numel() == 0:
        return
    extremes = torch.aminmax(indices)
    lo, hi = torch.stack([extremes.min, extremes.max]).tolist()  # one host synchronisation
    if lo < 0 or hi >= codebook_size:
        raise ValueError(
            f"{name} out of range: found values in [{lo}, {hi}] but the codebook has {codebook_size} codes "
            f"(valid: 0..{codebook_size - 1})"
        )


def check_index_grids(semantic_indices: Tensor, pixel_indices: Tensor, semantic_grid: tuple[int, int]) -> None:
    """Shapes of a ``decode_indices`` pair: ``[B, hs, ws]`` and ``[B, h, w]``, one batch, matching grids.

    Args:
        semantic_indices: ``[B, hs, ws]``.
        pixel_indices: ``[B, h, w]``.
        semantic_grid: the ``(hs, ws)`` the tokenizer produces for the image of the pixel grid ``h x w``.
    """
    for name, idx in (("semantic_indices", semantic_indices), ("pixel_indices", pixel_indices)):
        if not torch.is_tensor(idx) or idx.ndim != 3:
            raise ValueError(f"{name} must be a [B, h, w] integer tensor, got {getattr(idx, 'shape', type(idx))}")
    if not is_tracing():
        if semantic_indices.shape[0] != pixel_indices.shape[0]:
            raise ValueError(f"batch sizes differ: semantic_indices {tuple(semantic_indices.shape)} vs "
                             f"pixel_indices {tuple(pixel_indices.shape)}")
        if pixel_indices.shape[0] == 0:
            raise ValueError("decode_indices got an empty batch (B = 0); pass at least one pair of token grids")
    h, w = pixel_indices.shape[1:]
    if h == 0 or w == 0:
        raise ValueError(f"pixel_indices has an empty grid {h}x{w}; a token grid needs at least one row and column")
    if tuple(semantic_indices.shape[1:]) != tuple(semantic_grid):
        raise ValueError(
            f"semantic_indices grid {tuple(semantic_indices.shape[1:])} does not match pixel_indices grid {h}x{w}: "
            f"an image with a {h}x{w} pixel grid has a {semantic_grid[0]}x{semantic_grid[1]} semantic grid; pass "
            "both grids of one encoding (model.grid_sizes(height, width) gives them for an image size)"
        )


def check_codes(semantic_codes: Tensor, pixel_codes: Tensor, semantic_dim: int, pixel_dim: int) -> None:
    """Shapes of a ``decode`` pair: ``[B, semantic_dim, hs, ws]`` and ``[B, pixel_dim, h, w]``, non-empty grids."""
    for name, t, dim in (("semantic_codes", semantic_codes, semantic_dim), ("pixel_codes", pixel_codes, pixel_dim)):
        if not torch.is_tensor(t) or t.ndim != 4 or t.shape[1] != dim:
            raise ValueError(f"{name} must be [B, {dim}, h, w], got {tuple(getattr(t, 'shape', ())) or type(t)}")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"{name} has an empty grid {t.shape[2]}x{t.shape[3]} (shape {tuple(t.shape)}); a code "
                             "grid needs at least one row and column")
