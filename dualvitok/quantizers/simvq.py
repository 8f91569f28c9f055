"""SimVQ: a frozen random codebook made learnable through one shared linear map.

Follows "Addressing Representation Collapse in Vector Quantized Models with One Linear Layer" (Zhu et al., 2024,
arXiv 2411.02038) as used by ILLUME+ DualViTok (a vendored ``vector_quantize_pytorch/sim_vq.py``): the implicit
codebook is ``C = frozen_codebook @ W^T`` with ``frozen_codebook ~ N(0, 1/dim)`` stored as a persistent buffer and
``W = code_transform.weight`` the only trainable parameter. State dict keys are those of the reference.

Differences from the reference: the nearest-code search runs in bounded memory (tiles under a byte budget) instead of
``torch.cdist`` on 32,768-code blocks; indices agree except on exact or near ties. The rotation trick (Fifty et al.,
2024) is optional and off by default, as in the released configs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_MEMORY_BUDGET, Quantizer, QuantizerOutput, nearest_code, prepare_codebook
from .rotation import rotate_to


class SimVQ(Quantizer):
    """SimVQ quantizer.

    Args:
        dim: code dimension D.
        codebook_size: number of codes K.
        channel_first: inputs are ``[B, D, *spatial]`` if true, else ``[B, *spatial, D]``.
        commitment_weight: weight of the whole loss.
        input_to_quantize_commit_loss_weight: weight of the term that pulls the input towards its code (0.25 in
            the reference); the term that trains ``code_transform`` has weight 1.
        rotation_trick: pass gradients with the rotation trick instead of the straight-through estimator.
        memory_budget: bytes allowed for the temporary distance tiles of the search.

    Shape:
        ``x [B, D, *spatial]`` -> ``QuantizerOutput(quantized [B, D, *spatial], indices [B, *spatial], loss [])``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        channel_first: bool = True,
        commitment_weight: float = 1.0,
        input_to_quantize_commit_loss_weight: float = 0.25,
        rotation_trick: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        super().__init__(dim, codebook_size, channel_first, memory_budget)
        self.commitment_weight = float(commitment_weight)
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.rotation_trick = bool(rotation_trick)
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)  # persistent, shipped
        self.code_transform = nn.Linear(dim, dim, bias=False)
        self._inference_cache: tuple[tuple, Tensor, Tensor] | None = None

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``code_transform(frozen_codebook)``, shape ``[K, D]``."""
        return self.code_transform(self.frozen_codebook)

    def _search_codebook(self) -> tuple[Tensor, Tensor | None]:
        """The codebook, and its prepared search form cached while no gradient is needed (inference)."""
        if torch.is_grad_enabled() and self.code_transform.weight.requires_grad:
            return self.codebook, None
        w, f = self.code_transform.weight, self.frozen_codebook
        key = (w.data_ptr(), w._version, f.data_ptr(), f._version, w.device, w.dtype)
        if self._inference_cache is None or self._inference_cache[0] != key:
            with torch.no_grad(), torch.autocast(device_type=w.device.type, enabled=False):
                codebook = F.linear(f.float(), w.float())
            self._inference_cache = (key, codebook, prepare_codebook(codebook))
        return self._inference_cache[1], self._inference_cache[2]

    def forward(self, x: Tensor) -> QuantizerOutput:
        rows, spatial = self._to_rows(x)  # [B, L, D]
        with torch.autocast(device_type=rows.device.type, enabled=False):
            rows = rows.float()
            search_codebook, prepared = self._search_codebook()
            found = nearest_code(rows.reshape(-1, self.dim), search_codebook, self.memory_budget, prepared)
            indices = found.indices.view(rows.shape[0], -1)  # [B, L]
            quantized = search_codebook.float()[indices]  # [B, L, D]
            loss = F.mse_loss(rows.detach(), quantized) + self.input_to_quantize_commit_loss_weight * F.mse_loss(
                rows, quantized.detach()
            )
            loss = loss * self.commitment_weight
            if self.rotation_trick:
                quantized = rotate_to(rows, quantized)
            else:
                quantized = (quantized - rows).detach() + rows  # straight-through estimator
        self._record_usage(indices)
        return QuantizerOutput(self._from_rows(quantized, spatial), indices.view(-1, *spatial), loss)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``indices [B, *spatial]`` -> codes ``[B, D, *spatial]`` (channel_first) or ``[B, *spatial, D]``."""
        self.check_indices(indices)
        codes = self.code_transform(self.frozen_codebook[indices.long()])  # [B, *spatial, D]
        return codes.movedim(-1, 1) if self.channel_first else codes
