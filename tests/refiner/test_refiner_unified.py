"""The unified MLLM wrapper decodes its generated codes through the refiner (tiny random models, offline)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def test_unified_generation_decodes_through_the_refiner():
    from dualvitok.refiner import RefinerPipeline
    from dualvitok.unified.tiny import tiny_unified_model

    model = tiny_unified_model()
    torch.manual_seed(1)
    refiner = RefinerPipeline.from_architecture(model.vision_tokenizer, "tiny", resolutions=[(128, 128)])
    model.refiner = refiner
    out = model.generate_image("a red square", height=64, width=64, use_refiner=True,
                               generator=torch.Generator().manual_seed(0),
                               refiner_kwargs={"num_inference_steps": 2, "guidance_scale": 2.0,
                                               "generator": torch.Generator().manual_seed(5)})
    assert out.pixel_indices.shape == (1, 4, 4)
    assert out.images.shape == (1, 3, 128, 128)  # 2x the 64x64 generated image
    expected = refiner(out.semantic_indices, out.pixel_indices, num_inference_steps=2, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(out.images, expected)
