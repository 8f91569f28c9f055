"""Prepacked linear weights (oneDNN on CPU): the operators against F.linear, the InferenceLinear variant, the
measured choice and the plan that follows it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualvitok import inference
from dualvitok.blocks import packed
from dualvitok.blocks.inference import InferenceLinear, swap_inference_blocks

PACKS = packed.can_pack(torch.zeros(1, dtype=torch.bfloat16))
needs_onednn = pytest.mark.skipif(not PACKS, reason="oneDNN's bf16 packing operators do not run on this build or CPU")


def _linear(n_in: int, n_out: int, dtype=torch.bfloat16, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(dtype).eval().requires_grad_(False)


def _bf16_bound(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Per-element bound on a bf16 GEMM's error against float32 math: half an ulp of the output plus the sum of
    |x||w| times a few ulps of the accumulation."""
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    mass = F.linear(x.float().abs(), layer.weight.float().abs(), layer.bias.float().abs())
    return exact, 2**-8 * exact.abs() + 2**-12 * mass + 1e-6


@needs_onednn
@pytest.mark.parametrize("rows, hint", [(1, 1), (37, 37), (37, 300), (300, 37)])
def test_packed_linear_is_f_linear_in_bf16(rows, hint):
    """The packed GEMM gives F.linear's bf16 result within bf16 rounding, for any row count (the hint only picks
    oneDNN's blocking), and batched inputs keep their leading shape."""
    layer = _linear(96, 160)
    x = torch.randn(2, rows, 96).bfloat16()
    with torch.inference_mode():
        out = packed.packed_linear(x, packed.pack_weight(layer.weight, hint), layer.bias)
        plain = F.linear(x, layer.weight, layer.bias)
    assert out.shape == plain.shape == (2, rows, 160) and out.dtype == torch.bfloat16
    exact, bound = _bf16_bound(x, layer)
    assert ((out.float() - exact).abs() <= bound).all()
    assert ((plain.float() - exact).abs() <= bound).all()  # the bound is one F.linear keeps too


@needs_onednn
def test_inference_linear_uses_the_packed_copy_and_follows_the_weight(monkeypatch):
    layer = _linear(64, 128)
    fast = swap_inference_blocks(copy.deepcopy(layer), pack_linear=True)
    assert isinstance(fast, InferenceLinear) and fast.weight is not layer.weight
    assert set(fast.state_dict()) == set(layer.state_dict())  # the packed copy is not state
    calls = []
    real = packed.packed_linear
    monkeypatch.setattr(packed, "packed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 64).bfloat16()
    with torch.inference_mode():
        out = fast(x)
        assert calls and fast._packed is not None
        exact, bound = _bf16_bound(x, layer)
        assert ((out.float() - exact).abs() <= bound).all()
        first = fast._packed[1]
        fast(x)
        assert fast._packed[1] is first  # packed once
    other = _linear(64, 128, seed=1)
    fast.load_state_dict(other.state_dict())  # new values, same storage: repacked on the next call
    with torch.inference_mode():
        out = fast(x)
    assert fast._packed[1] is not first
    exact, bound = _bf16_bound(x, other)
    assert ((out.float() - exact).abs() <= bound).all()


@needs_onednn
def test_inference_linear_is_plain_with_autograd_float32_or_when_off(monkeypatch):
    monkeypatch.setattr(packed, "packed_linear", lambda *a: pytest.fail("the packed path ran"))
    layer = _linear(32, 48, dtype=torch.float32)
    fast = swap_inference_blocks(copy.deepcopy(layer), pack_linear=True)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        assert torch.equal(fast(x), layer(x))  # float32 weights are packed only with pack_float32
    bf16 = swap_inference_blocks(_linear(32, 48), pack_linear=True).requires_grad_(True)
    xb = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    bf16(xb).sum().backward()  # autograd on: the plain operator, with gradients
    assert xb.grad is not None and bf16.weight.grad is not None
    off = swap_inference_blocks(_linear(32, 48), pack_linear=False)
    with torch.inference_mode():
        assert torch.equal(off(xb.detach()), F.linear(xb.detach(), off.weight, off.bias))


@needs_onednn
@pytest.mark.parametrize("operator, message", [("pack_weight", "prepacking a (48, 32) weight failed"),
                                               ("packed_linear", "refused an input (3, 32)")])
def test_inference_linear_falls_back_when_onednn_refuses(monkeypatch, caplog, operator, message):
    """Packing or the packed call raising: the layer logs it, returns F.linear's result and stays plain."""
    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for this layout")

    monkeypatch.setattr(packed, operator, refuse)
    fast = swap_inference_blocks(_linear(32, 48), pack_linear=True)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        assert torch.equal(fast(x), F.linear(x, fast.weight, fast.bias))
    assert message in caplog.text and not fast.pack_linear and fast._packed is None


@needs_onednn
def test_packing_is_a_measured_choice_cached_per_process(monkeypatch, slowed):
    """packed_linear_pays times the packed GEMM against F.linear: a slower one is refused; measured once per key."""
    monkeypatch.setattr(packed, "_choices", {})
    real = packed.packed_linear
    calls = slowed(packed, "packed_linear", 0.02)  # far slower than a 16 x 64 x 256 GEMM
    assert packed.packed_linear_pays(64, torch.bfloat16, tokens=16) is False
    n = len(calls)
    assert n >= 6  # warm-up + 5 rounds
    assert packed.packed_linear_pays(64, torch.bfloat16, tokens=16) is False and len(calls) == n  # cached
    monkeypatch.setattr(packed, "packed_linear", real)
    assert packed.packed_linear_pays(96, torch.bfloat16, tokens=16, tolerance=10.0) is True  # another key


def test_packing_is_refused_where_onednn_is_off(monkeypatch):
    monkeypatch.setattr(packed, "_choices", {})
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not packed.can_pack(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert packed.packed_linear_pays(64, torch.bfloat16, tokens=16) is False
    assert not packed.can_pack(torch.zeros(2, 2))  # nor float32


@pytest.mark.parametrize("measured", [True, False])
def test_cpu_plan_follows_the_measured_packing_choice(tiny_model, monkeypatch, caplog, measured, cpu_like):
    """The CPU plan measures once at the tower's width and dtype unless told, and logs it; the variants follow the
    plan."""
    asked = []
    cpu_like("amx")
    monkeypatch.setattr(packed, "can_pack", lambda weight: weight.dtype == torch.bfloat16)
    monkeypatch.setattr(packed, "packed_linear_pays", lambda width, dtype: asked.append((width, dtype)) or measured)
    with caplog.at_level(logging.INFO, logger="dualvitok.inference"):
        fast = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu")
    assert f"prepacked linear weights {'on' if measured else 'off'}" in caplog.text
    tower_width = tiny_model.config.semantic_encoder.semantic_encoder_config.embed_dim
    assert asked == [(tower_width, torch.bfloat16)]
    assert fast.inference_plan.pack_linear is measured
    linears = [m for m in fast.modules() if isinstance(m, InferenceLinear)]
    assert linears and all(m.pack_linear is measured for m in linears)
    forced = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", pack_linear=False)
    assert not forced.inference_plan.pack_linear and len(asked) == 1  # told: not measured
    exact32 = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", dtype=None)
    assert not exact32.inference_plan.pack_linear and len(asked) == 1  # float32 tower: nothing to pack


def test_use_kernels_switches_the_variants(tiny_model, monkeypatch, cpu_like):
    cpu_like("amx")
    fast = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", pack_linear=True, fuse_conv=True,
                                                            pack_float32=False)
    with torch.inference_mode():
        fast.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    linears = [m for m in fast.modules() if isinstance(m, InferenceLinear)]  # PACKS: bf16 weights pack here
    assert any(m._packed is not None for m in linears) == PACKS
    inference.use_kernels(fast, pack_linear=False)
    assert not fast.inference_plan.pack_linear and fast.inference_plan.fuse_conv
    assert all(not m.pack_linear and m._packed is None for m in linears)  # the copies are freed
    with pytest.raises(TypeError, match="unknown kernel choices.*fuse_conv, pack_linear"):
        inference.use_kernels(fast, compile=True)


@needs_onednn
def test_inference_linear_copes_with_inference_weights_copies_and_data_writes():
    """Weights made under inference_mode (no version counter), deepcopy/pickle after the first call, and a write
    through .data followed by invalidate()."""
    import pickle

    with torch.inference_mode():
        layer = _linear(32, 48)  # inference tensors, as from_pretrained inside inference_mode gives
        fast = swap_inference_blocks(layer, pack_linear=True)
        x = torch.randn(3, 32, dtype=torch.bfloat16)
        first = fast(x)
        assert fast._packed is not None
    twin = copy.deepcopy(swap_inference_blocks(_linear(32, 48), pack_linear=True))
    with torch.inference_mode():
        twin(x)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(twin)))  # the opaque packed copy is dropped, not copied
    assert clone._packed is None and torch.equal(clone.weight, twin.weight)
    with torch.inference_mode():
        assert torch.equal(clone(x), twin(x))
    other = _linear(32, 48, seed=3)
    twin.weight.data.copy_(other.weight)  # no version bump: the stale copy stays until invalidate()
    twin.bias.data.copy_(other.bias)
    twin.invalidate()
    with torch.inference_mode():
        out = twin(x)
    exact, bound = _bf16_bound(x, other)
    assert ((out.float() - exact).abs() <= bound).all() and first.shape == out.shape


def test_inference_linear_is_plain_while_tracing(monkeypatch):
    from dualvitok.blocks import inference as variants

    monkeypatch.setattr(variants, "is_tracing", lambda: True)
    monkeypatch.setattr(packed, "pack_weight", lambda *a: pytest.fail("packed while tracing"))
    fast = swap_inference_blocks(_linear(32, 48), pack_linear=True)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(fast(x), F.linear(x, fast.weight, fast.bias)) and fast._packed is None


def _mlp(act: str = "quick_gelu", seed: int = 0):
    from dualvitok.blocks.vit import VisionMlp

    torch.manual_seed(seed)
    return VisionMlp(64, 256, act).bfloat16().eval().requires_grad_(False)


@needs_onednn
def test_vision_mlp_folds_quick_gelu_into_the_packed_gemm(monkeypatch):
    """fc1 with oneDNN's swish post-op on weights scaled by 1.702, fc2 on weights scaled back: the MLP's quick-GELU
    result within bf16 roundings of float32 math, and no separate activation pass."""
    from dualvitok.blocks.inference import InferenceVisionMlp
    from dualvitok.blocks.vit import quick_gelu

    plain = _mlp()
    fast = swap_inference_blocks(copy.deepcopy(plain), pack_linear=True)
    assert isinstance(fast, InferenceVisionMlp) and isinstance(fast.fc1, InferenceLinear)
    activations = []
    real = packed.packed_linear
    monkeypatch.setattr(packed, "packed_linear",
                        lambda *a, activation="none": activations.append(activation) or real(*a, activation=activation))
    x = torch.randn(2, 37, 64).bfloat16()
    with torch.inference_mode():
        out = fast(x)
    assert activations == ["swish", "none"]
    w1, b1, w2, b2 = (t.float() for t in (plain.fc1.weight, plain.fc1.bias, plain.fc2.weight, plain.fc2.bias))
    exact = F.linear(quick_gelu(F.linear(x.float(), w1, b1)), w2, b2)
    with torch.inference_mode():
        reference = plain(x).float()  # the plain bf16 MLP: its error sets the scale
    err, ref_err = (out.float() - exact).abs().max().item(), (reference - exact).abs().max().item()
    assert out.shape == (2, 37, 64) and err <= 2 * ref_err + 1e-3, (err, ref_err)
    assert set(fast.state_dict()) == set(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fast.state_dict().items())  # weights unscaled


def test_vision_mlp_is_plain_without_packing_or_quick_gelu(monkeypatch):
    monkeypatch.setattr(packed, "packed_linear", lambda *a, **k: pytest.fail("the packed path ran"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for mlp, pack in ((_mlp(), False), (_mlp("silu"), False)):
        fast = swap_inference_blocks(copy.deepcopy(mlp), pack_linear=pack)
        with torch.inference_mode():
            assert torch.equal(fast(x), mlp(x))
    gelu = swap_inference_blocks(_mlp("gelu"), pack_linear=True)  # another activation: not folded
    calls = []
    monkeypatch.setattr(packed, "packed_linear", lambda *a, activation="none": calls.append(activation) or
                        torch.ops.mkldnn._linear_pointwise(*a, activation, [], ""))
    with torch.inference_mode():
        gelu(x)
    assert "swish" not in calls


PACKS_FLOAT32 = packed.can_pack(torch.zeros(1))


@pytest.mark.skipif(not PACKS_FLOAT32, reason="oneDNN's float32 packing operators do not run on this build or CPU")
def test_float32_layers_compute_from_packed_weights_with_pack_float32(monkeypatch):
    """pack_float32: a float32 InferenceLinear computes with oneDNN's packed GEMM (the packed path runs), within
    float32 rounding of F.linear (another library's sums), and a float64 reference bounds both alike."""
    calls = []
    real = packed.packed_linear
    monkeypatch.setattr(packed, "packed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _linear(96, 160, dtype=torch.float32)
    fast = swap_inference_blocks(copy.deepcopy(layer), pack_float32=True)
    x = torch.randn(2, 37, 96)
    with torch.inference_mode():
        out, plain = fast(x), layer(x)
    assert calls and out.shape == plain.shape == (2, 37, 160) and out.dtype == torch.float32
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    mass = F.linear(x.double().abs(), layer.weight.double().abs(), layer.bias.double().abs())
    bound = 96 * 2**-24 * mass + 1e-12  # float32 accumulation of 96 terms, any order
    assert ((out - exact).abs() <= bound).all() and ((plain - exact).abs() <= bound).all()


def test_plan_packs_float32_only_in_the_semantic_head_behind_a_bf16_tower(tiny_model, monkeypatch, caplog,
                                                                           cpu_like):
    """The float32 choice is measured once at the semantic head's width where the tower is bf16; only the head's
    linear layers follow it (the quantizers' and any other float32 layer keep the float32 path's values); a float32
    plan never measures it, and use_kernels refuses it there."""
    asked = []
    cpu_like("amx")
    monkeypatch.setattr(packed, "can_pack", lambda weight: True)
    monkeypatch.setattr(packed, "packed_linear_pays", lambda width, dtype: asked.append((width, dtype)) or True)
    fast = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu")
    head_width = tiny_model.config.semantic_encoder.embed_dim
    tower_width = tiny_model.config.semantic_encoder.semantic_encoder_config.embed_dim
    assert asked == [(tower_width, torch.bfloat16), (head_width, torch.float32)]
    assert fast.inference_plan.pack_float32
    head = {id(m) for m in inference._semantic_head_linears(fast)}
    linears = [m for m in fast.modules() if isinstance(m, InferenceLinear)]
    assert head and all(m.pack_float32 is (id(m) in head) for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in linears if id(m) in head)
    off = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", pack_float32=False)
    assert not off.inference_plan.pack_float32 and len(asked) == 3  # told: only the bf16 choice measured
    plain32 = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", dtype=None)
    assert not plain32.inference_plan.pack_float32 and len(asked) == 3  # float32 tower: not measured
    with caplog.at_level(logging.WARNING, logger="dualvitok.inference"):
        inference.use_kernels(plain32, pack_float32=True)
    assert "vision tower is not bf16" in caplog.text and not plain32.inference_plan.pack_float32
    assert not any(m.pack_float32 for m in plain32.modules() if isinstance(m, InferenceLinear))
    inference.use_kernels(fast, pack_float32=False)
    assert not any(m.pack_float32 for m in fast.modules() if isinstance(m, InferenceLinear))
