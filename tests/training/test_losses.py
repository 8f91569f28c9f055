"""Each loss term against a value computed by hand (closed form / explicit arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dualvitok.outputs import DualViTokEncoding, DualViTokOutput
from dualvitok.training.config import LossConfig
from dualvitok.training.dualvitok_loss import DualViTokLoss
from dualvitok.training.losses import (
    adaptive_weight,
    adopt_weight,
    discriminator_loss,
    generator_adversarial_loss,
    hinge_d_loss,
    reconstruction_loss,
    semantic_cosine_loss,
    vanilla_d_loss,
)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_reconstruction_l1_l2():
    x = torch.tensor([0.0, 0.5, -1.0, 1.0]).view(1, 1, 2, 2)
    y = torch.tensor([0.5, 0.5, 0.0, -1.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx((0.5 + 0 + 1 + 2) / 4)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx((0.25 + 0 + 1 + 4) / 4)
    with pytest.raises(ValueError):
        reconstruction_loss(x, y, "l3")


def test_gan_losses():
    real = torch.tensor([0.5, 2.0]).view(1, 1, 1, 2)
    fake = torch.tensor([-2.0, 0.3]).view(1, 1, 1, 2)
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0.5 + 0) / 2 + (0 + 1.3) / 2)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.65))
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.45)
    expected = 0.5 * ((softplus(-0.5) + softplus(-2.0)) / 2 + (softplus(-2.0) + softplus(0.3)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(expected, rel=1e-6)
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(-(-2.0 + 0.3) / 2)
    assert generator_adversarial_loss(fake, "non-saturating").item() == pytest.approx(
        (softplus(2.0) + softplus(-0.3)) / 2, rel=1e-6)


def test_adopt_weight_schedule():
    assert adopt_weight(0.5, 0, threshold=10) == 0.0
    assert adopt_weight(0.5, 9, threshold=10) == 0.0
    assert adopt_weight(0.5, 10, threshold=10) == 0.5
    assert adopt_weight(0.5, 11, threshold=10) == 0.5


def test_adaptive_weight():
    w = torch.tensor(0.7, requires_grad=True)
    a = 1.5
    rec = (w * a) ** 2  # d/dw = 2 a^2 w
    g = 3.0 * w  # d/dw = 3
    got = adaptive_weight(rec, g, w)
    assert got.item() == pytest.approx(2 * a * a * 0.7 / (3.0 + 1e-4), rel=1e-6)
    assert not got.requires_grad


def test_semantic_cosine_loss():
    # two tokens (B=1, C=2, h=1, w=2): cos([1,0],[1,1]) = 1/sqrt(2); cos([0,1],[0,-2]) = -1
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    recon = torch.tensor([[1.0, 1.0], [0.0, -2.0]]).T.reshape(1, 2, 1, 2)
    expected = ((1 - 1 / math.sqrt(2)) + (1 - (-1))) / 2
    assert semantic_cosine_loss(target, recon).item() == pytest.approx(expected, rel=1e-6)
    # the reference's F.cosine_embedding_loss(margin) on positive pairs is the same quantity
    t = target.movedim(1, -1).reshape(-1, 2)
    r = recon.movedim(1, -1).reshape(-1, 2)
    ref = torch.nn.functional.cosine_embedding_loss(t, r, torch.ones(2), margin=1e-4)
    assert semantic_cosine_loss(target, recon).item() == pytest.approx(ref.item(), rel=1e-6)


class MeanDiscriminator(nn.Module):
    """D(x) = s * mean over pixels of channel 0, per image, as a [B, 1, 1, 1] patch map."""

    def __init__(self, s: float = 2.0):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        return self.s * x[:, :1].mean(dim=(2, 3), keepdim=True)


def _output(images, recon):
    enc = DualViTokEncoding(
        semantic_indices=torch.zeros(2, 1, 1, dtype=torch.long), pixel_indices=torch.zeros(2, 1, 1, dtype=torch.long),
        semantic_codes=torch.zeros(2, 1, 1, 1), pixel_codes=torch.zeros(2, 1, 1, 1),
        semantic_features=torch.zeros(2, 1, 1, 1), pixel_features=torch.zeros(2, 1, 1, 1),
        semantic_target=torch.tensor([1.0, 0.0, 0.0, 1.0]).view(2, 2, 1, 1),
        semantic_loss=torch.tensor(0.3), pixel_loss=torch.tensor(0.2))
    sem_rec = torch.tensor([1.0, 1.0, 0.0, -2.0]).view(2, 2, 1, 1)
    return DualViTokOutput(reconstruction=recon, semantic_reconstruction=sem_rec, encoding=enc)


@pytest.mark.parametrize("step", [5, 10])
def test_dualvitok_loss_total(step):
    cfg = LossConfig(perceptual_weight=0.0, disc_start=10, disc_weight=0.5, reconstruction_weight=2.0,
                     codebook_weight=1.5, semantic_weight=0.5, semantic_codebook_weight=2.0,
                     semantic_reconstruction_weight=3.0, disc_dim=8)
    loss = DualViTokLoss(cfg)
    loss.discriminator = MeanDiscriminator(2.0)
    images = torch.zeros(2, 3, 2, 2)
    recon = torch.zeros(2, 3, 2, 2)
    recon[0, 0] = 0.5  # image 0, channel 0: mean 0.5 -> D = 1.0; image 1: D = 0
    out = loss.generator_loss(images, _output(images, recon), global_step=step)
    rec = (4 * 0.25) / 24  # four entries of 0.5^2 among 2*3*2*2 = 24
    cos = ((1 - 1 / math.sqrt(2)) + 2) / 2
    semantic = 0.5 * (2.0 * 0.3 + 3.0 * cos)
    g_adv = -(1.0 + 0.0) / 2
    factor = 1.0 if step >= 10 else 0.0
    expected = 2.0 * rec + factor * 0.5 * g_adv + 1.5 * 0.2 + semantic
    assert out.disc_factor == factor
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.reconstruction.item() == pytest.approx(rec, rel=1e-6)
    assert out.semantic_cosine.item() == pytest.approx(cos, rel=1e-6)
    assert out.adversarial.item() == pytest.approx(g_adv if factor else 0.0)

    d = loss.discriminator_loss(images, recon, global_step=step)
    # real logits: 0, 0; fake logits: 1, 0 -> hinge = 0.5 * (mean(1, 1) + mean(2, 1)) = 0.5 * (1 + 1.5)
    assert d.disc_factor == factor
    assert d.loss.item() == pytest.approx(factor * 0.5 * (1.0 + 1.5))


def test_discriminator_weight_is_zero_before_disc_start():
    loss = DualViTokLoss(LossConfig(perceptual_weight=0.0, disc_start=100, disc_dim=8))
    assert [loss.disc_factor(s) for s in (1, 99, 100, 101)] == [0.0, 0.0, 1.0, 1.0]
