"""The pluggable timm semantic tower (random weights; nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualvitok import DualViTok, DualViTokConfig
from dualvitok.registry import get_config

timm = pytest.importorskip("timm")


def timm_config(name: str = "vit_tiny_patch16_224", width: int = 192) -> DualViTokConfig:
    data = get_config("dualvitok_tiny").to_dict()
    data["semantic_encoder"]["timm_model"] = name
    data["semantic_encoder"]["semantic_encoder_config"]["hidden_size"] = width
    data["semantic_decoder"]["output_channels"] = width
    return DualViTokConfig.from_dict(data)


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(0)
    return DualViTok(timm_config())


def test_patches_are_reassembled_into_the_normalised_image(timm_model):
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    pixel_values, grid = timm_model.semantic_preprocessor(images)
    tower = timm_model.semantic_encoder.model
    got = tower.images_from_patches(pixel_values, grid)
    x01 = F.interpolate((images + 1) / 2, size=(56, 84), mode="bicubic", align_corners=False, antialias=True)
    x01 = x01.clamp(0, 1)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (x01 - mean) / std, rtol=1e-5, atol=1e-5)
    cfg = timm.data.resolve_model_data_config(tower.model)
    renorm = got * tower.scale + tower.shift
    expected = (x01 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(renorm, expected, rtol=1e-5, atol=1e-5)


def test_timm_tower_model_forward_train_and_reload(timm_model, tmp_path):
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    out = timm_model.train()(images)
    assert out.encoding.semantic_indices.shape == (2, 2, 3)  # 56x84 semantic input / 28
    assert out.semantic_reconstruction.shape == (2, 192, 2, 3) and out.encoding.semantic_target.shape == (2, 192, 2, 3)
    assert out.reconstruction.shape == images.shape
    tower = timm_model.semantic_encoder.model
    assert not any(p.requires_grad for p in tower.parameters())  # frozen
    (out.reconstruction.mean() + out.semantic_reconstruction.mean()).backward()
    assert timm_model.semantic_encoder.proj_in.weight.grad is not None
    timm_model.eval()
    timm_model.save_pretrained(tmp_path)
    loaded = DualViTok.from_pretrained(tmp_path)
    assert loaded.config.semantic_encoder.timm_model == "vit_tiny_patch16_224"
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).reconstruction, timm_model(images).reconstruction)


def test_width_mismatch_is_explained():
    data = timm_config().to_dict()
    data["semantic_encoder"]["semantic_encoder_config"]["hidden_size"] = 96
    data["semantic_decoder"]["output_channels"] = 96
    with pytest.raises(ValueError, match="hidden_size"):
        DualViTok(DualViTokConfig.from_dict(data))


def test_default_tower_is_unchanged():
    config = get_config("dualvitok_tiny")
    assert config.semantic_encoder.timm_model is None
    from dualvitok.blocks.qwen2_vit import Qwen2VisionTower

    assert isinstance(DualViTok(config).semantic_encoder.model, Qwen2VisionTower)


def test_training_config_nested_overrides_select_the_tower():
    from dualvitok.timm_tower import TimmVisionTower
    from dualvitok.training import TrainConfig, build_model

    cfg = TrainConfig.from_dict({"model": {"name": "dualvitok_tiny", "overrides": {
        "semantic_encoder": {"timm_model": "vit_tiny_patch16_224", "semantic_encoder_config": {"hidden_size": 192}},
        "semantic_decoder": {"output_channels": 192}}}})
    model = build_model(cfg)
    assert isinstance(model.semantic_encoder.model, TimmVisionTower)
    assert model.config.semantic_encoder.num_blocks == 2  # the rest of dualvitok_tiny is kept
    bad = TrainConfig.from_dict({"model": {"name": "dualvitok_tiny", "overrides": {"semantic_encoder": {"nope": 1}}}})
    with pytest.raises(ValueError, match="'semantic_encoder.nope'"):
        build_model(bad)
