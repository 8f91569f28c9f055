"""FID Inception and LPIPS wrappers against the packages they wrap, with random weights (nothing downloadable here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualvitok.metrics import LPIPS, InceptionFeatures, WeightsNotFoundError
from dualvitok.metrics.weights import FID_INCEPTION, LPIPS_ALEX, resolve_weights

pytest.importorskip("lpips")
pytest.importorskip("pytorch_fid")
torchvision = pytest.importorskip("torchvision")


def _photos(paths, size=64, n=2) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1] from real photos."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths[:n]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_missing_weights_offline_say_how_to_provide_them(empty_torch_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(WeightsNotFoundError, match="--fid-weights") as e:
        InceptionFeatures.from_pretrained()
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and "DUALVITOK_FID_WEIGHTS" in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth"):
        LPIPS.from_pretrained("vgg")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(FID_INCEPTION, empty_torch_home / "nope.pth")
    with pytest.raises(ValueError, match="unknown LPIPS backbone"):
        LPIPS("resnet")


def test_inception_features_equal_pytorch_fid(tmp_path, monkeypatch, sample_image_paths):
    """Our extractor with weights W == pytorch-fid's InceptionV3([3]) with the same W (random W here)."""
    import pytorch_fid.inception as pfi

    torch.manual_seed(0)
    ours = InceptionFeatures()
    for m in ours.modules():  # random but non-degenerate weights and BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in ours.inception.state_dict().items()}
    path = tmp_path / "fake_inception.pth"
    torch.save(state, path)
    loaded = ours
    for p in loaded.parameters():
        p.data.zero_()
    loaded.load_weights(path)  # restores the saved weights
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = _photos(sample_image_paths, size=80, n=1)
    with torch.no_grad():
        expected = reference(x)[0].flatten(1)
    got = loaded(x)
    assert got.shape == (1, 2048) and float(got.std()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="FID Inception"):
        loaded.load_weights(_save_alexnet_features(tmp_path))


def _save_alexnet_features(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(net.state_dict(), path)
    return path


def test_lpips_alex_equals_lpips_package_loading_the_same_trunk(empty_torch_home, sample_image_paths):
    """Trunk weights placed in the torch hub cache: lpips.LPIPS(pretrained=True) (via torchvision) and ours agree."""
    lpips = pytest.importorskip("lpips")
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    _save_alexnet_features(cache)  # a random trunk under the official file name
    assert resolve_weights(LPIPS_ALEX, allow_download=False) == cache / "alexnet-owt-7be5be79.pth"
    ours = LPIPS.from_pretrained("alex", allow_download=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="alex", pretrained=True, verbose=False).eval()
    x = _photos(sample_image_paths, size=64, n=3)
    y = x.flip(0)
    with torch.no_grad():
        expected = reference(x * 2 - 1, y * 2 - 1).flatten()
    got = ours(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(ours(x, x).abs().max()) < 1e-6


def test_lpips_vgg_equals_a_naive_reimplementation(tmp_path, sample_image_paths):
    """LPIPS-VGG from its definition: torchvision VGG16 features at relu1_2..relu5_3, unit-normalised, squared
    difference, weighted by the calibrated 1x1 layers, spatially averaged, summed."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(2)
    vgg = torch.nn.Module()
    vgg.features = make_layers(cfgs["D"]).eval()  # VGG16's feature layers only (the classifier is not used)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg.state_dict(), path)
    ours = LPIPS.from_pretrained("vgg", weights_path=path, allow_download=False)
    lins = [ours.model.lins[i].model[-1].weight for i in range(5)]  # [1, C, 1, 1] each, from the lpips package file
    assert all(float(w.min()) >= 0 and float(w.abs().sum()) > 0 for w in lins)  # calibrated (non-negative) weights
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        out, h = [], (x * 2 - 1 - shift) / scale
        for i, layer in enumerate(vgg.features[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    x = _photos(sample_image_paths, size=48, n=2)
    y = torch.rand_like(x)
    with torch.no_grad():
        expected = torch.zeros(2)
        for w, fx, fy in zip(lins, taps(x), taps(y), strict=True):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            expected += ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="torchvision vgg"):
        ours.load_backbone(_save_alexnet_features(tmp_path))
