"""Shared pieces of the quantizers: the output type, layout handling and the bounded-memory nearest-code search.

The search uses the expansion the reference's ``torch.cdist`` uses for these sizes, ``|x|^2 + |c|^2 - 2 x.c``, in
float32 (also under autocast). Instead of ``cdist`` on blocks of 32,768 codes it works on tiles bounded by a memory
budget, each one GEMM followed by one ``min``; ties resolve to the lowest index, as the reference's per-block ``min``
followed by a global ``min`` does. The tile plan depends on the device:

* ``"cache"`` (CPU): small tiles (2 MiB) that are reduced while they are still in the L2 cache;
* ``"large"`` (CUDA and other accelerators): the largest tiles that fit the budget (the whole codebook per tile when
  it fits), so that a search is a few large kernels instead of thousands of tiny launches.

Both plans give the same indices; ``plan="auto"`` picks by the device of the input.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..validation import check_indices, is_tracing
from .usage import CodebookUsage

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Default bound, in bytes, of the temporary distance tiles of one nearest-code search (256 MiB)."""

TILE_BYTES = 2 * 2**20
"""Preferred size of one float32 distance tile: small enough to stay in the CPU's L2 cache while it is reduced."""

CODE_TILE = 2048
"""Codes per tile of the ``"cache"`` plan (the reduction over a tile happens while it is cache-resident)."""

SearchPlan = Literal["auto", "cache", "large"]
"""Tile plan of the nearest-code search: ``"cache"`` (CPU-cache-sized tiles), ``"large"`` (largest tiles within the
memory budget, for accelerators) or ``"auto"`` (``"cache"`` on CPU, ``"large"`` elsewhere)."""

SEARCH_PLANS = ("auto", "cache", "large")

TRACED_ROWS = 4096
"""Rows the code tiles are sized for when the row count is symbolic (a dynamic batch while tracing)."""


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


def resolve_search_plan(plan: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"cache"`` on CPU, ``"large"`` on every other device; other plans are returned as given."""
    if plan not in SEARCH_PLANS:
        raise ValueError(f"unknown search plan {plan!r}; choose one of {SEARCH_PLANS}")
    if plan == "auto":
        return "cache" if torch.device(device).type == "cpu" else "large"
    return plan


def _search_tiles(num_vectors: int, codebook_size: int, memory_budget: int, plan: str = "cache") -> tuple[int, int]:
    """Rows and codes per tile.

    ``"cache"``: a float32 tile of at most ``min(budget / 2, TILE_BYTES)`` bytes, at most ``CODE_TILE`` codes wide.
    ``"large"``: a tile of at most ``budget / 2`` bytes, as many codes as fit (the whole codebook when a row of it
    fits), then as many rows as fit.
    """
    elements = max(1, int(memory_budget) // 8)  # two live tiles: GEMM output + reduction
    if plan == "cache":
        elements = min(elements, TILE_BYTES // 4)
        block_codes = max(1, min(codebook_size, CODE_TILE, elements))
    elif plan == "large":
        block_codes = max(1, min(codebook_size, elements))
    else:
        raise ValueError(f"unknown search plan {plan!r}; choose 'cache' or 'large' (or 'auto' in nearest_code)")
    block_rows = max(1, min(num_vectors, elements // block_codes))
    return block_rows, block_codes


def _search_rows(x_aug: Tensor, row_sq: Tensor, prepared: Tensor, block_codes: int) -> tuple[Tensor, Tensor]:
    """Nearest code of each row of one row tile: one GEMM + ``min`` per code tile, then the first best tile."""
    k = prepared.shape[0]
    mins, args = [], []
    for c0 in range(0, k, block_codes):
        block_min, block_arg = (x_aug @ prepared[c0 : c0 + block_codes].t()).min(dim=1)  # |c|^2 - 2 x.c
        mins.append(block_min)
        args.append(block_arg)
    if len(mins) == 1:
        best_dist, best_idx = mins[0], args[0]
    else:
        block_min, block_arg = torch.stack(mins, dim=1), torch.stack(args, dim=1)  # [rows, blocks]
        best_block = block_min.argmin(dim=1, keepdim=True)  # first block wins ties: lowest index overall
        best_idx = block_arg.gather(1, best_block).squeeze(1) + best_block.squeeze(1) * block_codes
        best_dist = block_min.gather(1, best_block).squeeze(1)
    return best_idx, (best_dist + row_sq).clamp_min(0.0)


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
    plan: SearchPlan = "auto",
) -> NearestCode:
    """Index of the nearest code (Euclidean) for every row of ``x``, in float32 and bounded memory.

    Never materialises the full ``[N, K]`` distance matrix: rows and codes are processed in tiles of at most
    ``memory_budget / 2`` bytes each (two live tiles), each one GEMM reduced by one ``min``; exact ties resolve to
    the lowest index, as an ``argmin`` over the whole matrix does. Traceable (``torch.compile(fullgraph=True)``,
    ``torch.export``); with a symbolic (dynamic) number of rows only the codebook is tiled, so the traced search
    holds ``N x codes-per-tile`` distances at a time.

    Args:
        x: vectors to quantize. Shape: ``[N, D]``.
        codebook: the codes. Shape: ``[K, D]``.
        memory_budget: upper bound in bytes for the temporary distance tiles.
        prepared: optional ``prepare_codebook(codebook)`` (a cache for inference).
        plan: ``"cache"`` (tiles of at most 2 MiB, for CPU caches), ``"large"`` (the largest tiles within the
            budget, for accelerators) or ``"auto"`` (by ``x.device``: ``"cache"`` on CPU, else ``"large"``).

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
    if codebook.shape[0] == 0:
        raise ValueError("nearest_code got an empty codebook (K = 0); a codebook needs at least one code")
    # traced graphs unroll the tile loops: few large tiles keep them small on every device
    plan = "large" if plan == "auto" and is_tracing() else resolve_search_plan(plan, x.device)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = x.detach().float()
        if prepared is None:
            prepared = prepare_codebook(codebook)
        n, k = x.shape[0], prepared.shape[0]
        x_aug = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [N, D + 1]
        row_sq = x.pow(2).sum(-1)  # [N]
        if not isinstance(n, int):  # symbolic row count (dynamic shapes while tracing): tile the codes only
            _, block_codes = _search_tiles(TRACED_ROWS, k, memory_budget, plan)
            block_codes = max(1, min(block_codes, int(memory_budget) // 8 // TRACED_ROWS))
            best_idx, best_dist = _search_rows(x_aug, row_sq, prepared, block_codes)
            return NearestCode(best_idx, best_dist)
        block_rows, block_codes = _search_tiles(n, k, memory_budget, plan)
        if block_rows >= n:
            best_idx, best_dist = _search_rows(x_aug, row_sq, prepared, block_codes)
        else:
            found = [_search_rows(x_aug[r0 : r0 + block_rows], row_sq[r0 : r0 + block_rows], prepared, block_codes)
                     for r0 in range(0, n, block_rows)]
            best_idx, best_dist = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
    return NearestCode(best_idx, best_dist)


class Quantizer(nn.Module):
    """Base class: layout handling, index validation and optional codebook-usage statistics.

    Subclasses implement :attr:`codebook` and ``forward``. Inputs are channel-first (``[B, D, *spatial]``, e.g. a map
    ``[B,D,H,W]`` or a sequence ``[B,D,N]``) when ``channel_first`` is true, else channel-last ``[B, *spatial, D]``.
    """

    def __init__(self, dim: int, codebook_size: int, channel_first: bool = True,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, search_plan: SearchPlan = "auto"):
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise ValueError(f"dim and codebook_size must be positive, got dim={dim}, codebook_size={codebook_size}")
        resolve_search_plan(search_plan, "cpu")  # validates the name
        self.dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.channel_first = bool(channel_first)
        self.memory_budget = int(memory_budget)
        self.search_plan: SearchPlan = search_plan  # tile plan of nearest_code ("auto": by device)
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
        if not is_tracing() and x.numel() == 0:
            raise ValueError(f"{type(self).__name__} got an empty input of shape {tuple(x.shape)} (layout "
                             f"[B, *spatial, D]); pass at least one vector: B and every spatial size must be > 0")
        return x.reshape(x.shape[0], -1, self.dim), spatial  # [B, L, D]

    def _from_rows(self, rows: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """``[B, L, D]`` -> the configured layout."""
        return self._to_layout(rows.reshape(rows.shape[0], *spatial, self.dim))  # [B, *spatial, D] first

    def _to_layout(self, x: Tensor) -> Tensor:
        """``[B, *spatial, D]`` -> the configured layout. Channel-first codes are made contiguous: a ``movedim`` view
        has channels_last strides, and every convolution fed from it (the whole decoder, since a convolution's output
        keeps its input's layout) would then copy its weights to channels_last on each call."""
        return x.movedim(-1, 1).contiguous() if self.channel_first else x  # [B, D, *spatial]

    def check_indices(self, indices: Tensor) -> None:
        """Raise a clear error for indices of the wrong dtype or out of ``[0, codebook_size)``.

        The range check runs in eager mode only (one host synchronisation); see :mod:`dualvitok.validation`.
        """
        check_indices(indices, self.codebook_size)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Code vectors for integer indices.

        Shape: ``indices [B, *spatial]`` -> ``[B, D, *spatial]`` (channel_first) or ``[B, *spatial, D]``.
        """
        self.check_indices(indices)
        return self._to_layout(self.codebook[indices.long()])  # [B, *spatial, D] first

    def _record_usage(self, indices: Tensor) -> None:
        if self.usage is not None:
            self.usage.update(indices)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, channel_first={self.channel_first}"
