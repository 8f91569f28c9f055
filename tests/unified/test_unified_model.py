"""UnifiedMLLM end to end: continuous input layout, understanding, editing, refiner hook, save/load, ILLUME+ layout,
templates and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dualvitok.processor import smart_resize
from dualvitok.unified import UnifiedMLLM, image_grids, nearest_anchor, pad_to_size
from dualvitok.unified.templates import chat_prompt, editing_prompts, text_to_image_prompts


def test_templates_are_the_reference_strings():
    assert chat_prompt("hi") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi"
                                 "<|im_end|>\n<|im_start|>assistant\n")
    tag = "<height_512><width_512>"
    cond, uncond = text_to_image_prompts("a cat with a hat.", tag)
    assert cond == chat_prompt(f"Generate an image of {tag}, the content of image is a cat with a hat.\n") + tag
    assert uncond == chat_prompt(f"Generate a random image of {tag}\n") + tag
    cond, uncond = editing_prompts("make it red", tag)
    assert cond == chat_prompt(f"{tag}<image>\nPlease edit the image according to the instruction: make it red\n") + tag
    assert uncond == chat_prompt(f"{tag}<image>\nReconstruct the image according to the given image\n") + tag


def test_continuous_block_layout_matches_naive_reconstruction(unified):
    """Markers from the LLM embedding; semantic rows = MLP(tower merger output), pixel rows = MLP(encoder output)."""
    images = torch.rand(2, 3, 128, 192) * 2 - 1
    blocks = unified.encode_images(images)
    grids = image_grids(128, 192)
    assert blocks.shape == (2, grids.block_length, unified.language_model.config.hidden_size)
    vq, vocab = unified.vision_tokenizer, unified.vocabulary
    with torch.no_grad():
        tower = vq.semantic_encoder(*vq.semantic_preprocessor(images)).tower_features  # [B, C, hs, ws]
        pixel = vq.pixel_encoder(images)  # before pixel_quant_conv

        def mlp(seq, x):
            return F.linear(F.gelu(F.linear(x, seq[0].weight, seq[0].bias)), seq[2].weight, seq[2].bias)

        sem = mlp(unified.mm_projector.projector_1, tower.flatten(2).transpose(1, 2))
        pix = mlp(unified.mm_projector.projector_2, pixel.flatten(2).transpose(1, 2))
        emb = unified.language_model.get_input_embeddings().weight
    (hs, ws), (h, w) = grids.semantic, grids.pixel
    for b in range(2):
        rows = [emb[vocab.start_of_image], emb[vocab.start_of_level(0)]]
        for r in range(hs):
            rows += list(sem[b, r * ws:(r + 1) * ws]) + [emb[vocab.end_of_line]]
        rows += [emb[vocab.end_of_level(0)], emb[vocab.start_of_level(1)]]
        for r in range(h):
            rows += list(pix[b, r * w:(r + 1) * w]) + [emb[vocab.end_of_line]]
        rows += [emb[vocab.end_of_level(1)], emb[vocab.end_of_image]]
        torch.testing.assert_close(blocks[b], torch.stack(rows), rtol=1e-4, atol=1e-5)


def test_understanding_end_to_end_native_resolution(unified, sample_image_paths):
    path = sample_image_paths[0]
    with Image.open(path) as im:
        size = smart_resize(im.height, im.width, 16, 32 * 32, 768 * 768)
    small = torch.rand(3, 64, 96) * 2 - 1
    prompt = chat_prompt("<image>\n<image>\nDescribe the image.")
    text_tokens = len(unified.tokenizer(prompt.replace("<image>", ""), add_special_tokens=False).input_ids)
    embeds = unified.embed_prompt(prompt, [unified._to_tensor(path, None), small])
    assert embeds.shape[0] == text_tokens + image_grids(*size).block_length + image_grids(64, 96).block_length
    answer = unified.answer("Describe the image.", [path, small], max_new_tokens=12)
    assert isinstance(answer, str)
    again = unified.answer("Describe the image.", [path, small], max_new_tokens=12)
    assert again == answer  # greedy by default
    ids = unified.tokenizer(answer, add_special_tokens=False).input_ids
    assert all(i < unified.vocabulary.first_id for i in ids)  # text only, no image tokens
    with pytest.raises(ValueError, match="placeholders"):
        unified.answer("<image> <image> <image> too many", [small])


def test_editing_end_to_end(unified, sample_image_paths):
    src = Image.open(sample_image_paths[1]).convert("RGB")
    g = torch.Generator().manual_seed(0)
    out = unified.edit_image(src, "make the sky blue", resolution=(128, 192), generator=g)
    assert out.images.shape == (1, 3, 128, 192)
    assert out.semantic_indices.shape == (1, *image_grids(128, 192).semantic)
    restored = out.to_pil()[0]
    assert restored.size == src.size
    assert out.to_pil(restore_size=False)[0].size == (192, 128)
    # default resolution: the nearest anchor
    wide = Image.new("RGB", (640, 480), (10, 200, 30))
    assert nearest_anchor(480, 640) == (384, 512)
    greedy = unified.edit_image(wide, "add a cat", do_sample=False, guidance_scale=1.0, decode=False,
                                resolution=(128, 128))
    assert greedy.images is None and greedy.pixel_indices.shape == (1, 8, 8)


def test_anchor_matching_and_white_padding():
    assert nearest_anchor(512, 512) == (512, 512)
    assert nearest_anchor(1080, 1920) == (384, 768)  # 16:9 -> 2:1 is closer than 4:3
    assert nearest_anchor(300, 1000) == (320, 960)
    canvas, box = pad_to_size(Image.new("RGB", (100, 50), (0, 0, 0)), 128, 128)
    a = torch.from_numpy(np.asarray(canvas).copy())  # [128, 128, 3]
    assert box.width == 128 and box.height == 64 and box.top == 32
    assert (a[:32] == 255).all() and (a[-32:] == 255).all() and (a[40:90] == 0).all()
    from dualvitok.unified import unpad_and_resize

    for scale in (1, 2):  # the refiner returns 2x the canvas
        big = canvas.resize((128 * scale, 128 * scale), Image.NEAREST)
        restored = torch.from_numpy(np.asarray(unpad_and_resize(big, box)).copy())
        assert restored.shape == (50, 100, 3) and (restored == 0).all()


def test_refiner_hook_is_used_by_decode_images(unified):
    calls = []

    def fake_refiner(semantic_indices, pixel_indices, num_inference_steps=50, guidance_scale=2.0, generator=None):
        calls.append((semantic_indices.shape, pixel_indices.shape, num_inference_steps, guidance_scale))
        b, h, w = pixel_indices.shape
        return torch.zeros(b, 3, 32 * h, 32 * w)  # 2x super-resolution, as the reference decoder

    with pytest.raises(ValueError, match="no refiner"):
        unified.decode_images(torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(1, 4, 8, dtype=torch.long), True)
    unified.refiner = fake_refiner
    try:
        out = unified.generate_image("a cat", 64, 128, use_refiner=True, do_sample=False,
                                     refiner_kwargs={"num_inference_steps": 3, "guidance_scale": 1.5})
    finally:
        unified.refiner = None
    assert calls == [(torch.Size([1, 2, 4]), torch.Size([1, 4, 8]), 3, 1.5)]
    assert out.images.shape == (1, 3, 128, 256)


def test_save_and_load_round_trip(unified, tmp_path):
    unified.save_pretrained(tmp_path / "m")
    loaded = UnifiedMLLM.from_pretrained(tmp_path / "m")
    assert loaded.vocabulary == unified.vocabulary and loaded.config == unified.config
    a = unified.generate_image("a tree", 64, 128, do_sample=False, guidance_scale=2.0)
    b = loaded.generate_image("a tree", 64, 128, do_sample=False, guidance_scale=2.0)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.images, b.images)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(unified.encode_images(x), loaded.encode_images(x))
    half = UnifiedMLLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)  # bf16 LLM, float32 vision modules
    assert half.language_model.dtype == torch.bfloat16 and half.encode_images(x).dtype == torch.bfloat16
    out = half.generate_image("a tree", 64, 128, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 64, 128)


def _write_illume_checkpoint(model: UnifiedMLLM, folder):
    """A tiny checkpoint in the ILLUME+ origin layout (reference section 5): one Qwen2 folder whose config says
    illume_qwen2 and whose weights also hold model.vision_tower.* and model.mm_projector.*."""
    from safetensors.torch import save_file

    folder.mkdir()
    lm = model.language_model
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    state.update({f"model.vision_tower.{k}": v.contiguous() for k, v in model.vision_tower.state_dict().items()})
    state.update({f"model.mm_projector.{k}": v.contiguous() for k, v in model.mm_projector.state_dict().items()})
    half = sorted(state)[: len(state) // 2]  # two shards, as released checkpoints are
    save_file({k: state[k] for k in half}, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({k: v for k, v in state.items() if k not in half}, str(folder / "model-00002-of-00002.safetensors"),
              metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if k in half else 2}-of-00002.safetensors"
                                            for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = lm.config.to_dict()
    config.update(model_type="illume_qwen2", architectures=["IllumeQwen2ForCausalLM"],
                  special_tokens_ids=model.vocabulary.marker_ids, mm_hidden_size=[model.config.semantic_dim,
                                                                                  model.config.pixel_dim],
                  mm_projector={"type": "MixedProjector"}, image_aspect_ratio="anyres_dualvitok",
                  mm_vision_tower={"type": "DualVisionTower", "min_pixels": 32 * 32, "max_pixels": 512 * 512})
    (folder / "config.json").write_text(json.dumps(config))
    model.tokenizer.save_pretrained(folder)


def test_load_illume_origin_layout(unified, tmp_path):
    _write_illume_checkpoint(unified, tmp_path / "illume")
    loaded = UnifiedMLLM.from_pretrained(tmp_path / "illume", vision_tokenizer=unified.vision_tokenizer)
    assert loaded.vocabulary == unified.vocabulary
    assert loaded.config.understanding_max_pixels == 512 * 512
    ids = torch.arange(0, 40)[None]
    expected = unified.language_model(input_ids=ids).logits
    torch.testing.assert_close(loaded.language_model(input_ids=ids).logits, expected)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    torch.testing.assert_close(loaded.encode_images(x), unified.encode_images(x))
    bad = json.loads((tmp_path / "illume" / "config.json").read_text())
    bad["special_tokens_ids"] = [1, 2, 3, 4, 5, 6, 7]
    (tmp_path / "illume" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="special_tokens_ids"):
        UnifiedMLLM.from_pretrained(tmp_path / "illume", vision_tokenizer=unified.vision_tokenizer)


def test_command_line_generate_edit_chat(unified, tmp_path, sample_image_paths):
    from dualvitok.cli import main

    model_dir = unified.save_pretrained(tmp_path / "m")
    common = ["--model", str(model_dir), "--device", "cpu"]
    assert main(["generate", "a cat", *common, "--size", "64x128", "--num-images", "2",
                 "--output", str(tmp_path / "g.png")]) == 0
    for i in range(2):
        assert Image.open(tmp_path / f"g_{i}.png").size == (128, 64)
    assert main(["edit", str(sample_image_paths[0]), "make it red", *common, "--size", "64x64",
                 "--output", str(tmp_path / "e.png")]) == 0
    with Image.open(sample_image_paths[0]) as src:
        assert Image.open(tmp_path / "e.png").size == src.size
    assert main(["chat", "What is this?", "--image", str(sample_image_paths[0]), *common,
                 "--max-new-tokens", "5"]) == 0
    assert main(["generate", "x", *common, "--size", "100x100"]) == 1  # clear error, exit code 1


def test_generation_through_the_real_tiny_refiner(unified):
    """Integration with dualvitok.refiner (skipped where that subpackage or diffusers is unavailable)."""
    pytest.importorskip("diffusers")
    refiner_module = pytest.importorskip("dualvitok.refiner")
    refiner = refiner_module.RefinerPipeline.from_architecture(unified.vision_tokenizer, "tiny",
                                                               resolutions=[(256, 128)])
    unified.refiner = refiner
    try:
        out = unified.generate_image("a cat", 64, 128, use_refiner=True, do_sample=False,
                                     refiner_kwargs={"num_inference_steps": 2,
                                                     "generator": torch.Generator().manual_seed(0)})
    finally:
        unified.refiner = None
    assert out.images.shape == (1, 3, 128, 256)  # 2x super-resolution of the 64x128 tokens
    assert torch.isfinite(out.images).all()


def test_cli_without_transformers_names_the_extra():
    """``dualvitok --help`` works without transformers; the unified commands fail with an error naming the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "from dualvitok.cli import main, build_parser\n"
            "assert 'generate' in build_parser().format_help()\n"
            "sys.exit(main(['generate', 'a cat', '--model', 'tiny', '--device', 'cpu']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "pip install 'dualvitok[unified]'" in result.stderr
