"""Token-noise injection in training (config.pixel_drop_rate) and the PatchGAN discriminator."""

from __future__ import annotations

import math

import pytest
import torch

from dualvitok import create_model
from dualvitok.training.discriminator import PatchGANDiscriminator


@pytest.fixture(scope="module")
def noisy_model():
    return create_model("dualvitok_tiny", pixel_drop_rate=0.3, pixel_drop_batch_rate=0.5)


def _pixel_part(model, merged):
    return merged[:, model.semantic_quantizer.dim:]  # decoder input = [semantic; pixel]


def _noisy_merge(model, semantic, pixel):
    """The decoder input of a training step: token noise (the trainer asks for it), then the merge."""
    return model.merge_codes(semantic, model.add_token_noise(pixel))


def test_noise_fractions_random_mode(noisy_model):
    """alpha=0.5 of the samples, beta=0.3 of their tokens take the previous sample's token (reference 'random')."""
    model = noisy_model.train()
    torch.manual_seed(0)
    batch, h, w = 4000, 4, 4
    pixel = torch.randn(batch, model.pixel_quantizer.dim, h, w)
    semantic = torch.randn(batch, model.semantic_quantizer.dim, 2, 2)
    out = _pixel_part(model, _noisy_merge(model, semantic, pixel))
    changed = (out != pixel).any(dim=1)  # [B, h, w]
    previous = torch.cat([pixel[-1:], pixel[:-1]])
    assert torch.equal(out[changed.unsqueeze(1).expand_as(out)], previous[changed.unsqueeze(1).expand_as(out)])
    n = batch * h * w
    p = 0.5 * 0.3
    frac = changed.float().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)  # overall ~ alpha * beta
    # samples with any corruption: alpha * (1 - (1 - beta)^16)
    p_sample = 0.5 * (1 - 0.7 ** (h * w))
    frac_sample = changed.flatten(1).any(1).float().mean().item()
    assert abs(frac_sample - p_sample) < 4 * math.sqrt(p_sample * (1 - p_sample) / batch)
    # inside corrupted samples, tokens are hit with rate ~ beta (conditioned on >= 1 hit)
    hit = changed.flatten(1)[changed.flatten(1).any(1)].float().mean().item()
    assert abs(hit - 0.3 / (1 - 0.7 ** (h * w))) < 0.02


def test_batch_of_one_untouched_in_random_mode():
    model = create_model("dualvitok_tiny", pixel_drop_rate=1.0, pixel_drop_batch_rate=1.0).train()
    pixel = torch.randn(1, model.pixel_quantizer.dim, 4, 4)
    semantic = torch.randn(1, model.semantic_quantizer.dim, 2, 2)
    assert torch.equal(_pixel_part(model, _noisy_merge(model, semantic, pixel)), pixel)
    pixel2 = torch.randn(2, model.pixel_quantizer.dim, 4, 4)
    semantic2 = torch.randn(2, model.semantic_quantizer.dim, 2, 2)
    swapped = _pixel_part(model, _noisy_merge(model, semantic2, pixel2))
    assert torch.equal(swapped, pixel2.flip(0))  # every token replaced by the other sample's


def test_noise_only_when_asked_and_when_configured(noisy_model):
    pixel = torch.randn(64, noisy_model.pixel_quantizer.dim, 4, 4)
    semantic = torch.randn(64, noisy_model.semantic_quantizer.dim, 2, 2)
    for mode in (True, False):  # merging never adds noise, whatever the mode
        assert torch.equal(_pixel_part(noisy_model, noisy_model.train(mode).merge_codes(semantic, pixel)), pixel)
    clean = create_model("dualvitok_tiny").train()  # pixel_drop_rate None: the released config
    assert torch.equal(_pixel_part(clean, _noisy_merge(clean, semantic, pixel)), pixel)
    noisy_model.train()


def test_patchgan_matches_reference_size_and_shapes():
    disc = PatchGANDiscriminator(3, 64, 3)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633  # reference NLayerDiscriminator(3, 64, 3)
    with torch.no_grad():
        assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    meta = PatchGANDiscriminator(3, 64, 3).to("meta")
    assert meta(torch.zeros(1, 3, 512, 384, device="meta")).shape == (1, 1, 62, 46)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3  # N(0, 0.02) init
