"""The classic learnable-codebook vector quantizer (VQ-VAE), with the options VQ tokenizers commonly use.

Follows van den Oord et al., "Neural Discrete Representation Learning" (2017): codebook loss
``|sg[z] - q|^2`` + commitment ``beta |z - sg[q]|^2`` with the straight-through estimator. Options:
l2-normalised codes and inputs (cosine search, as in ViT-VQGAN / LlamaGen), exponential-moving-average codebook
updates instead of the codebook loss (VQ-VAE-2), and restart of codes that fall out of use (Jukebox / Dhariwal et al.
2020) from vectors of the current batch. Written for this library; option names follow common usage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_MEMORY_BUDGET, Quantizer, QuantizerOutput, SearchPlan, nearest_code


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class VectorQuantizer(Quantizer):
    """Vector quantizer with a learnable codebook.

    Args:
        dim: code dimension D.
        codebook_size: number of codes K.
        channel_first: inputs are ``[B, D, *spatial]`` if true, else ``[B, *spatial, D]``.
        beta: commitment weight.
        l2_normalize: normalise inputs and codes to unit length (search by cosine similarity).
        ema_decay: if set (e.g. 0.99), the codebook is a buffer updated by exponential moving averages of the
            assigned vectors, and the loss is only the commitment term.
        dead_code_threshold: in training, codes whose running usage (an EMA of counts per step) falls below this
            are re-initialised from random vectors of the batch; 0 disables restarts.
        memory_budget: bytes allowed for the temporary distance tiles of the search.
        search_plan: tile plan of the search (``"auto"``: by device; see :func:`~dualvitok.quantizers.nearest_code`).
        init: codebook initialisation, ``"uniform"`` (U(-1/K, 1/K)) or ``"normal"`` (N(0, 1)); default uniform, normal
            with ``ema_decay``.

    Shape:
        ``x [B, D, *spatial]`` -> ``QuantizerOutput(quantized [B, D, *spatial], indices [B, *spatial], loss [])``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        channel_first: bool = True,
        beta: float = 0.25,
        l2_normalize: bool = False,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        search_plan: SearchPlan = "auto",
        init: str | None = None,
    ):
        super().__init__(dim, codebook_size, channel_first, memory_budget, search_plan)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.beta = float(beta)
        self.l2_normalize = bool(l2_normalize)
        self.ema_decay = ema_decay
        self.dead_code_threshold = float(dead_code_threshold)
        if init is None:
            init = "uniform" if ema_decay is None else "normal"
        if init not in ("uniform", "normal"):
            raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
        weights = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if init == "normal":  # drawn after the uniform one: the random stream stays that of earlier versions
            weights = torch.randn(codebook_size, dim)
        if ema_decay is None:
            self.embedding = nn.Parameter(weights)
        else:
            self.register_buffer("embedding", weights)
            self.register_buffer("ema_embed_sum", weights.clone())
        # running usage (training state, needed for exact resume of EMA / restarts; not the usage statistics)
        self.register_buffer("cluster_size", torch.ones(codebook_size))

    @property
    def codebook(self) -> Tensor:
        """The codebook ``[K, D]`` (unit-normalised rows if ``l2_normalize``)."""
        return F.normalize(self.embedding, dim=-1) if self.l2_normalize else self.embedding

    def forward(self, x: Tensor) -> QuantizerOutput:
        rows, spatial = self._to_rows(x)  # [B, L, D]
        with torch.autocast(device_type=rows.device.type, enabled=False):
            rows = rows.float()
            if self.l2_normalize:
                rows = F.normalize(rows, dim=-1)
            codebook = self.codebook.float()
            flat = rows.reshape(-1, self.dim)  # [B*L, D]
            indices = nearest_code(flat, codebook, self.memory_budget, plan=self.search_plan).indices
            quantized = codebook[indices].view_as(rows)  # [B, L, D], codes before this step's update
            if self.training:
                self._update_codebook(flat.detach(), indices)
            commitment = F.mse_loss(rows, quantized.detach())
            if self.ema_decay is None:
                loss = F.mse_loss(rows.detach(), quantized) + self.beta * commitment
            else:
                loss = self.beta * commitment
            quantized = (quantized - rows).detach() + rows  # straight-through estimator
        indices = indices.view(rows.shape[0], *spatial)
        self._record_usage(indices)
        return QuantizerOutput(self._from_rows(quantized, spatial), indices, loss)

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, indices: Tensor) -> None:
        """EMA update and dead-code restart, synchronised across processes when distributed."""
        decay = self.ema_decay if self.ema_decay is not None else 0.99
        counts = _all_reduce_sum(torch.bincount(indices, minlength=self.codebook_size).float())
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.ema_decay is not None:
            embed_sum = _all_reduce_sum(torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat))
            self.ema_embed_sum.mul_(decay).add_(embed_sum, alpha=1 - decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace smoothing
            self.embedding.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold
            num_dead = int(dead.sum())
            if num_dead:
                pick = torch.randint(flat.shape[0], (num_dead,), device=flat.device)
                if dist.is_available() and dist.is_initialized():
                    new_codes = flat[pick].contiguous()
                    dist.broadcast(new_codes, src=0)  # every rank restarts with the same vectors
                else:
                    new_codes = flat[pick]
                target = self.embedding.data if isinstance(self.embedding, nn.Parameter) else self.embedding
                target[dead] = new_codes.to(target.dtype)
                if self.ema_decay is not None:
                    self.ema_embed_sum[dead] = new_codes
                self.cluster_size[dead] = 1.0

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", beta={self.beta}, l2_normalize={self.l2_normalize}, ema_decay={self.ema_decay}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )
