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
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    tokenizer = create_model("dualvitok_tiny")
    loaded = RefinerPipeline.from_pretrained(out / "refiner", tokenizer)
    assert loaded.resolutions == tuple(TINY_RESOLUTIONS)


def _same_size_folder(folder, n=8):
    from dualvitok.assets import sample_images

    folder.mkdir()
    sources = sample_images()
    for i in range(n):
        Image.open(sources[i % len(sources)]).convert("RGB").resize((64, 64)).save(folder / f"{i}.png")
    return folder


_DDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from dualvitok import create_model
from dualvitok.refiner import RefinerPipeline
from dualvitok.refiner.trainer import RefinerTrainConfig, RefinerTrainer
data, out, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
tokenizer = create_model("dualvitok_tiny").eval()
torch.manual_seed(1)
refiner = RefinerPipeline.from_architecture(tokenizer, "tiny", resolutions=[(64, 64)])
config = RefinerTrainConfig(data=data, output_dir=out, steps=steps, batch_size=2, learning_rate=1e-3,
                            checkpoint_every=2, keep_checkpoints=5, ema_decay=0.5)
trainer = RefinerTrainer(config, refiner=refiner, progress=False)
if resume:
    assert trainer.resume()
result = trainer.train(save_pipeline=False)
rank = int(os.environ.get("RANK", "0"))
unet = trainer.refiner.unet.state_dict()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"losses": result.losses, "sum": float(sum(v.double().sum() for v in unet.values())),
               "ema": float(sum(v.double().sum() for v in trainer.ema.shadow.values()))}, f)
torch.save({k: v.clone() for k, v in unet.items()}, os.path.join(out, f"unet{rank}.pt"))
"""


def test_torchrun_ddp_with_ema_resumes_exactly(tmp_path):
    """2 gloo processes: the ranks stay in sync (DDP), the EMA is kept, and 2 steps + resume == 4 steps."""
    import json
    import os
    import subprocess
    import sys

    data = _same_size_folder(tmp_path / "data")
    script = tmp_path / "train_ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def torchrun(out, steps, resume):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
               str(data), str(out), str(steps), "1" if resume else "0"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    straight = torchrun(tmp_path / "straight", 4, False)
    assert straight[0]["sum"] == straight[1]["sum"] and straight[0]["ema"] == straight[1]["ema"]  # in sync
    assert straight[0]["losses"] == straight[1]["losses"]  # the logged loss is the mean over ranks
    state = torch.load(tmp_path / "straight" / "checkpoints" / "checkpoint-00000004.pt", weights_only=True)
    assert state["world_size"] == 2 and state["ema"]["decay"] == 0.5
    first = torchrun(tmp_path / "split", 2, False)
    resumed = torchrun(tmp_path / "split", 4, True)
    assert first[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]
    a = torch.load(tmp_path / "straight" / "unet0.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "unet0.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed[0]["ema"] == straight[0]["ema"]


def test_gradient_checkpointing_gives_the_same_step(image_folder, tmp_path):
    dataset = BucketImageDataset(list_images(image_folder), TINY_RESOLUTIONS)
    images = torch.stack([dataset[i] for i in (0, 3)])
    results = []
    for checkpointing in (False, True):
        config = RefinerTrainConfig(output_dir=str(tmp_path / str(checkpointing)), steps=1, batch_size=2,
                                    learning_rate=1e-3, gradient_checkpointing=checkpointing)
        trainer = RefinerTrainer(config, refiner=_refiner(), dataset=dataset, progress=False)
        assert trainer.refiner.unet.is_gradient_checkpointing == checkpointing
        loss = trainer.train_step(images)
        results.append((loss, {k: v.clone() for k, v in trainer.refiner.unet.state_dict().items()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for k, v in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_unreadable_images_are_skipped_and_capped(tmp_path):
    from dualvitok.training.run import TooManySkippedError

    data = _same_size_folder(tmp_path / "data", n=6)
    (data / "broken.png").write_bytes(b"not a png")
    jpeg = data / "truncated.jpg"
    Image.open(data / "0.png").save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # the header survives, the pixels do not
    dataset = BucketImageDataset(list_images(data), [(64, 64)])
    assert len(dataset.unreadable) == 1  # the header of broken.png; truncated.jpg fails only when decoded

    config = RefinerTrainConfig(output_dir=str(tmp_path / "run"), steps=4, batch_size=4, learning_rate=1e-3,
                                max_skipped_fraction=0.5)
    trainer = RefinerTrainer(config, refiner=_refiner(), dataset=dataset, progress=False)
    result = trainer.train(save_pipeline=False)
    assert result.step == 4 and all(math.isfinite(v) for v in result.losses)
    names = sorted(line.split('"path": "')[1].split('"')[0].rsplit("/", 1)[-1]
                   for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines())
    assert names == ["broken.png", "truncated.jpg"]
    with pytest.raises(TooManySkippedError, match="2 of 8"):
        config = RefinerTrainConfig(output_dir=str(tmp_path / "capped"), steps=4, batch_size=4,
                                    max_skipped_fraction=0.2)
        RefinerTrainer(config, refiner=_refiner(), dataset=dataset, progress=False).train(save_pipeline=False)
