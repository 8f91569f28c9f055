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


def _write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _tiny_with(section: str | None, key: str, value):
    data = get_config("dualvitok_tiny").to_dict()
    target = data if section is None else data[section]
    for part in key.split(".")[:-1]:
        target = target[part]
    target[key.split(".")[-1]] = value
    return data


@pytest.mark.parametrize("section, key, value, match", [
    ("pixel_quantizer", "codebook_size", 10**12, "about 8,000,0[0-9,]* parameters.*DUALVITOK_MAX_PARAMS"),
    ("pixel_decoder", "num_res_blocks", 10**6, "parameters.*above the limit"),
    ("pixel_quantizer", "codebook_size", "512", r"pixel_quantizer.codebook_size must be an integer, got '512'"),
    ("pixel_encoder", "ch", -32, r"pixel_encoder.ch must be >= 1, got -32"),
    ("pixel_encoder", "ch", 48, r"pixel_encoder.ch_mult\[0\] gives 48 \* 1 = 48 channels"),
    ("semantic_encoder", "num_heads", 0, r"semantic_encoder.num_heads must be >= 1, got 0"),
    ("semantic_encoder", "semantic_encoder_config.num_heads", 0, r"semantic_encoder.semantic_encoder_config.num_heads"),
    ("semantic_decoder", "num_heads", 5, r"semantic_decoder.embed_dim \(64\) must be divisible by 5"),
    ("pixel_encoder", "ch_mult", [1, 0, 2], r"pixel_encoder.ch_mult\[1\] must be >= 1, got 0"),
    ("pixel_encoder", "ch_mult", "1,1,2", r"pixel_encoder.ch_mult must be a list"),
    ("pixel_encoder", "dropout", 1.5, r"pixel_encoder.dropout must be in \[0.0, 1.0\]"),
    ("pixel_encoder", "double_z", 1, r"pixel_encoder.double_z must be true or false"),
    ("semantic_quantizer", "type", "FSQ", r"semantic_quantizer.type must be 'SimVQ' or 'VectorQuantizer'"),
    (None, "pixel_drop_batch_rate", 2, r"pixel_drop_batch_rate must be in \[0.0, 1.0\], got 2"),
    (None, "pixel_encoder", 5, r"pixel_encoder must be an object"),
    (None, "pixel_drop_rate", float("nan"), r"pixel_drop_rate must be finite"),
])
def test_hostile_config_files_name_the_file_and_the_field(tmp_path, section, key, value, match):
    path = _write(tmp_path, _tiny_with(section, key, value))
    with pytest.raises(ValueError, match=match) as info:
        DualViTokConfig.from_json_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, match", [("[1, 2, 3]", r"must be a JSON object.*got \[1, 2, 3\]"),
                                             ('{"semantic_encoder": ', "not a valid JSON config"),
                                             (b"\xff\xfe\x00", "not a valid JSON config"),
                                             ("null", "must be a JSON object")])
def test_corrupt_config_files_give_one_clear_error(tmp_path, content, match):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (DualViTokConfig.from_json_file, DualViTokConfig.from_reference):
        with pytest.raises(ValueError, match=match) as info:
            load(path)
        assert str(path) in str(info.value)


def test_reference_config_with_a_mistyped_field_names_it(tmp_path, conformance_dir):
    data = json.loads((conformance_dir / "reference_config.json").read_text())
    data["pixel_encoder"]["num_res_blocks"] = "1"
    path = _write(tmp_path, data, "reference_config.json")
    with pytest.raises(ValueError, match=r"pixel_encoder.num_res_blocks must be an integer.*reference_config.json"):
        DualViTokConfig.from_reference(path)


def test_direct_construction_is_checked_too():
    from dualvitok.configuration import MoVQConfig, QuantizerConfig

    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        QuantizerConfig(codebook_size=0)
    with pytest.raises(ValueError, match="num_res_blocks must be an integer"):
        MoVQConfig(num_res_blocks=2.5)
    assert MoVQConfig(ch_mult=[1, 2]).ch_mult == (1, 2)  # lists become tuples


def test_parameter_limit_can_be_overridden(monkeypatch):
    data = _tiny_with("pixel_quantizer", "codebook_size", 2 * 10**9)
    with pytest.raises(ValueError, match="above the limit of 10,000,000,000"):
        DualViTokConfig.from_dict(data)
    monkeypatch.setenv("DUALVITOK_MAX_PARAMS", "1e11")
    assert DualViTokConfig.from_dict(data).pixel_quantizer.codebook_size == 2 * 10**9  # only the config, nothing built
    monkeypatch.setenv("DUALVITOK_MAX_PARAMS", "1000")
    with pytest.raises(ValueError, match="above the limit of 1,000"):
        get_config("dualvitok_tiny")


def _real_count(config) -> int:
    import torch

    from dualvitok import DualViTok

    with torch.device("meta"):
        model = DualViTok(config)
    return sum(t.numel() for t in model.state_dict().values())


def test_parameter_estimate_is_close_to_the_real_count(conformance_dir):
    configs = [get_config("dualvitok_tiny"), get_config("dualvitok_anyres_max512"),
               DualViTokConfig.from_reference(conformance_dir / "reference_config.json")]
    for config in configs:
        real, estimate = _real_count(config), config.estimate_num_parameters()
        assert 0.97 * real <= estimate <= 1.01 * real, (real, estimate)


def test_weights_size_check(conformance_dir):
    weights = conformance_dir / "reference_state_dict.safetensors"
    DualViTokConfig.from_reference(conformance_dir / "reference_config.json").check_weights_size(
        weights.stat().st_size, weights)
    with pytest.raises(ValueError, match="far too small.*does not describe these weights"):
        DualViTokConfig().check_weights_size(weights.stat().st_size, weights)  # the released architecture
