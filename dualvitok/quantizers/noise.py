"""Token-noise injection: corrupt a fraction of the tokens of a fraction of the samples.

ILLUME+ (arXiv 2504.01934, section on DualViTok robustness) perturbs pixel tokens during tokenizer training so that
the decoder tolerates the imperfect tokens an autoregressive model generates. The reference implementation
(``DualViTok.apply_noise``) draws its masks on the CPU generator and replaces a corrupted position with the same
position of the previous sample in the batch (``random``) or with zeros (``zero``); the paper describes replacing a
token by a random code, provided here as ``uniform``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NoiseMode = Literal["random", "zero", "uniform"]


def token_noise_mask(
    batch: int,
    spatial: tuple[int, ...],
    batch_rate: float,
    token_rate: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean keep-mask ``[B, 1, *spatial]`` on the CPU: True where a token is left untouched.

    A sample is selected for corruption with probability ``batch_rate`` (alpha); inside a selected sample each token
    is corrupted with probability ``token_rate`` (beta). Random numbers are drawn as in the reference: first
    ``rand(B, 1, 1, ...)`` for samples, then ``rand(B, 1, *spatial)`` for tokens.
    """
    for name, rate in (("batch_rate", batch_rate), ("token_rate", token_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    ones = (1,) * len(spatial)
    keep_sample = torch.rand(batch, 1, *ones, generator=generator) > batch_rate  # [B, 1, 1, ...]
    keep_token = torch.rand(batch, 1, *spatial, generator=generator) > token_rate  # [B, 1, *spatial]
    return keep_sample | keep_token


def inject_token_noise(
    codes: Tensor,
    batch_rate: float,
    token_rate: float,
    mode: NoiseMode = "random",
    codebook: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace a fraction ``token_rate`` of the tokens in a fraction ``batch_rate`` of the samples.

    Args:
        codes: channel-first code maps or sequences. Shape: ``[B, D, *spatial]``.
        batch_rate: probability alpha that a sample is corrupted.
        token_rate: probability beta that a token of a corrupted sample is replaced.
        mode: ``"random"`` takes the same position of the previous sample in the batch (the reference; a batch of
            one is left untouched), ``"zero"`` sets the token to 0, ``"uniform"`` puts a code drawn uniformly from
            ``codebook`` (the paper's description).
        codebook: ``[K, D]`` codes, required for ``"uniform"``.
        generator: CPU generator for reproducible masks (the reference draws on the global CPU RNG).

    Returns:
        Tensor of the shape of ``codes``; gradients flow to the kept tokens.
    """
    if codes.ndim < 3:
        raise ValueError(f"codes must be channel-first [B, D, *spatial], got shape {tuple(codes.shape)}")
    batch, dim, spatial = codes.shape[0], codes.shape[1], tuple(codes.shape[2:])
    keep = token_noise_mask(batch, spatial, batch_rate, token_rate, generator).to(codes.device)
    if mode == "random":
        replacement = torch.cat([codes[-1:], codes[:-1]]).detach()  # previous sample, wrapping around
    elif mode == "zero":
        replacement = torch.zeros_like(codes)
    elif mode == "uniform":
        if codebook is None or codebook.ndim != 2 or codebook.shape[1] != dim:
            raise ValueError(f"mode='uniform' needs a codebook [K, {dim}], got {getattr(codebook, 'shape', None)}")
        random_idx = torch.randint(codebook.shape[0], (batch, *spatial), generator=generator)
        replacement = codebook.detach()[random_idx.to(codebook.device)].movedim(-1, 1).to(codes)  # [B, D, *spatial]
    else:
        raise ValueError(f"unknown noise mode {mode!r}; choose 'random', 'zero' or 'uniform'")
    return torch.where(keep, codes, replacement)
