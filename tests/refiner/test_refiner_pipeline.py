"""Refiner pipeline: output size, CFG, supported sizes, conditioning and save/load (tiny offline components)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from dualvitok import create_model  # noqa: E402
from dualvitok.refiner import REFERENCE_RESOLUTIONS, RefinerPipeline, resolution_index, time_ids  # noqa: E402

TINY_RESOLUTIONS = [(64, 64), (128, 64), (64, 128)]  # (width, height): outputs for 32x32, 32x64, 64x32 token images


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return create_model("dualvitok_tiny").eval()


@pytest.fixture(scope="module")
def refiner(tokenizer):
    torch.manual_seed(1)
    return RefinerPipeline.from_architecture(tokenizer, "tiny", resolutions=TINY_RESOLUTIONS)


def _tokens(tokenizer, height, width, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g) * 2 - 1
    with torch.no_grad():
        return tokenizer.encode_indices(images)


def _naive_decode(refiner, tokenizer, sem, pix, steps, scale, seed):
    """Independent re-implementation of the reference denoising loop with the raw diffusers components."""
    unet, vae = refiner.unet, refiner.vae
    scheduler = type(refiner.scheduler).from_config(refiner.scheduler.config)
    sem_codes = tokenizer.semantic_quantizer.indices_to_codes(sem)
    pix_codes = tokenizer.pixel_quantizer.indices_to_codes(pix)
    merged = torch.cat([F.interpolate(sem_codes, size=pix_codes.shape[-2:], mode="bicubic"), pix_codes], 1)
    b, _, h, w = pix_codes.shape
    out_h, out_w = 32 * h, 32 * w
    index = [f"({a}, {c})" for a, c in TINY_RESOLUTIONS].index(f"({out_w}, {out_h})")
    lat_h, lat_w = out_h // 8, out_w // 8
    latents = torch.randn(b, 4, lat_h, lat_w, generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    cond = F.interpolate(merged, size=(lat_h, lat_w))  # nearest
    feats = torch.cat([torch.zeros_like(cond), cond]) if scale > 1 else cond
    n = feats.shape[0]
    ehs = torch.zeros(n, 77, unet.config.cross_attention_dim)
    pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.zeros(n, pooled),
             "time_ids": torch.tensor([[0, 0, 0, 0, 0, index]], dtype=torch.float32).repeat(n, 1)}
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if scale > 1 else latents
        x = scheduler.scale_model_input(x, t)
        eps = unet(torch.cat([x, feats], 1), t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        if scale > 1:
            u, c = eps.chunk(2)
            eps = u + scale * (c - u)
        latents = scheduler.step(eps, t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


@pytest.mark.parametrize("height,width", [(32, 32), (32, 64), (64, 32)])
def test_output_is_twice_the_token_image(refiner, tokenizer, height, width):
    sem, pix = _tokens(tokenizer, height, width)
    images = refiner(sem, pix, num_inference_steps=1, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                     progress=False)
    assert images.shape == (2, 3, 2 * height, 2 * width)
    assert images.dtype == torch.float32 and float(images.abs().max()) <= 1.0


def test_guidance_one_is_conditional_only(refiner, tokenizer):
    sem, pix = _tokens(tokenizer, 32, 64)
    with torch.no_grad():
        ours = refiner(sem, pix, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(7),
                       progress=False)
        naive = _naive_decode(refiner, tokenizer, sem, pix, steps=2, scale=1.0, seed=7)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)


def test_cfg_matches_naive_loop_and_differs_from_conditional(refiner, tokenizer):
    sem, pix = _tokens(tokenizer, 32, 32, batch=1)
    with torch.no_grad():
        ours = refiner(sem, pix, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3),
                       progress=False)
        naive = _naive_decode(refiner, tokenizer, sem, pix, steps=2, scale=3.0, seed=3)
        conditional = refiner(sem, pix, num_inference_steps=2, guidance_scale=1.0,
                              generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, conditional, atol=1e-4)


def test_unsupported_sizes_are_refused(refiner, tokenizer):
    sem, pix = _tokens(tokenizer, 48, 48, batch=1)
    with pytest.raises(ValueError) as err:
        refiner(sem, pix, num_inference_steps=1, progress=False)
    message = str(err.value)
    assert "96x96" in message and "64x64" in message and "128x64" in message


def test_default_sizes_are_the_reference_list(tokenizer):
    reference = ["(1024, 1024)", "(768, 1024)", "(1024, 768)", "(512, 2048)", "(2048, 512)", "(640, 1920)",
                 "(1920, 640)", "(768, 1536)", "(1536, 768)", "(768, 1152)", "(1152, 768)", "(512, 512)"]
    assert [f"({w}, {h})" for w, h in REFERENCE_RESOLUTIONS] == reference
    for i, item in enumerate(reference):
        w, h = (int(v) for v in item.strip("()").split(", "))
        assert resolution_index(h, w) == i
    with pytest.raises(ValueError, match="1024x1024.*512x512"):
        resolution_index(64, 64)
    refiner = RefinerPipeline.from_architecture(tokenizer, "tiny")  # default list: the tiny token images are refused
    sem, pix = _tokens(tokenizer, 32, 32, batch=1)
    with pytest.raises(ValueError, match="cannot produce 64x64"):
        refiner(sem, pix, num_inference_steps=1, progress=False)


def test_bad_inputs_get_clear_errors(refiner, tokenizer):
    sem, pix = _tokens(tokenizer, 32, 32, batch=1)
    with pytest.raises(ValueError, match="integer tensor"):
        refiner(sem.float(), pix, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        refiner(sem, pix + 10_000, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="in_channels"):
        import diffusers

        from dualvitok.refiner.configs import tiny_unet_config

        RefinerPipeline(diffusers.UNet2DConditionModel(**tiny_unet_config(code_channels=64)), refiner.vae,
                        refiner.scheduler, tokenizer)


def test_time_ids_and_feature_grid():
    ids = time_ids(5, 3)
    assert ids.tolist() == [[0, 0, 0, 0, 0, 5]] * 3
    from dualvitok.refiner import to_latent_grid

    x = torch.randn(1, 2, 3, 4)
    up = to_latent_grid(x, (12, 16))
    torch.testing.assert_close(up, x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3), atol=0, rtol=0)


def test_save_load_round_trip(refiner, tokenizer, tmp_path):
    refiner.save_pretrained(tmp_path)
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (tmp_path / name).is_file(), name
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    refiner.save_pretrained(tmp_path)  # overwriting an existing folder works and leaves no temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_index.json", "scheduler", "unet", "vae"]
    loaded = RefinerPipeline.from_pretrained(tmp_path, tokenizer)
    assert loaded.resolutions == refiner.resolutions
    sem, pix = _tokens(tokenizer, 64, 32)
    a = refiner(sem, pix, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                progress=False)
    b = loaded(sem, pix, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               progress=False)
    assert torch.equal(a, b)


def test_missing_folder_is_reported(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="unet"):
        RefinerPipeline.from_pretrained(tmp_path, tokenizer)


def test_tokenizer_is_left_untouched(refiner, tokenizer):
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    sem, pix = _tokens(tokenizer, 32, 32, batch=1)
    refiner(sem, pix, num_inference_steps=1, progress=False)
    assert not tokenizer.training
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in tokenizer.state_dict().items())


def test_released_layout_on_meta_device():
    """The SDXL layout for the released tokenizer: 68 input channels, SDXL text/time embedding dims (no memory)."""
    import diffusers

    from dualvitok.refiner.conditioning import unet_conditioning_dims
    from dualvitok.refiner.configs import sdxl_scheduler_config, sdxl_unet_config, sdxl_vae_config

    released = create_model("dualvitok_anyres_max512", device="meta")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**sdxl_unet_config(code_channels=64))
        vae = diffusers.AutoencoderKL(**sdxl_vae_config())
    scheduler = diffusers.EulerDiscreteScheduler(**sdxl_scheduler_config())
    refiner = RefinerPipeline(unet, vae, scheduler, released)
    assert refiner.unet.config.in_channels == 68 and refiner.code_channels == 64
    assert unet_conditioning_dims(refiner.unet) == (2048, 1280)
    assert refiner.unet.add_embedding.linear_1.in_features == 6 * 256 + 1280
    assert refiner.vae_scale_factor == 8
    assert refiner.resolutions == REFERENCE_RESOLUTIONS
    assert refiner.output_size((32, 32)) == (1024, 1024)  # tokens of a 512x512 image
    assert refiner.check_output_size(1024, 1024) == 0 and refiner.check_output_size(512, 512) == 11
