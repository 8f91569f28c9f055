"""DualViTok.from_reference reproduces the reference implementation's tensors.

Each test runs on both conformance sets (``conformance_dir`` in conftest.py): the compact one shipped in
``tests/data/conformance`` (made by ``tests/data/make_fixtures.py``) and, when present, the full
``../shared/conformance`` one.

Every float tensor within 1e-4 (max abs), indices equal wherever the reference's best-vs-second-best distance margin
is above 1e-4. The comparison is generic over the cases listed in cases.json.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from dualvitok import DualViTok

ATOL = 1e-4
MARGIN = 1e-4


def _cases(conformance_dir):
    return json.loads((conformance_dir / "cases.json").read_text())


@pytest.fixture(scope="module")
def outputs(reference_model, conformance_dir, device):
    """Our tensors for every case, computed on the matrix ``device`` (TF32 off on CUDA), compared on the CPU."""
    results = {}
    if device.type != "cpu":
        reference_model = copy.deepcopy(reference_model).to(device)
    for case in _cases(conformance_dir):
        ref = load_file(conformance_dir / case["file"])
        inputs = {k: ref[k].to(device) for k in ("image", "semantic_indices", "pixel_indices")}
        with torch.no_grad():
            enc = reference_model.encode(inputs["image"])
            merged = reference_model.merge_codes(enc.semantic_codes, enc.pixel_codes)
            ours = {
                "semantic_pixel_values": enc.semantic_pixel_values,
                "semantic_grid_thw": enc.semantic_grid_thw,
                "semantic_target": enc.semantic_target,
                "semantic_z": enc.semantic_features,
                "semantic_quantized": enc.semantic_codes,
                "semantic_indices": enc.semantic_indices,
                "semantic_quantizer_loss": enc.semantic_loss,
                "pixel_z": enc.pixel_features,
                "pixel_quantized": enc.pixel_codes,
                "pixel_indices": enc.pixel_indices,
                "pixel_quantizer_loss": enc.pixel_loss,
                "merged_codes": merged,
                "reconstruction": reference_model.decode(enc.semantic_codes, enc.pixel_codes),
                "reconstruction_from_indices": reference_model.decode_indices(inputs["semantic_indices"],
                                                                              inputs["pixel_indices"]),
                "semantic_reconstruction": reference_model.decode_semantic(enc.semantic_codes),
            }
        results[case["file"]] = (ref, {k: v.cpu() for k, v in ours.items()})
    return results


def test_cases_present(conformance_dir):
    cases = _cases(conformance_dir)
    assert len(cases) >= 2
    for case in cases:
        assert (conformance_dir / case["file"]).is_file(), case["file"]


def test_every_reference_tensor_is_compared(outputs):
    for name, (ref, ours) in outputs.items():
        not_compared = set(ref) - set(ours) - {"image", "semantic_indices_margin", "pixel_indices_margin"}
        assert not not_compared, f"{name}: reference tensors without a comparison: {not_compared}"


def test_float_tensors_match(outputs):
    for name, (ref, ours) in outputs.items():
        for key, expected in ref.items():
            if key not in ours or not expected.is_floating_point() or key.endswith("_margin") or key == "image":
                continue
            got = ours[key].float().reshape(expected.shape)
            diff = (got - expected).abs().max().item()
            assert diff <= ATOL, f"{name}:{key} max abs diff {diff:.3g} > {ATOL}"


def test_indices_match_outside_near_ties(outputs):
    for name, (ref, ours) in outputs.items():
        for level in ("semantic", "pixel"):
            expected = ref[f"{level}_indices"]
            got = ours[f"{level}_indices"]
            assert got.dtype == torch.int64 and got.shape == expected.shape, (name, level, got.shape)
            decisive = ref[f"{level}_indices_margin"] > MARGIN
            assert decisive.float().mean() > 0.5, "conformance margins look wrong"
            mismatched = int(((got != expected) & decisive).sum())
            assert mismatched == 0, f"{name}:{level}: {mismatched} indices differ where the margin is > {MARGIN}"


def test_grid_thw_matches(outputs):
    for name, (ref, ours) in outputs.items():
        assert torch.equal(ours["semantic_grid_thw"].long(), ref["semantic_grid_thw"].long()), name


def test_from_reference_accepts_state_dict_and_dict_config(conformance_dir, reference_model):
    config = json.loads((conformance_dir / "reference_config.json").read_text())
    weights = load_file(conformance_dir / "reference_state_dict.safetensors")
    model = DualViTok.from_reference(config, {"model": weights})
    for (k, a), b in zip(model.state_dict().items(), reference_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
