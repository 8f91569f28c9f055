"""SimVQ: a frozen random codebook made learnable through one shared linear map.

Follows "Addressing Representation Collapse in Vector Quantized Models with One Linear Layer" (Zhu et al., 2024,
arXiv 2411.02038) as used by ILLUME+ DualViTok (a vendored ``vector_quantize_pytorch/sim_vq.py``): the implicit
codebook is ``C = frozen_codebook @ W^T`` with ``frozen_codebook ~ N(0, 1/dim)`` stored as a persistent buffer and
``W = code_transform.weight`` the only trainable parameter. State dict keys are those of the reference.

Differences from the reference: the nearest-code search runs in bounded memory (tiles under a byte budget) instead of
``torch.cdist`` on 32,768-code blocks; indices agree except on exact or near ties. The rotation trick (Fifty et al.,
2024) is optional and off by default, as in the released configs.

Inference cache: without autograd the implicit codebook and its prepared search form are computed once and kept.
The cache is dropped explicitly: by ``train()``/``eval()``, ``load_state_dict``, moves and casts (``to``, ``cuda``,
``half``), in-place updates of the weights (their version counter, as optimizers and ``with torch.no_grad():
w.copy_(...)`` bump it), and :meth:`SimVQ.invalidate_cache`. A write through ``.data`` (``w.data.copy_(...)``)
bumps no version counter: on CPU the cache also compares ``code_transform.weight`` (``D x D``, a few KiB) with the
weight it was built from, so it is caught there too; on other devices (where that comparison would synchronise
with the host) call :meth:`SimVQ.invalidate_cache` after such a write. While ``torch.compile`` / ``torch.export``
trace, no cache is used: the codebook is computed inside the graph from the current weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import is_tracing, version_counter
from .base import DEFAULT_MEMORY_BUDGET, Quantizer, QuantizerOutput, SearchPlan, nearest_code, prepare_codebook
from .rotation import rotate_to


class _InferenceCache(NamedTuple):
    codebook: Tensor  # [K, D] float32
    prepared: Tensor  # [K, D + 1], prepare_codebook(codebook)
    weight: Tensor  # the parameter and buffer the cache was built from (identity checks)
    frozen: Tensor
    weight_copy: Tensor  # a copy of code_transform.weight (D x D), compared on CPU
    weight_version: int
    frozen_version: int


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
        search_plan: tile plan of the search (``"auto"``: by device; see :func:`~dualvitok.quantizers.nearest_code`).

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
        search_plan: SearchPlan = "auto",
    ):
        super().__init__(dim, codebook_size, channel_first, memory_budget, search_plan)
        self.commitment_weight = float(commitment_weight)
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.rotation_trick = bool(rotation_trick)
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)  # persistent, shipped
        self.code_transform = nn.Linear(dim, dim, bias=False)
        self._inference_cache: _InferenceCache | None = None

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``code_transform(frozen_codebook)``, shape ``[K, D]``."""
        return self.code_transform(self.frozen_codebook)

    # ------------------------------------------------------------------------------------------ inference cache
    def invalidate_cache(self) -> None:
        """Drop the cached inference codebook; the next search without autograd rebuilds it from the weights.

        Called by ``train()``, ``load_state_dict`` and device/dtype moves; call it after writing the weights through
        ``.data`` on a non-CPU device (see the module notes).
        """
        self._inference_cache = None

    def train(self, mode: bool = True) -> SimVQ:
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _cache_is_valid(self, cache: _InferenceCache) -> bool:
        w, f = self.code_transform.weight, self.frozen_codebook
        if cache.weight_version != version_counter(w) or cache.frozen_version != version_counter(f):  # in-place updates
            return False
        if cache.weight is not w or cache.frozen is not f:  # parameters or buffers replaced
            return False
        if w.device.type == "cpu":  # a write through .data bumps no version counter: compare the small weight
            return torch.equal(cache.weight_copy, w.detach())
        return True

    def _search_codebook(self) -> tuple[Tensor, Tensor | None]:
        """The codebook, and its prepared search form cached while no gradient is needed (inference)."""
        if torch.is_grad_enabled() and self.code_transform.weight.requires_grad:
            return self.codebook, None
        w, f = self.code_transform.weight, self.frozen_codebook
        if is_tracing():  # no Python-side cache inside a graph: computed from the current weights
            with torch.no_grad(), torch.autocast(device_type=w.device.type, enabled=False):
                codebook = F.linear(f.float(), w.float())
            return codebook, prepare_codebook(codebook)
        cache = self._inference_cache
        if cache is None or not self._cache_is_valid(cache):
            with torch.no_grad(), torch.autocast(device_type=w.device.type, enabled=False):
                codebook = F.linear(f.float(), w.float())
                cache = _InferenceCache(codebook, prepare_codebook(codebook), w, f, w.detach().clone(),
                                        version_counter(w), version_counter(f))
            self._inference_cache = cache
        return cache.codebook, cache.prepared

    def forward(self, x: Tensor) -> QuantizerOutput:
        rows, spatial = self._to_rows(x)  # [B, L, D]
        with torch.autocast(device_type=rows.device.type, enabled=False):
            rows = rows.float()
            search_codebook, prepared = self._search_codebook()
            found = nearest_code(rows.reshape(-1, self.dim), search_codebook, self.memory_budget, prepared,
                                 plan=self.search_plan)
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
        return self._to_layout(self.code_transform(self.frozen_codebook[indices.long()]))  # [B, *spatial, D] first
