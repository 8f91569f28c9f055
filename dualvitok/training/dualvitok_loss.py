"""``DualViTokLoss``: the generator and discriminator objectives of DualViTok training.

Follows ILLUME+ ``DualViTokLoss`` (illume-unified-mllm/ILLUME_plus, ``vision_tokenizer/tokenizer/vq_loss.py``):

    L_gen = w_rec * rec(x, x_hat) + w_p * mean(LPIPS(x, x_hat)) + adopt_weight(w_d, step, disc_start) * lambda * g_adv
            + w_cb * commit_pix + w_sem * (w_sem_cb * commit_sem + w_sem_rec * mean(1 - cos(target, sem_rec)))
    L_disc = adopt_weight(1, step, disc_start) * d_loss(D(x), D(x_hat.detach()))

with ``lambda`` the adaptive weight when ``disc_adaptive_weight`` (else 1). Differences: the discriminator step is
skipped entirely before ``disc_start`` (the reference runs it with weight 0, which only updates BatchNorm statistics);
LPIPS runs without dropout (see :mod:`dualvitok.training.perceptual`); the perceptual network is only built when its
weight is non-zero; real and reconstructed images go through the discriminator in one concatenated batch (one
forward per backward, as DistributedDataParallel needs; the reference makes two calls, so BatchNorm statistics differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..outputs import DualViTokOutput
from .config import LossConfig
from .discriminator import PatchGANDiscriminator
from .losses import (
    adaptive_weight,
    adopt_weight,
    discriminator_loss,
    generator_adversarial_loss,
    reconstruction_loss,
    semantic_cosine_loss,
)

__all__ = ["DualViTokLoss", "GeneratorLossOutput", "DiscriminatorLossOutput"]


@dataclass
class GeneratorLossOutput:
    """Generator objective and its (detached where logged) terms, all scalars.

    Attributes:
        loss: the total to backpropagate.
        reconstruction: L1/L2 term (unweighted). perceptual: mean LPIPS (unweighted, 0 when disabled).
        adversarial: generator GAN loss (unweighted, 0 before ``disc_start``). disc_factor: 0 before ``disc_start``.
        adaptive_weight: lambda (1 unless adaptive). pixel_codebook / semantic_codebook: quantizer losses.
        semantic_cosine: mean(1 - cos) of the semantic reconstruction.
    """

    loss: Tensor
    reconstruction: Tensor
    perceptual: Tensor
    adversarial: Tensor
    disc_factor: float
    adaptive_weight: Tensor
    pixel_codebook: Tensor
    semantic_codebook: Tensor
    semantic_cosine: Tensor

    def log_dict(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {
            "loss": float(self.loss.detach()),
            "rec_loss": float(self.reconstruction.detach()),
            "perceptual_loss": float(self.perceptual.detach()),
            "g_adv_loss": float(self.adversarial.detach()),
            "disc_factor": float(self.disc_factor),
            "adaptive_weight": float(self.adaptive_weight),
            "pixel_codebook_loss": float(self.pixel_codebook.detach()),
            "semantic_codebook_loss": float(self.semantic_codebook.detach()),
            "semantic_cos_loss": float(self.semantic_cosine.detach()),
        }


@dataclass
class DiscriminatorLossOutput:
    """Discriminator objective: ``loss`` (weighted), mean logits on real and fake images, ``disc_factor``."""

    loss: Tensor
    logits_real: Tensor
    logits_fake: Tensor
    disc_factor: float

    def log_dict(self) -> dict[str, float]:
        return {"d_loss": float(self.loss.detach()), "logits_real": float(self.logits_real),
                "logits_fake": float(self.logits_fake)}


class DualViTokLoss(nn.Module):
    """Losses of DualViTok training; owns the PatchGAN discriminator and the LPIPS network.

    Args:
        config: :class:`dualvitok.training.config.LossConfig` (defaults: the reference recipe).
    """

    def __init__(self, config: LossConfig | None = None):
        super().__init__()
        self.config = config = config or LossConfig()
        if config.disc_type != "patchgan":
            raise ValueError(f"unknown disc_type {config.disc_type!r}; only 'patchgan' is implemented")
        self.discriminator = PatchGANDiscriminator(3, config.disc_dim, config.disc_num_layers)
        self.perceptual: nn.Module | None = None
        if config.perceptual_weight > 0:
            from .perceptual import LPIPSLoss

            self.perceptual = LPIPSLoss(config.perceptual_net, config.perceptual_backbone_weights)

    def disc_factor(self, global_step: int) -> float:
        """1 from ``disc_start`` on, else 0 (the reference's ``adopt_weight``)."""
        return adopt_weight(1.0, global_step, threshold=self.config.disc_start)

    def generator_loss(self, images: Tensor, output: DualViTokOutput, global_step: int,
                       last_layer: Tensor | None = None) -> GeneratorLossOutput:
        """Generator objective.

        Args:
            images: inputs ``[B, 3, H, W]`` in [-1, 1].
            output: the model's :class:`DualViTokOutput` for ``images``.
            global_step: 1-based step (the reference passes ``train_steps + 1``).
            last_layer: decoder's last weight, needed when ``disc_adaptive_weight``.
        """
        cfg = self.config
        recon = output.reconstruction
        rec = reconstruction_loss(images, recon, cfg.reconstruction_loss)
        zero = rec.new_zeros(())
        perceptual = self.perceptual(images, recon).mean() if self.perceptual is not None else zero
        nll = cfg.reconstruction_weight * rec + cfg.perceptual_weight * perceptual
        disc_factor = self.disc_factor(global_step)
        g_adv, weight = zero, rec.new_ones(())
        if disc_factor > 0 and cfg.disc_weight > 0:
            g_adv = generator_adversarial_loss(self.discriminator(recon.contiguous()), cfg.gen_adv_loss)
            if cfg.disc_adaptive_weight:
                if last_layer is None:
                    raise ValueError("disc_adaptive_weight needs last_layer (the decoder's conv_out.weight)")
                weight = adaptive_weight(nll, g_adv, last_layer)
        pixel_cb = output.encoding.pixel_loss.float()
        semantic_cb = output.encoding.semantic_loss.float()
        cosine = semantic_cosine_loss(output.encoding.semantic_target, output.semantic_reconstruction)
        semantic = cfg.semantic_weight * (cfg.semantic_codebook_weight * semantic_cb
                                          + cfg.semantic_reconstruction_weight * cosine)
        total = nll + disc_factor * cfg.disc_weight * weight * g_adv + cfg.codebook_weight * pixel_cb + semantic
        return GeneratorLossOutput(total, rec, perceptual, g_adv, disc_factor, weight, pixel_cb, semantic_cb, cosine)

    def discriminator_loss(self, images: Tensor, reconstructions: Tensor, global_step: int,
                           discriminator: Callable[[Tensor], Tensor] | None = None) -> DiscriminatorLossOutput:
        """Discriminator objective on real ``images`` and detached ``reconstructions`` ``[B, 3, H, W]``.

        Args:
            discriminator: the module to call (e.g. a DDP wrapper of ``self.discriminator``); default ours.
        """
        disc = discriminator if discriminator is not None else self.discriminator
        factor = self.disc_factor(global_step)
        both = torch.cat([images, reconstructions.detach()]).contiguous()  # one pass: BN sees real and fake together
        logits = disc(both)
        real, fake = logits.chunk(2)
        loss = factor * discriminator_loss(real, fake, self.config.disc_loss)
        return DiscriminatorLossOutput(loss, real.detach().float().mean(), fake.detach().float().mean(), factor)
