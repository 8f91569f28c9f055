"""Shared pieces of the quantizers: the output type, layout handling and the bounded-memory nearest-code search.

The search uses the expansion the reference's ``torch.cdist`` uses for these sizes, ``|x|^2 + |c|^2 - 2 x.c``, in
float32 (also under autocast). Instead of ``cdist`` on blocks of 32,768 codes it works on small tiles (a few MiB,
bounded by a memory budget) that are reduced while they are still in cache, which is both bounded in memory and
faster; ties resolve to the lowest index, as the reference's per-block ``min`` followed by a global ``min`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .usage import CodebookUsage

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Default bound, in bytes, of the temporary distance tiles of one nearest-code search (256 MiB)."""

TILE_BYTES = 2 * 2**20
"""Preferred size of one float32 distance tile: small enough to stay in the CPU's L2 cache while it is reduced."""

CODE_TILE = 2048
"""Codes per tile (the reduction over a tile happens while it is cache-resident)."""


class QuantizerOutput(NamedTuple):
    """What every quantizer returns.

    Attributes:
        quantized: the quantized input with straight-through gradients, same shape and layout as the input.
        indices: int64 code indices, the input's shape without the channel axis (``[B,H,W]`` or ``[B,N]``).
        loss: scalar tensor, the weighted codebook + commitment loss (computed in eval mode too).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class NearestCode(NamedTuple):
    """Result of :func:`nearest_code`: ``indices [N]`` (int64) and squared distances ``[N]`` (float32)."""

    indices: Tensor
    distances: Tensor


def _search_tiles(num_vectors: int, codebook_size: int, memory_budget: int) -> tuple[int, int]:
    """Rows and codes per tile: a float32 tile of at most ``min(budget / 2, TILE_BYTES)`` bytes."""
    elements = max(1, min(int(memory_budget) // 8, TILE_BYTES // 4))  # two live tiles: GEMM output + reduction
    block_codes = max(1, min(codebook_size, CODE_TILE, elements))
    block_rows = max(1, min(num_vectors, elements // block_codes))
    return block_rows, block_codes


def prepare_codebook(codebook: Tensor) -> Tensor:
    """``[K, D]`` codes -> ``[K, D + 1]`` float32 ``[-2 c, |c|^2]``, so that ``[x, 1] @ prepared^T = |c|^2 - 2 x.c``.

    Cache the result when the codebook does not change (inference) and pass it to :func:`nearest_code`.
    """
    with torch.no_grad(), torch.autocast(device_type=codebook.device.type, enabled=False):
        c = codebook.detach().float()
        return torch.cat([c * -2.0, c.pow(2).sum(-1, keepdim=True)], dim=1)


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    prepared: Tensor | None = None,
) -> NearestCode:
    """Index of the nearest code (Euclidean) for every row of ``x``, in float32 and bounded memory.

    Never materialises the full ``[N, K]`` distance matrix: rows and codes are processed in tiles of at most
    ``min(memory_budget / 2, 2 MiB)`` bytes each (two live tiles), reduced to a per-tile minimum while cached;
    exact ties resolve to the lowest index, as an ``argmin`` over the whole matrix does.

    Args:
        x: vectors to quantize. Shape: ``[N, D]``.
        codebook: the codes. Shape: ``[K, D]``.
        memory_budget: upper bound in bytes for the temporary distance tiles.
        prepared: optional ``prepare_codebook(codebook)`` (a cache for inference).

    Returns:
        :class:`NearestCode` with ``indices [N]`` int64 and squared ``distances [N]`` float32.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects x [N, D] and codebook [K, D] with the same D, got {tuple(x.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    if memory_budget < 8:
        raise ValueError(f"memory_budget must be at least 8 bytes, got {memory_budget}")
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = x.detach().float()
        if prepared is None:
            prepared = prepare_codebook(codebook)
        n, k = x.shape[0], prepared.shape[0]
        x_aug = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)  # [N, D + 1]
        block_rows, block_codes = _search_tiles(n, k, memory_budget)
        num_blocks = -(-k // block_codes)
        best_dist = torch.empty(n, dtype=torch.float32, device=x.device)
        best_idx = torch.empty(n, dtype=torch.long, device=x.device)
        for r0 in range(0, n, block_rows):
            xr = x_aug[r0 : r0 + block_rows]
            block_min = torch.empty(xr.shape[0], num_blocks, dtype=torch.float32, device=x.device)
            block_arg = torch.empty(xr.shape[0], num_blocks, dtype=torch.long, device=x.device)
            for b, c0 in enumerate(range(0, k, block_codes)):
                dist = xr @ prepared[c0 : c0 + block_codes].t()  # |c|^2 - 2 x.c : [rows, codes]
                torch.min(dist, dim=1, out=(block_min[:, b], block_arg[:, b]))
            best_block = block_min.argmin(dim=1, keepdim=True)  # first block wins ties: lowest index overall
            best_idx[r0 : r0 + block_rows] = (
                block_arg.gather(1, best_block).squeeze(1) + best_block.squeeze(1) * block_codes
            )
            row_sq = x[r0 : r0 + block_rows].pow(2).sum(-1)
            best_dist[r0 : r0 + block_rows] = (block_min.gather(1, best_block).squeeze(1) + row_sq).clamp_min_(0.0)
    return NearestCode(best_idx, best_dist)


class Quantizer(nn.Module):
    """Base class: layout handling, index validation and optional codebook-usage statistics.

    Subclasses implement :attr:`codebook` and ``forward``. Inputs are channel-first (``[B, D, *spatial]``, e.g. a map
    ``[B,D,H,W]`` or a sequence ``[B,D,N]``) when ``channel_first`` is true, else channel-last ``[B, *spatial, D]``.
    """

    def __init__(self, dim: int, codebook_size: int, channel_first: bool = True,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise ValueError(f"dim and codebook_size must be positive, got dim={dim}, codebook_size={codebook_size}")
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.channel_first = bool(channel_first)
        self.memory_budget = int(memory_budget)
        self.usage: CodebookUsage | None = None  # a plain attribute: never part of the state dict

    @property
    def codebook(self) -> Tensor:
        """The effective codebook ``[K, D]``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- usage
    def enable_usage_tracking(self, reset: bool = True) -> CodebookUsage:
        """Start counting how often each code is selected by ``forward``; returns the :class:`CodebookUsage`."""
        if reset or self.usage is None:
            self.usage = CodebookUsage(self.codebook_size)
        return self.usage

    def disable_usage_tracking(self) -> CodebookUsage | None:
        """Stop counting; returns the statistics collected so far."""
        usage, self.usage = self.usage, None
        return usage

    # ----------------------------------------------------------------------------------------------- layout
    def _to_rows(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``x`` in the configured layout -> ``([B, L, D], spatial shape)``."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}"
            )
        if x.ndim < 3:
            raise ValueError(
                f"{type(self).__name__} expects a batch: [B, {self.dim}, *spatial] (channel_first=True) or "
                f"[B, *spatial, {self.dim}] (channel_first=False), got shape {tuple(x.shape)}; add a batch dimension"
            )
        channel_axis = 1 if self.channel_first else -1
        if x.shape[channel_axis] != self.dim:
            raise ValueError(
                f"{type(self).__name__}(dim={self.dim}, channel_first={self.channel_first}) "
                f"got {x.shape[channel_axis]} channels on axis {channel_axis} of a tensor of shape {tuple(x.shape)}"
            )
        if self.channel_first:
            x = x.movedim(1, -1)  # [B, *spatial, D]
        spatial = tuple(x.shape[1:-1])
        return x.reshape(x.shape[0], -1, self.dim), spatial  # [B, L, D]

    def _from_rows(self, rows: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """``[B, L, D]`` -> the configured layout."""
        x = rows.reshape(rows.shape[0], *spatial, self.dim)  # [B, *spatial, D]
        return x.movedim(-1, 1) if self.channel_first else x

    def check_indices(self, indices: Tensor) -> None:
        """Raise a clear error for indices of the wrong dtype or out of ``[0, codebook_size)``."""
        if not torch.is_tensor(indices) or indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(
                f"indices must be an integer tensor (int64 preferred), got {getattr(indices, 'dtype', type(indices))}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices out of range: found values in [{int(indices.min())}, {int(indices.max())}] but the codebook "
                f"has {self.codebook_size} codes (valid: 0..{self.codebook_size - 1})"
            )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Code vectors for integer indices.

        Shape: ``indices [B, *spatial]`` -> ``[B, D, *spatial]`` (channel_first) or ``[B, *spatial, D]``.
        """
        self.check_indices(indices)
        codes = self.codebook[indices.long()]  # [B, *spatial, D]
        return codes.movedim(-1, 1) if self.channel_first else codes

    def _record_usage(self, indices: Tensor) -> None:
        if self.usage is not None:
            self.usage.update(indices)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, channel_first={self.channel_first}"
