"""Loss terms of DualViTok training, as plain functions.

Follows ILLUME+ (illume-unified-mllm/ILLUME_plus, ``vision_tokenizer/tokenizer/vq_loss.py``; taming-transformers
lineage): L1/L2 reconstruction, hinge / non-saturating ("vanilla") discriminator losses, hinge / non-saturating
generator losses, ``adopt_weight`` (0 before ``disc_start``), the adaptive weight ``||grad rec|| / ||grad g_adv||``
on the decoder's last layer, and the semantic cosine loss ``mean(1 - cos(target, reconstruction))`` over tokens (the
reference's ``cosine_embedding_loss`` with margin 1e-4 on positive pairs is exactly that). Written independently;
names follow the reference."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reconstruction_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "adopt_weight",
    "adaptive_weight",
    "semantic_cosine_loss",
]

ReconstructionKind = Literal["l1", "l2"]
GanKind = Literal["hinge", "vanilla", "non-saturating"]


def reconstruction_loss(inputs: Tensor, reconstructions: Tensor, kind: ReconstructionKind = "l2") -> Tensor:
    """Mean absolute (``l1``) or squared (``l2``) error over all elements of ``[B, C, H, W]`` images."""
    if inputs.shape != reconstructions.shape:
        raise ValueError(f"shape mismatch: inputs {tuple(inputs.shape)} vs reconstructions "
                         f"{tuple(reconstructions.shape)}")
    diff = inputs.float() - reconstructions.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return diff.pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose 'l1' or 'l2'")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat))))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanKind = "hinge") -> Tensor:
    """Discriminator loss of the given kind (``hinge`` or ``vanilla``/``non-saturating``)."""
    if kind == "hinge":
        return hinge_d_loss(logits_real.float(), logits_fake.float())
    if kind in ("vanilla", "non-saturating"):
        return vanilla_d_loss(logits_real.float(), logits_fake.float())
    raise ValueError(f"unknown discriminator loss {kind!r}; choose 'hinge' or 'vanilla'")


def generator_adversarial_loss(logits_fake: Tensor, kind: GanKind = "hinge") -> Tensor:
    """Generator loss: ``-mean(D(x_hat))`` (hinge) or ``mean(softplus(-D(x_hat)))`` (non-saturating)."""
    logits_fake = logits_fake.float()
    if kind == "hinge":
        return -logits_fake.mean()
    if kind in ("vanilla", "non-saturating"):
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown generator adversarial loss {kind!r}; choose 'hinge' or 'non-saturating'")


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` (0) while ``global_step < threshold`` (``disc_start``), else ``weight``."""
    return value if global_step < threshold else weight


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """``clamp(||d rec / d W|| / (||d g / d W|| + 1e-4), 0, max_weight)`` on the decoder's last weight, detached.

    Args:
        rec_loss: reconstruction (+ perceptual) loss, scalar.
        g_loss: generator adversarial loss, scalar.
        last_layer: the decoder's last weight (``pixel_decoder.conv_out.weight``), part of both graphs.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def semantic_cosine_loss(target: Tensor, reconstruction: Tensor) -> Tensor:
    """``mean(1 - cos)`` between channel vectors of ``[B, C, h, w]`` maps (over all ``B*h*w`` tokens)."""
    if target.shape != reconstruction.shape:
        raise ValueError(f"semantic target {tuple(target.shape)} and reconstruction "
                         f"{tuple(reconstruction.shape)} differ")
    t = target.float().movedim(1, -1).reshape(-1, target.shape[1])  # (B*h*w, C)
    r = reconstruction.float().movedim(1, -1).reshape(-1, reconstruction.shape[1])  # (B*h*w, C)
    return (1.0 - F.cosine_similarity(t, r, dim=-1, eps=1e-8)).mean()
