"""DualViTokConfig: JSON round trip, strict keys, cross-field validation, reference conversion."""

from __future__ import annotations

import json
import logging

import pytest

from dualvitok import DualViTokConfig, get_config


def test_json_round_trip_keeps_nested_values(tmp_path):
    config = get_config("dualvitok_tiny")
    path = tmp_path / "config.json"
    config.to_json_file(path)
    loaded = DualViTokConfig.from_json_file(path)
    assert loaded == config
    assert isinstance(loaded.pixel_encoder.ch_mult, tuple)
    assert loaded.semantic_encoder.semantic_encoder_config.hidden_size == 96
    assert json.loads(path.read_text())["model_type"] == "dualvitok"
    assert not list(tmp_path.glob("*.tmp*"))


def test_unknown_keys_raise_in_strict_mode():
    data = get_config("dualvitok_tiny").to_dict()
    data["pixel_encoder"]["chanels"] = 3
    with pytest.raises(ValueError, match=r"unknown config keys at pixel_encoder.*chanels"):
        DualViTokConfig.from_dict(data)


def test_cross_field_validation():
    data = get_config("dualvitok_tiny").to_dict()
    data["pixel_decoder"]["embed_dim"] = 12
    with pytest.raises(ValueError, match="semantic \\+ pixel code dims"):
        DualViTokConfig.from_dict(data)
    with pytest.raises(ValueError, match="pixel_noise_type"):
        DualViTokConfig(pixel_noise_type="gaussian")
    with pytest.raises(ValueError, match="newer than this library"):
        DualViTokConfig(config_version=99)


def test_reference_config_conversion(conformance_dir, caplog):
    data = json.loads((conformance_dir / "reference_config.json").read_text())
    data["infer_interpolate"] = False
    with caplog.at_level(logging.WARNING):
        config = DualViTokConfig.from_reference({"vq_model": data})
    assert "infer_interpolate" in caplog.text
    tower = data["semantic_encoder"]["semantic_encoder_config"]
    assert config.semantic_encoder.semantic_encoder_config.depth == tower["depth"]
    assert config.semantic_encoder.semantic_encoder_config.hidden_size == tower["hidden_size"]
    assert config.pixel_decoder.z_channels == data["pixel_decoder"]["z_channels"]
    assert config.pixel_drop_rate is None
    assert config.to_dict()["pixel_encoder"]["ch_mult"] == data["pixel_encoder"]["ch_mult"]
    assert config.to_dict()["pixel_decoder"]["ch_mult"] == data["pixel_decoder"]["ch_mult"]


def test_released_defaults():
    config = DualViTokConfig()
    assert config.semantic_quantizer.codebook_size == 32768 and config.pixel_quantizer.codebook_size == 98304
    assert config.pixel_decoder.ch == 384 and config.pixel_encoder.ch == 128
    assert config.pixel_downsample_factor == 16
