"""LPIPS wrapper (hand-computed distance, local backbone weights), configs, samplers and data."""

from __future__ import annotations

import math

import pytest
import torch

from dualvitok.training.config import TrainConfig, list_configs, load_train_config, resolve_config_path
from dualvitok.training.samplers import assign_buckets, bucket_sizes, epoch_batches

pytest.importorskip("lpips")


def test_lpips_equals_hand_computation():
    from dualvitok.training.perceptual import LPIPSLoss

    torch.manual_seed(0)
    loss = LPIPSLoss("alex", backbone_weights=None)  # random trunk, bundled linear layers
    assert not loss.backbone_pretrained
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    got = loss(x, y)
    m = loss.model
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(img):
        h, out = (img - shift) / scale, []
        for i in range(1, 6):
            h = getattr(m.net, f"slice{i}")(h)
            out.append(h)
        return out

    expected = torch.zeros(2)
    for k, (fx, fy) in enumerate(zip(features(x), features(y), strict=True)):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weight = m.lins[k].model[-1].weight  # [1, C, 1, 1]
        expected += ((nx - ny) ** 2 * weight).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert loss(x, x).abs().max() < 1e-6
    loss.train()
    assert not loss.training  # stays in eval mode: no dropout


def test_lpips_loads_local_torchvision_backbone(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from dualvitok.training.perceptual import LPIPSLoss

    tv = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(tv.state_dict(), path)
    loss = LPIPSLoss("alex", backbone_weights=path)
    assert loss.backbone_pretrained
    x = torch.rand(1, 3, 64, 64)
    h = x
    for i in range(1, 6):
        h = getattr(loss.model.net, f"slice{i}")(h)
    ref = tv.features[:12](x)  # torchvision's features up to relu5 (index 11)
    torch.testing.assert_close(h, ref)
    with pytest.raises(FileNotFoundError):
        LPIPSLoss("alex", backbone_weights=tmp_path / "missing.pth")


def test_shipped_configs_parse_and_resolve():
    assert {"tiny_cpu", "fix256", "anyres_max512"} <= set(list_configs())
    assert resolve_config_path("tiny_cpu").name == "tiny_cpu.yaml"
    tiny = load_train_config("tiny_cpu")
    assert tiny.model.name == "dualvitok_tiny" and tiny.data.sources == ("builtin:skimage",)
    fix = load_train_config("fix256")
    assert fix.model.overrides["pixel_drop_rate"] == 0.1 and fix.loss.disc_start == 20000
    assert fix.optimizer.betas == (0.9, 0.95) and fix.optimizer.lr == 1e-4 and fix.data.stages[0].resolution == 256
    anyres = load_train_config("anyres_max512")
    assert anyres.data.stages[-1].mode == "anyres" and anyres.data.stages[-1].max_pixels == 512 * 512
    assert anyres.run.mixed_precision == "bf16" and anyres.loss.disc_weight == 0.5
    again = TrainConfig.from_dict(anyres.to_dict())
    assert again == anyres


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        resolve_config_path("no_such_config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  disc_strat: 3\n")
    with pytest.raises(ValueError, match="disc_strat"):
        load_train_config(bad)
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"data": {"stages": [{"mode": "fixed", "resolution": 100}]}})


def test_bucket_sizes_within_budget():
    for max_pixels in (256 * 256, 512 * 512):
        ratios = (1 / 3, 1 / 2, 9 / 16, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 16 / 9, 2, 3)
        for (h, w), ratio in zip(bucket_sizes(max_pixels), ratios, strict=True):
            assert h % 16 == 0 and w % 16 == 0 and h * w <= max_pixels
            assert abs(math.log(w / h) - math.log(ratio)) <= 0.1
            assert h * w > 0.85 * max_pixels  # close to the pixel budget
    assert assign_buckets([(100, 100), (300, 600), (600, 300), (100, 1000)]) == [5, 9, 1, 10]


def test_epoch_batches_deterministic_and_sliceable():
    sizes = [(64, 64)]
    a = epoch_batches(10, 4, seed=1, stage=0, epoch=0, sizes=sizes)
    b = epoch_batches(10, 4, seed=1, stage=0, epoch=0, sizes=sizes)
    c = epoch_batches(10, 4, seed=1, stage=0, epoch=1, sizes=sizes)
    assert a == b and a != c and len(a) == 2 and all(len(batch) == 4 for batch in a)
    assert len({s.index for batch in a for s in batch}) == 8  # no repeats inside an epoch
    small = epoch_batches(3, 8, seed=0, stage=0, epoch=0, sizes=sizes)  # data smaller than a batch: repeated
    assert len(small) == 1 and len(small[0]) == 8
    buckets = [0, 0, 1, 1, 1, 1]
    mixed = epoch_batches(6, 2, 0, 0, 0, [(32, 64), (64, 32)], buckets)
    for batch in mixed:
        assert len({(s.height, s.width) for s in batch}) == 1  # one size per batch
        assert len({buckets[s.index] for s in batch}) == 1


def test_dataset_crops_are_deterministic(tmp_path):
    from PIL import Image

    from dualvitok.training.data import TrainImageDataset, collect_sources
    from dualvitok.training.samplers import SampleSpec

    Image.new("RGB", (80, 50), (255, 0, 0)).save(tmp_path / "a.png")
    sources = collect_sources([str(tmp_path)])
    ds = TrainImageDataset(sources, crop_scale=(0.5, 1.0))
    x1, x2 = ds[SampleSpec(0, 32, 48, seed=5)], ds[SampleSpec(0, 32, 48, seed=5)]
    assert x1.shape == (3, 32, 48) and torch.equal(x1, x2)
    torch.testing.assert_close(x1[0], torch.ones(32, 48))  # red -> +1 in channel 0
    torch.testing.assert_close(x1[1], -torch.ones(32, 48))
    with pytest.raises(FileNotFoundError):
        collect_sources([str(tmp_path / "nope")])


def test_tar_shards_are_read_by_offset(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from dualvitok.training.data import TrainImageDataset, collect_sources

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, color in (("000", (0, 255, 0)), ("001", (0, 0, 255))):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), color).save(buf, format="PNG")
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sources = collect_sources([str(shard)])
    assert [s.member for s in sources] == ["000.png", "001.png"]
    ds = TrainImageDataset(sources)
    assert ds.image_sizes() == [(30, 40), (30, 40)]
    assert ds.image(1).getpixel((0, 0)) == (0, 0, 255)
    assert len(collect_sources([str(tmp_path)])) == 2  # shards inside folders are found too
