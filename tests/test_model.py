"""DualViTok composition: shapes, released layout, gradients and input validation."""

from __future__ import annotations

import pytest
import torch

from dualvitok import DualViTok, create_model, list_models
from dualvitok.convert import to_reference_state_dict
from dualvitok.semantic import semantic_grid_size


def _reference_listing(reference_dir):
    entries = {}
    for line in (reference_dir / "dualvitok_state_dict.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, rest = line.split(" ", 1)
        shape = tuple(int(v) for v in rest.rsplit(" ", 1)[0].strip("() ").split(",") if v.strip())
        entries[name] = shape
    return entries


@pytest.fixture(scope="module")
def released_meta():
    return create_model("dualvitok_anyres_max512", device="meta")


def test_released_state_dict_equals_reference_listing(released_meta, reference_dir):
    expected = _reference_listing(reference_dir)
    assert len(expected) == 999
    ours = {k: tuple(v.shape) for k, v in to_reference_state_dict(released_meta.state_dict()).items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    mismatched = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert mismatched == {}


def test_released_parameter_counts(released_meta):
    params = sum(p.numel() for p in released_meta.parameters())
    trainable = sum(p.numel() for p in released_meta.parameters() if p.requires_grad)
    total = sum(t.numel() for t in released_meta.state_dict().values())
    assert (params, trainable, total) == (1_345_978_979, 670_219_875, 1_350_173_283)


def test_registry_lists_models():
    names = list_models()
    assert {"dualvitok_anyres_max512", "dualvitok_fix256", "dualvitok_tiny"} <= set(names)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope")


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (320, 448), (64, 96)])
def test_encode_decode_shapes(tiny_model_on, device, size):
    h, w = size
    x = (torch.rand(2, 3, h, w) * 2 - 1).to(device)
    with torch.no_grad():
        out = tiny_model_on(x)
    enc = out.encoding
    hs, ws = semantic_grid_size(h, w)
    assert enc.semantic_indices.shape == (2, hs, ws) and enc.semantic_indices.dtype == torch.int64
    assert enc.pixel_indices.shape == (2, h // 16, w // 16)
    assert enc.semantic_codes.shape == (2, 8, hs, ws) and enc.pixel_codes.shape == (2, 8, h // 16, w // 16)
    assert enc.semantic_target.shape == (2, 96, hs, ws)
    assert out.reconstruction.shape == (2, 3, h, w)
    assert out.semantic_reconstruction.shape == (2, 96, hs, ws)
    assert enc.semantic_loss.ndim == 0 and enc.pixel_loss.ndim == 0
    assert tiny_model_on.grid_sizes(h, w) == ((hs, ws), (h // 16, w // 16))
    assert out.reconstruction.device.type == device.type and enc.pixel_indices.device.type == device.type


def test_decode_indices_equals_decode_of_codes(tiny_model_on, device):
    x = (torch.rand(1, 3, 64, 64) * 2 - 1).to(device)
    with torch.no_grad():
        enc = tiny_model_on.encode(x)
        a = tiny_model_on.decode(enc.semantic_codes, enc.pixel_codes)
        b = tiny_model_on.decode_indices(enc.semantic_indices, enc.pixel_indices)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_plain_decoder_convolutions_see_their_weights_layout(tiny_model):
    """Codes from the quantizers are contiguous, so no convolution of the float32 decoder gets a channels_last input
    (PyTorch would then copy its weight to channels_last on every call: 8% of the released decoder's time)."""
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous()))
             for m in tiny_model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            enc = tiny_model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
            tiny_model.decode_indices(enc.semantic_indices, enc.pixel_indices)
            tiny_model.decode(enc.semantic_codes, enc.pixel_codes)
            cl = torch.channels_last  # codes a caller built as movedim views: the decoder takes them to its layout
            tiny_model.decode(enc.semantic_codes.contiguous(memory_format=cl),
                              enc.pixel_codes.contiguous(memory_format=cl))
    finally:
        for h in hooks:
            h.remove()
    assert len(layouts) > 20 and all(layouts)


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = create_model("dualvitok_tiny").train()
    out = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    cos = torch.nn.functional.cosine_similarity(out.semantic_reconstruction, out.semantic_target, dim=1)
    loss = out.reconstruction.pow(2).mean() + out.semantic_loss + out.pixel_loss + (1 - cos).mean()
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []
    tower = list(model.semantic_encoder.model.named_parameters())
    assert tower and all(not p.requires_grad and p.grad is None for _, p in tower)
    assert all(
        not b.requires_grad for b in (model.semantic_quantizer.frozen_codebook, model.pixel_quantizer.frozen_codebook)
    )


def test_eval_is_deterministic(tiny_model):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = tiny_model(x), tiny_model(x)
    assert torch.equal(a.reconstruction, b.reconstruction)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.rand(3, 64, 64), "batch dimension"),
        (lambda: torch.rand(1, 3, 60, 64), "multiples of 16"),
        (lambda: torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "float"),
        (lambda: torch.rand(1, 3, 64, 64) * 255, r"\[-1, 1\]"),
        (lambda: torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (lambda: torch.rand(1, 4, 64, 64), "3 \\(RGB\\) channels"),
        (lambda: torch.rand(1, 3, 16, 16), "at least 28"),
        (lambda: [[0.0]], "torch.Tensor"),
    ],
)
def test_bad_images_get_clear_errors(tiny_model, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_model.encode(make())


def test_bad_indices_get_clear_errors(tiny_model):
    sem = torch.zeros(1, 2, 2, dtype=torch.long)
    pix = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.decode_indices(sem + 256, pix)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.decode_indices(sem, pix - 1)
    with pytest.raises(TypeError, match="integer"):
        tiny_model.decode_indices(sem.float(), pix)
    with pytest.raises(ValueError, match="batch sizes differ"):
        tiny_model.decode_indices(sem, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        tiny_model.decode_indices(sem[0], pix)


def test_token_noise_only_when_asked_never_by_mode():
    """merge_codes / decode never add noise (train or eval mode); add_token_noise and forward(token_noise=True) do."""
    torch.manual_seed(0)
    model = create_model("dualvitok_tiny", pixel_drop_rate=1.0, pixel_drop_batch_rate=1.0, pixel_noise_type="zero")
    sem, pix = torch.randn(2, 8, 2, 2), torch.randn(2, 8, 4, 4)
    for mode in (False, True):
        model.train(mode)
        assert torch.equal(model.merge_codes(sem, pix)[:, 8:], pix)
        assert torch.equal(model.add_token_noise(pix), torch.zeros_like(pix))  # alpha = beta = 1, mode "zero"
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        model.eval()
        plain, noisy = model(images), model(images, token_noise=True)
        zero_pixel = model.decode(plain.encoding.semantic_codes, torch.zeros_like(plain.encoding.pixel_codes))
    assert torch.equal(noisy.reconstruction, zero_pixel)
    assert not torch.equal(plain.reconstruction, zero_pixel)
    clean = create_model("dualvitok_tiny")  # pixel_drop_rate unset: add_token_noise is the identity
    assert clean.add_token_noise(pix) is pix


def test_pixel_branch_is_a_composition_with_the_checkpoint_keys(tiny_model):
    """The pixel branch modules are the tokenizer's registered parts; keys are the reference names."""
    from dualvitok.pixel import PixelDecoder, PixelEncoder

    enc, dec = tiny_model.pixel_encoder_branch, tiny_model.pixel_decoder_branch
    assert isinstance(enc, PixelEncoder) and isinstance(dec, PixelDecoder)
    assert enc.encoder is tiny_model.pixel_encoder and enc.quant_conv is tiny_model.pixel_quant_conv
    assert enc.quantizer is tiny_model.pixel_quantizer and dec.decoder is tiny_model.pixel_decoder
    assert dec.post_quant_conv is tiny_model.pixel_post_quant_conv
    keys = set(tiny_model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"semantic_encoder", "semantic_quantizer", "semantic_decoder",
                                               "pixel_encoder", "pixel_quant_conv", "pixel_quantizer",
                                               "pixel_post_quant_conv", "pixel_decoder"}
    # a standalone branch has its own keys and computes what the tokenizer's pixel half computes
    standalone = PixelEncoder(tiny_model.config.pixel_encoder, tiny_model.config.pixel_quantizer).eval()
    standalone.load_state_dict({f"{part}.{k}": v for name, part in (("pixel_encoder", "encoder"),
                                                                      ("pixel_quant_conv", "quant_conv"),
                                                                      ("pixel_quantizer", "quantizer"))
                                for k, v in getattr(tiny_model, name).state_dict().items()})
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out, enc_out = standalone(x), tiny_model.encode(x)
    assert torch.equal(out.indices, enc_out.pixel_indices) and torch.equal(out.features, enc_out.pixel_features)
    # a replaced part reaches the branch
    import copy

    model = copy.deepcopy(tiny_model)
    assert model.pixel_decoder_branch.decoder is model.pixel_decoder  # deepcopy keeps the sharing
    model.pixel_quant_conv = torch.nn.Conv2d(8, 8, 1)
    assert model.pixel_encoder_branch.quant_conv is model.pixel_quant_conv


def test_from_reference_rejects_missing_keys(conformance_dir):
    from safetensors.torch import load_file

    from dualvitok.hub import LoadingError

    weights = load_file(conformance_dir / "reference_state_dict.safetensors")
    weights.pop("pixel_decoder.conv_out.weight")
    with pytest.raises(LoadingError, match="1 missing keys: pixel_decoder.conv_out.weight"):
        DualViTok.from_reference(conformance_dir / "reference_config.json", weights)
