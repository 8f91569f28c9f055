"""Codebook usage statistics: how often each code is chosen, kept outside any state dict."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


class CodebookUsage:
    """Counts of selected codes, mergeable across batches and processes.

    Args:
        codebook_size: number of codes K.

    Example:
        >>> usage = CodebookUsage(8)
        >>> usage.update(torch.tensor([[0, 1], [1, 1]]))
        >>> round(usage.utilisation, 3)
        0.25
    """

    def __init__(self, codebook_size: int):
        self.codebook_size = int(codebook_size)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.int64)

    def update(self, indices: Tensor) -> None:
        """Add the codes in ``indices`` (any shape, integer) to the counts."""
        flat = indices.detach().reshape(-1).long()
        if flat.numel() == 0:
            return
        binned = torch.bincount(flat, minlength=self.codebook_size)
        if binned.numel() > self.codebook_size:
            raise ValueError(f"index {int(flat.max())} is outside a codebook of {self.codebook_size} codes")
        self.counts = self.counts.to(binned.device) + binned

    def merge(self, other: CodebookUsage) -> CodebookUsage:
        """Add another :class:`CodebookUsage` of the same size into this one (in place); returns ``self``."""
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"cannot merge usage of {other.codebook_size} codes into {self.codebook_size} codes")
        self.counts = self.counts + other.counts.to(self.counts.device)
        return self

    def all_reduce(self, group=None) -> CodebookUsage:
        """Sum the counts over all processes of ``group`` (no-op outside ``torch.distributed``); returns ``self``."""
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            counts = self.counts.to(device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
            self.counts = counts
        return self

    def reset(self) -> None:
        self.counts = torch.zeros(self.codebook_size, dtype=torch.int64)

    @property
    def total(self) -> int:
        """Number of tokens counted."""
        return int(self.counts.sum())

    @property
    def used_codes(self) -> int:
        """Number of distinct codes chosen at least once."""
        return int((self.counts > 0).sum())

    @property
    def utilisation(self) -> float:
        """Fraction of the codebook chosen at least once, in ``[0, 1]``."""
        return self.used_codes / self.codebook_size

    @property
    def perplexity(self) -> float:
        """``exp(entropy)`` of the empirical code distribution (1 = a single code, K = uniform); 0 if empty."""
        total = self.total
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return math.exp(float(-(p * p.log()).sum()))

    def histogram(self) -> Tensor:
        """The counts ``[K]`` (int64, CPU)."""
        return self.counts.cpu().clone()

    def to_dict(self) -> dict:
        return {
            "codebook_size": self.codebook_size,
            "tokens": self.total,
            "used_codes": self.used_codes,
            "utilisation": self.utilisation,
            "perplexity": self.perplexity,
        }

    def __repr__(self) -> str:
        return (
            f"CodebookUsage(codebook_size={self.codebook_size}, tokens={self.total}, "
            f"utilisation={self.utilisation:.4f}, perplexity={self.perplexity:.1f})"
        )
