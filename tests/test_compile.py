"""The index paths trace: ``torch.compile(fullgraph=True)``, ``torch.export`` (static and dynamic batch) and ONNX.

Every traced function is compared with eager mode on the same inputs. The default run traces the quantizers and
``decode_indices`` with Dynamo only (``backend="eager"``: a graph break or host synchronisation fails
``fullgraph=True`` just the same, without the minutes of C++ code generation) and exports the quantizers; the
``slow`` tests trace ``encode``, compile with Inductor and export the model's index paths (and to ONNX).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from dualvitok import create_model
from dualvitok.quantizers import SimVQ, VectorQuantizer


class EncodeIndices(nn.Module):
    """``images [B,3,H,W]`` -> ``(semantic_indices, pixel_indices, semantic_codes, pixel_codes)`` (export wrapper)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        enc = self.model.encode(images)
        return enc.semantic_indices, enc.pixel_indices, enc.semantic_codes, enc.pixel_codes


class DecodeIndices(nn.Module):
    """``(semantic_indices, pixel_indices)`` -> images (export wrapper)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, semantic_indices, pixel_indices):
        return self.model.decode_indices(semantic_indices, pixel_indices)


class Decode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, semantic_codes, pixel_codes):
        return self.model.decode(semantic_codes, pixel_codes)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dualvitok_tiny").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64) * 2 - 1


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _quantizers():
    torch.manual_seed(0)
    simvq = SimVQ(dim=8, codebook_size=300).eval()
    vq = VectorQuantizer(dim=8, codebook_size=300, l2_normalize=True).eval()
    return {"simvq": simvq, "vq": vq}


@pytest.mark.parametrize("kind", ["simvq", "vq"])
def test_quantizer_forward_compiles_fullgraph_and_exports_with_dynamic_batch(kind):
    quantizer = _quantizers()[kind]
    x2, x3 = torch.randn(2, 8, 5, 6), torch.randn(3, 8, 5, 6)
    with torch.no_grad():
        eager2, eager3 = quantizer(x2), quantizer(x3)
        compiled = torch.compile(quantizer, fullgraph=True, backend="eager")(x2)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(quantizer, (x2,), dynamic_shapes={"x": {0: batch}}).module()
        for eager, x in ((eager2, x2), (eager3, x3)):
            got = exported(x)
            assert torch.equal(got.indices, eager.indices)
            torch.testing.assert_close(got.quantized, eager.quantized, atol=1e-6, rtol=0)
            torch.testing.assert_close(got.loss, eager.loss)
    assert torch.equal(compiled.indices, eager2.indices)
    torch.testing.assert_close(compiled.quantized, eager2.quantized, atol=1e-6, rtol=0)


def test_decode_indices_traces_fullgraph(model, images):
    with torch.no_grad():
        enc = model.encode(images)
        expected = model.decode_indices(enc.semantic_indices, enc.pixel_indices)
        got = torch.compile(model.decode_indices, fullgraph=True, backend="eager")(enc.semantic_indices,
                                                                                  enc.pixel_indices)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_encode_traces_fullgraph(model, images):
    with torch.no_grad():
        expected = model.encode(images)
        got = torch.compile(model.encode, fullgraph=True, backend="eager")(images)
    assert torch.equal(got.semantic_indices, expected.semantic_indices)
    assert torch.equal(got.pixel_indices, expected.pixel_indices)
    assert torch.equal(got.semantic_grid_thw, expected.semantic_grid_thw)
    torch.testing.assert_close(got.pixel_codes, expected.pixel_codes, atol=1e-6, rtol=0)


def test_eager_checks_still_raise(model, images):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode(images * 10)
    bad = torch.full((2, 2, 2), 10**6, dtype=torch.long)
    with pytest.raises(ValueError, match="out of range"):
        model.decode_indices(bad, torch.zeros(2, 4, 4, dtype=torch.long))


@pytest.mark.slow
def test_inductor_compiled_index_paths_equal_eager(model, images):
    with torch.no_grad():
        expected = model.encode(images)
        enc = torch.compile(model.encode, fullgraph=True)(images)
        assert torch.equal(enc.semantic_indices, expected.semantic_indices)
        assert torch.equal(enc.pixel_indices, expected.pixel_indices)
        torch.testing.assert_close(enc.semantic_codes, expected.semantic_codes, atol=1e-5, rtol=0)
        reference = model.decode_indices(expected.semantic_indices, expected.pixel_indices)
        got = torch.compile(model.decode_indices, fullgraph=True)(expected.semantic_indices, expected.pixel_indices)
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)  # decode_indices = lookup + decode


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_export_index_paths_equal_eager(model, images, dynamic):
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        enc = model.encode(images)
        ds = {"images": {0: batch}} if dynamic else None
        encoder = torch.export.export(EncodeIndices(model).eval(), (images,), dynamic_shapes=ds).module()
        ds = {"semantic_indices": {0: batch}, "pixel_indices": {0: batch}} if dynamic else None
        decoder = torch.export.export(DecodeIndices(model).eval(), (enc.semantic_indices, enc.pixel_indices),
                                      dynamic_shapes=ds).module()
        ds = {"semantic_codes": {0: batch}, "pixel_codes": {0: batch}} if dynamic else None
        decode = torch.export.export(Decode(model).eval(), (enc.semantic_codes, enc.pixel_codes),
                                     dynamic_shapes=ds).module()
        inputs = [images, torch.rand(3, 3, 64, 64) * 2 - 1] if dynamic else [images]
        for x in inputs:
            expected = model.encode(x)
            sem, pix, sem_codes, pix_codes = encoder(x)
            assert torch.equal(sem, expected.semantic_indices) and torch.equal(pix, expected.pixel_indices)
            torch.testing.assert_close(pix_codes, expected.pixel_codes, atol=1e-6, rtol=0)
            reference = model.decode_indices(sem, pix)
            torch.testing.assert_close(decoder(sem, pix), reference, atol=1e-5, rtol=0)
            torch.testing.assert_close(decode(sem_codes, pix_codes), reference, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="ONNX export needs the onnx extra: pip install 'dualvitok[onnx]'")
def test_onnx_export_of_the_decoder_from_indices(model, images, tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    with torch.no_grad():
        enc = model.encode(images[:1])
        expected = model.decode_indices(enc.semantic_indices, enc.pixel_indices)
        program = torch.onnx.export(DecodeIndices(model).eval(), (enc.semantic_indices, enc.pixel_indices), dynamo=True,
                                    input_names=["semantic_indices", "pixel_indices"], output_names=["images"])
    path = tmp_path / "decoder.onnx"
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    got = ReferenceEvaluator(proto).run(None, {"semantic_indices": enc.semantic_indices.numpy(),
                                               "pixel_indices": enc.pixel_indices.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)
