"""The rFID backends (pytorch-fid, torch-fidelity, clean-fid): each package's distance and features, checked against
independent references (scipy's sqrtm formula on the same features; clean-fid's resize written out with PIL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualvitok.evaluation.metrics import EvalBatch, FIDMetric
from dualvitok.metrics import WeightsNotFoundError
from dualvitok.metrics.fid_backends import DISTANCES, CleanFIDFeatures, FIDBackend, build_fid_backend

linalg = pytest.importorskip("scipy.linalg")


class Projection(torch.nn.Module):
    """A small random feature extractor: 4x4 average-pooled pixels through a fixed projection, ``[B, 6]``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1) @ self.proj


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


def _u8_batches(n_batches=3, b=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        real = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
        noise = torch.randint(-40, 41, real.shape, generator=g)
        fake = (real.double() * 0.6 + 60 + noise).round().clamp(0, 255).to(torch.uint8)  # another distribution
        yield EvalBatch(real, fake, real.double() / 255, fake.double() / 255, None)


@pytest.mark.parametrize("backend", ["pytorch-fid", "torch-fidelity", "clean-fid"])
def test_each_backends_distance_equals_scipy_on_the_same_features(backend):
    if backend == "torch-fidelity":
        pytest.importorskip("torch_fidelity")
    if backend == "clean-fid":
        pytest.importorskip("cleanfid")
    extractor = Projection()
    metric = FIDMetric(FIDBackend(backend, extractor, 6, DISTANCES[backend]))
    real, fake = [], []
    for batch in _u8_batches():
        metric.update(batch)
        real.append(extractor(batch.real).double().numpy())
        fake.append(extractor(batch.fake).double().numpy())
    result = metric.compute()
    assert result.extra["fid_backend"] == backend
    expected = _scipy_fid(np.concatenate(real), np.concatenate(fake))
    assert expected > 0.1
    assert result.values["rfid"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend, file", [("torch-fidelity", "weights-inception-2015-12-05-6726825d.pth"),
                                           ("clean-fid", "inception-2015-12-05.pt"),
                                           ("pytorch-fid", "pt_inception-2015-12-05-6726825d.pth")])
def test_offline_without_weights_fails_clearly(backend, file, empty_torch_home):
    with pytest.raises(WeightsNotFoundError, match=f"{file}.*--fid-weights"):
        build_fid_backend(backend, allow_download=True)  # offline: no download attempted
    with pytest.raises(ValueError, match="unknown FID backend"):
        build_fid_backend("tf-fid")


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    pytest.importorskip("pytorch_fid")
    from dualvitok.metrics import InceptionFeatures

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(InceptionFeatures().inception.state_dict(), path)  # pytorch-fid's keys = torch-fidelity's keys
    return path


def test_torch_fidelity_features_are_the_packages(random_inception_file, sample_image_paths):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    backend = build_fid_backend("torch-fidelity", random_inception_file)
    with Image.open(sample_image_paths[0]) as im:
        u8 = torch.from_numpy(np.array(im.convert("RGB").resize((48, 40)))).permute(2, 0, 1)[None].contiguous()
    reference = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(random_inception_file))
    with torch.no_grad():
        expected = reference(u8)[0]
    got = backend.extractor(u8.double() / 255)
    assert got.shape == (1, 2048)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class Payload:
    """Any non-tensor object in a weights pickle (which a full unpickler would construct)."""


def test_torch_fidelity_weights_are_read_without_unpickling_code(tmp_path):
    pytest.importorskip("torch_fidelity")

    path = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, path)  # a pickled object, not a tensor
    with pytest.raises(ValueError, match="refused to load .*pickled objects"):
        build_fid_backend("torch-fidelity", path)


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 5, stride=3)
        self.head = torch.nn.Conv2d(32, 2048, 1)

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1))  # [B, 2048, 1, 1]


class _TorchScriptInception(torch.nn.Module):
    """Stands in for NVIDIA's inception-2015-12-05.pt: a ``layers`` submodule and ``forward(x, return_features)``."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_clean_fid_features_use_its_resize_and_network(tmp_path, sample_image_paths):
    pytest.importorskip("cleanfid")
    torch.manual_seed(0)
    module = _TorchScriptInception().eval()
    path = tmp_path / "my-inception.pt"
    torch.jit.script(module).save(str(path))
    extractor = CleanFIDFeatures(path)
    images = []
    for p in sample_image_paths[:2]:
        with Image.open(p) as im:
            images.append(np.asarray(im.convert("RGB").resize((40, 56))))
    u8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    got = extractor(u8.double() / 255)
    expected = []
    for a in images:  # clean-fid's "clean" resize from its definition: PIL bicubic on float channels, no rounding
        channels = [np.asarray(Image.fromarray(a[..., c].astype(np.float32), mode="F").resize((299, 299),
                                                                                              Image.BICUBIC))
                    for c in range(3)]
        x = torch.from_numpy(np.stack(channels).clip(0, 255))[None]
        with torch.no_grad():
            expected.append(module.layers((x - 128) / 128).view(1, 2048))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-6)
