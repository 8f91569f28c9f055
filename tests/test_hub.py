"""save_pretrained / from_pretrained round trips, reference-layout folders, readable errors, offline behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dualvitok import DualViTok, create_model
from dualvitok.convert import to_reference_state_dict
from dualvitok.hub import LoadingError


@pytest.fixture
def image():
    torch.manual_seed(1)
    return torch.rand(1, 3, 64, 64) * 2 - 1


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path, image):
    tiny_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = DualViTok.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny_model.config
    with torch.no_grad():
        assert torch.equal(loaded(image).reconstruction, tiny_model(image).reconstruction)


def test_strict_loading_reports_missing_and_unexpected_keys(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop("pixel_quant_conv.bias")
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(LoadingError) as err:
        DualViTok.from_pretrained(tmp_path / "m")
    text = str(err.value)
    assert "1 missing keys: pixel_quant_conv.bias" in text and "1 unexpected keys: extra.weight" in text
    partial = DualViTok.from_pretrained(tmp_path / "m", strict=False)
    assert isinstance(partial, DualViTok)


def test_shape_mismatch_is_reported_even_when_not_strict(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["pixel_quant_conv.bias"] = torch.zeros(3)
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(LoadingError, match=r"pixel_quant_conv.bias \(checkpoint \(3,\), model \(8,\)\)"):
        DualViTok.from_pretrained(tmp_path / "m", strict=False)


@pytest.mark.parametrize("wrapper", ["model", "ema", None])
def test_reference_layout_folder_is_converted(tiny_model, tmp_path, image, wrapper):
    folder = tmp_path / "ref"
    folder.mkdir()
    reference = to_reference_state_dict(tiny_model.state_dict())
    assert reference["semantic_encoder.proj_in.weight"].ndim == 4
    payload = reference if wrapper is None else {wrapper: reference, "steps": 10}
    torch.save(payload, folder / "pytorch_model.bin")
    ref_config = tiny_model.config.to_dict()
    ref_config.pop("config_version")
    (folder / "config.json").write_text(json.dumps({"vq_model": ref_config}))
    loaded = DualViTok.from_pretrained(folder, use_ema=wrapper == "ema")
    with torch.no_grad():
        assert torch.equal(loaded(image).reconstruction, tiny_model(image).reconstruction)


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"model": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        DualViTok.from_pretrained(folder)


def test_missing_model_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError, match="hf download someone/not-cached-dualvitok --local-dir DIR"):
        DualViTok.from_pretrained("someone/not-cached-dualvitok", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        DualViTok.from_pretrained(tmp_path / "missing" / "dir")


def test_dtype_and_bf16_weights(tiny_model, tmp_path, image):
    tiny_model.save_pretrained(tmp_path / "m")
    model = DualViTok.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert next(model.pixel_decoder.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        out = model(image)  # every stage computes in bf16; the quantizers search in float32
    assert out.reconstruction.dtype == torch.float32 and out.reconstruction.shape == image.shape


def test_push_to_hub_uploads_the_saved_files(tiny_model, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            import os

            calls["files"] = sorted(os.listdir(folder_path))
            return "https://huggingface.co/x/y/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tiny_model.push_to_hub("x/y", token="t")
    assert calls == {"token": "t", "repo": "x/y", "files": ["README.md", "config.json", "model.safetensors"]}
    assert url.endswith("/commit/1")


def test_create_model_overrides():
    model = create_model("dualvitok_tiny", pixel_drop_rate=0.2)
    assert model.config.pixel_drop_rate == 0.2
    with pytest.raises(ValueError, match="unknown config field"):
        create_model("dualvitok_tiny", not_a_field=1)
