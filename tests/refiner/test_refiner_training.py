"""Refiner training: token perturbation, aspect-ratio buckets, loss decrease, exact resume and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from dualvitok import create_model  # noqa: E402
from dualvitok.refiner import RefinerPipeline, TokenNoise, code_features, nearest_resolution  # noqa: E402
from dualvitok.refiner.buckets import BucketImageDataset, bucket_batches, list_images  # noqa: E402
from dualvitok.refiner.trainer import RefinerTrainConfig, RefinerTrainer  # noqa: E402
from dualvitok.refiner.training import RefinerLossConfig, refiner_loss, training_noise_scheduler  # noqa: E402

TINY_RESOLUTIONS = [(64, 64), (128, 64), (64, 128)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six small photos of three shapes (bundled samples, resized)."""
    from dualvitok.assets import sample_images

    folder = tmp_path_factory.mktemp("refiner_data")
    sources = sample_images()
    sizes = [(64, 64), (130, 60), (60, 130), (70, 66), (120, 64), (64, 64)]
    for i, size in enumerate(sizes):
        Image.open(sources[i % len(sources)]).convert("RGB").resize(size).save(folder / f"{i}.png")
    return folder


def _refiner(seed=1):
    torch.manual_seed(0)
    tokenizer = create_model("dualvitok_tiny").eval()
    torch.manual_seed(seed)
    return RefinerPipeline.from_architecture(tokenizer, "tiny", resolutions=TINY_RESOLUTIONS)


def test_token_perturbation_rates():
    torch.manual_seed(0)
    tokenizer = create_model("dualvitok_tiny").eval()
    g = torch.Generator().manual_seed(0)
    b, h, w = 64, 32, 32
    sem = torch.randint(tokenizer.semantic_quantizer.codebook_size, (b, h, w), generator=g)
    pix = torch.randint(tokenizer.pixel_quantizer.codebook_size, (b, h, w), generator=g)
    clean = code_features(tokenizer, sem, pix)
    noisy = code_features(tokenizer, sem, pix, semantic_noise=TokenNoise(0.5, 0.05), pixel_noise=TokenNoise(0.5, 0.1),
                          generator=torch.Generator().manual_seed(1))
    c_s = tokenizer.semantic_quantizer.dim
    # pixel channels are not resized, so a changed position is a replaced pixel token
    pix_changed = (noisy[:, c_s:] != clean[:, c_s:]).any(1).float()  # [B, h, w]
    per_sample = pix_changed.mean((1, 2))
    hit = per_sample > 0
    assert 0.3 < hit.float().mean() < 0.7  # about 50% of the samples
    assert 0.07 < per_sample[hit].mean() < 0.13  # about 10% of their tokens (minus same-code draws)
    sem_changed = (noisy[:, :c_s] != clean[:, :c_s]).any(1).float().mean()
    assert 0 < sem_changed  # perturbed, and the bicubic resize spreads each change; check the rate on codes:
    sem_codes = tokenizer.semantic_quantizer.indices_to_codes(sem)
    from dualvitok.quantizers import inject_token_noise

    replaced = inject_token_noise(sem_codes, 0.5, 0.05, "uniform", tokenizer.semantic_quantizer.codebook,
                                  torch.Generator().manual_seed(2))
    sem_rate = (replaced != sem_codes).any(1).float().mean()
    assert sem_rate < per_sample.mean()  # semantic masking is smaller than pixel masking


def test_nearest_resolution_matches_brute_force():
    for w, h in [(64, 64), (130, 60), (60, 130), (1000, 10), (90, 70)]:
        expected = min(TINY_RESOLUTIONS, key=lambda r: abs(math.log(r[0] / r[1]) - math.log(w / h)))
        assert nearest_resolution(h, w, TINY_RESOLUTIONS) == expected


def test_buckets_are_homogeneous_complete_and_deterministic(image_folder):
    dataset = BucketImageDataset(list_images(image_folder), TINY_RESOLUTIONS)
    assert dataset.buckets == [0, 1, 2, 0, 1, 0]
    batches = bucket_batches(dataset.buckets, 2, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert all(len({dataset.buckets[i] for i in batch}) == 1 for batch in batches)
    assert batches == bucket_batches(dataset.buckets, 2, seed=0, epoch=0)
    assert any(bucket_batches(dataset.buckets, 2, seed=0, epoch=e) != batches for e in range(1, 6))
    for i in range(len(dataset)):
        w, h = TINY_RESOLUTIONS[dataset.buckets[i]]
        x = dataset[i]
        assert x.shape == (3, h, w) and -1 <= float(x.min()) and float(x.max()) <= 1


def _fixed_loss(refiner, images, scheduler):
    """Loss on fixed draws (same noise, timesteps and perturbations before and after training)."""
    with torch.no_grad():
        return sum(float(refiner_loss(refiner, scheduler, images, RefinerLossConfig(),
                                      generator=torch.Generator().manual_seed(s)).loss) for s in range(3)) / 3


def test_short_training_lowers_the_loss(image_folder, tmp_path):
    refiner = _refiner()
    dataset = BucketImageDataset(list_images(image_folder), TINY_RESOLUTIONS)
    images = torch.stack([dataset[i] for i in (0, 3, 5)])  # the 64x64 bucket
    scheduler = training_noise_scheduler(refiner)
    before = _fixed_loss(refiner, images, scheduler)
    config = RefinerTrainConfig(output_dir=str(tmp_path), steps=20, batch_size=3, learning_rate=2e-3,
                                checkpoint_every=100)
    trainer = RefinerTrainer(config, refiner=refiner, dataset=dataset)
    result = trainer.train(save_pipeline=False)
    after = _fixed_loss(refiner, images, scheduler)
    assert result.step == 20 and len(result.losses) == 20
    print(f"fixed-draw loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)
    assert not refiner.tokenizer.training and not any(p.requires_grad for p in refiner.tokenizer.parameters())


def test_resume_is_exact(image_folder, tmp_path):
    def trainer(out):
        config = RefinerTrainConfig(output_dir=str(out), steps=4, batch_size=2, learning_rate=1e-3,
                                    checkpoint_every=2, keep_checkpoints=5)
        return RefinerTrainer(config, refiner=_refiner(),
                              dataset=BucketImageDataset(list_images(image_folder), TINY_RESOLUTIONS))

    straight = trainer(tmp_path / "a")
    straight_losses = straight.train(save_pipeline=False).losses
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-00000002.pt"
    assert checkpoint.is_file()
    resumed = trainer(tmp_path / "b")
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from here
    assert resumed.resume(checkpoint)
    resumed_losses = resumed.train(save_pipeline=False).losses
    assert resumed_losses == straight_losses[2:]
    a, b = straight.refiner.unet.state_dict(), resumed.refiner.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_refiner(image_folder, tmp_path, capsys):
    from dualvitok.cli import main

    out = tmp_path / "run"
    argv = ["train-refiner", "--data", str(image_folder), "--output", str(out), "--tokenizer", "dualvitok_tiny",
            "--architecture", "tiny", "--resolutions", "64x64,128x64,64x128", "--steps", "1", "--batch-size", "2",
            "--checkpoint-every", "1"]
    assert main(argv) == 0
    assert (out / "checkpoints" / "checkpoint-00000001.pt").is_file()
    assert main(argv[:-6] + ["--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--resume"]) == 0
    assert '"step": 2' in capsys.readouterr().out.strip().splitlines()[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    tokenizer = create_model("dualvitok_tiny")
    loaded = RefinerPipeline.from_pretrained(out / "refiner", tokenizer)
    assert loaded.resolutions == tuple(TINY_RESOLUTIONS)
