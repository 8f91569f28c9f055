"""The native RoPE kernel (dualvitok/_native/rope.c) against PyTorch's operators, bit for bit; its fallbacks, and its
use by the fast path's vision blocks."""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from dualvitok.blocks import native_rope
from dualvitok.blocks.inference import InferenceVariant, InferenceVisionAttention, swap_inference_blocks
from dualvitok.blocks.rope import apply_rotary
from dualvitok.blocks.vit import VisionBlock

needs_native = pytest.mark.skipif(not native_rope.native_available(),
                                  reason="the native kernel is unavailable here (no C compiler, or it failed to build)")


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reached the kernel (and returned its result)."""
    counter = {"native": 0}
    real = native_rope._native_rotate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        counter["native"] += out is not None
        return out

    monkeypatch.setattr(native_rope, "_native_rotate", spy)
    return counter


def _qkv(batch: int, tokens: int, heads: int, head_dim: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, 3, heads, head_dim, generator=generator) * scale).bfloat16()


def _pytorch(qkv: torch.Tensor, rope) -> torch.Tensor:
    cos, sin = rope
    return apply_rotary(qkv[:, :, :2], (cos.unsqueeze(1), sin.unsqueeze(1)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@needs_native
@pytest.mark.parametrize(("batch", "height", "width", "heads", "head_dim"), [
    (1, 18, 18, 16, 80),  # the released tower at 256x256
    (3, 4, 6, 2, 36),  # a half of 18: the 16 lanes and a masked remainder
    (2, 2, 2, 1, 4),  # the smallest head
    (1, 5, 3, 3, 64),  # an odd grid: raster order
])
def test_kernel_equals_pytorch_bit_for_bit(calls, batch, height, width, heads, head_dim):
    rope = native_rope._rope(height, width, head_dim)
    qkv = _qkv(batch, height * width, heads, head_dim)
    with torch.inference_mode():
        got = native_rope.rotate_queries_keys(qkv, rope, native=True)
    want = _pytorch(qkv, rope)
    assert calls["native"] == 1
    assert got.shape == (batch, height * width, 2, heads, head_dim) and got.dtype == torch.bfloat16
    assert torch.equal(_bits(got), _bits(want))


@needs_native
def test_kernel_values_at_the_edges_of_bf16():
    """Tiny, subnormal, huge and signed-zero inputs round as PyTorch rounds them, in full 16-lane vectors and in the
    masked remainder, at tokens with non-zero angles; NaN stays NaN."""
    rope = native_rope._rope(4, 4, 36)  # halves of 18: 16 lanes + a remainder of 2
    qkv = _qkv(1, 16, 2, 36)
    special = torch.tensor([1e-39, -3e-40, 1e-45, 3.3e38, -3.3e38, 0.0, -0.0, float("inf"), -float("inf"),
                            1.2e-38, -5e-39, 2e-38]).bfloat16()
    for token in (3, 12, 15):  # rows and columns > 0 (2x2-merge order): neither cos = 1 nor sin = 0
        qkv[0, token, 0, 0, :12] = special  # a full vector of the first half ...
        qkv[0, token, 0, 0, 18:30] = special.flip(0) * (token / 7)  # ... and its partners: tiny and huge results
        qkv[0, token, 1, 1, 18:30] = special * (token / 7)  # the second half of a key head
        qkv[0, token, 0, 1, 16:18] = special[:2]  # the remainder lanes of the first half
        qkv[0, token, 1, 0, 34:36] = special[3:5]  # the remainder lanes of the second half
    qkv[0, 6, 0, 0, 3] = float("nan")
    assert all(rope[1][t].abs().min() > 0 for t in (3, 12, 15))
    with torch.inference_mode():
        got = native_rope.rotate_queries_keys(qkv, rope, native=True)
    want = _pytorch(qkv, rope)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan.any()
    assert want.isinf().any() and (want[~nan].abs() < 1e-37).any()  # the extremes reached the outputs
    assert torch.equal(_bits(got)[~nan], _bits(want)[~nan])


@needs_native
def test_kernel_works_in_a_forked_child(monkeypatch, forked_child):
    """After a fork the child starts its own pool threads and lock, and the kernel still gives PyTorch's values."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # a pool of 2 in the parent and in the child
    monkeypatch.setattr(native_rope, "MIN_ROWS_PER_THREAD", 1)  # so that the pool's thread takes rows
    rope = native_rope._rope(6, 6, 16)
    qkv = _qkv(2, 36, 2, 16)
    want = _bits(_pytorch(qkv, rope))
    with torch.inference_mode():
        native_rope.rotate_queries_keys(qkv, rope, native=True)  # the parent's pool and its threads exist now
    assert forked_child(lambda: torch.equal(_bits(native_rope.rotate_queries_keys(qkv, rope, native=True)), want))


@needs_native
def test_the_self_check_catches_a_build_that_contracts_into_fused_multiply_adds(monkeypatch, tmp_path):
    """With -ffp-contract=fast in GNU C mode, GCC (and clang, whatever the pragma) contract a * b - c * d into a
    fused multiply-add where the CPU has one: such a build gives other bits, and its self-check must refuse it."""
    from dualvitok import _native

    monkeypatch.setenv("DUALVITOK_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", {})
    flags = tuple(f for f in _native.FLAGS if f != "-std=c11")
    monkeypatch.setattr(_native, "FLAGS", (*flags, "-std=gnu11", "-ffp-contract=fast"))
    lib = _native.library("rope")
    assert lib is not None
    import ctypes

    function = lib.dvt_rope_bf16
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes, function.restype = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64], None
    rope = native_rope._rope(18, 18, 80)
    qkv = _qkv(2, 324, 16, 80, seed=5)
    got = native_rope._native_rotate(qkv, *rope, function)
    if torch.equal(_bits(got), _bits(_pytorch(qkv, rope))):
        pytest.skip("this compiler did not contract the products")
    assert not native_rope._self_check(function)


@needs_native
def test_kernel_splits_rows_over_threads(monkeypatch):
    monkeypatch.setattr(native_rope, "MIN_ROWS_PER_THREAD", 1)
    rope = native_rope._rope(6, 6, 16)
    qkv = _qkv(5, 36, 4, 16)
    results = []
    for threads in (1, 3, 7):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        with torch.inference_mode():
            results.append(native_rope.rotate_queries_keys(qkv, rope, native=True))
    want = _bits(_pytorch(qkv, rope))
    assert all(torch.equal(_bits(r), want) for r in results)


def test_pytorch_operators_run_where_the_kernel_does_not_apply(calls):
    rope = native_rope._rope(4, 4, 16)
    qkv = _qkv(2, 16, 2, 16)
    cases = {
        "float32": (qkv.float(), True, False),
        "not contiguous": (qkv.transpose(0, 1).contiguous().transpose(0, 1), True, False),
        "autograd on": (qkv, True, True),
        "not asked": (qkv, False, False),
    }
    for name, (x, native, grad) in cases.items():
        with torch.set_grad_enabled(grad):
            got = native_rope.rotate_queries_keys(x, rope, native=native)
        assert torch.equal(got, _pytorch(x, rope)), name
    assert calls["native"] == 0


@needs_native
def test_portable_loops_equal_the_avx512_ones(monkeypatch, tmp_path):
    """The C source's portable loop (CPUs without AVX-512) is PyTorch's values bit for bit too."""
    from dualvitok import _native

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("-mno-avx512f is an x86 flag")
    default_build = _native.build("rope")
    monkeypatch.setenv("DUALVITOK_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "FLAGS", (*_native.FLAGS, "-mno-avx512f"))
    monkeypatch.setattr(native_rope, "_loaded", False)
    monkeypatch.setattr(native_rope, "_function", None)
    assert native_rope.native_available()  # its self-check passed
    assert _native.build("rope") != default_build  # another library: the portable loop
    rope = native_rope._rope(4, 6, 36)
    qkv = _qkv(2, 24, 3, 36)
    with torch.inference_mode():
        got = native_rope.rotate_queries_keys(qkv, rope, native=True)
    assert torch.equal(_bits(got), _bits(_pytorch(qkv, rope)))


@needs_native
def test_a_failed_self_check_disables_the_kernel(monkeypatch, caplog):
    monkeypatch.setattr(native_rope, "_loaded", False)  # load again, with a kernel that returns wrong values
    monkeypatch.setattr(native_rope, "_function", None)
    monkeypatch.setattr(native_rope, "_native_rotate", lambda qkv, *args: torch.zeros_like(qkv[:, :, :2]))
    with caplog.at_level("WARNING"):
        assert not native_rope.native_available()
    assert "failed its self-check" in caplog.text
    assert not native_rope.native_rope_pays(16, 80)


def test_unavailable_kernel_means_pytorch_operators(monkeypatch, calls):
    monkeypatch.setattr(native_rope, "_loaded", True)
    monkeypatch.setattr(native_rope, "_function", None)
    rope = native_rope._rope(4, 4, 16)
    qkv = _qkv(1, 16, 2, 16)
    with torch.inference_mode():
        got = native_rope.rotate_queries_keys(qkv, rope, native=True)
    assert torch.equal(got, _pytorch(qkv, rope)) and calls["native"] == 0
    assert not native_rope.native_available() and not native_rope.native_rope_pays(2, 16)


@needs_native
def test_measured_choice_is_cached(monkeypatch):
    from dualvitok.blocks import native_rope as module

    timed = []
    real = module.measure_choice
    monkeypatch.setattr(module, "measure_choice", lambda *args, **kwargs: timed.append(args[0]) or real(*args,
                                                                                                        **kwargs))
    monkeypatch.setattr(module, "_choices", {})
    first = module.native_rope_pays(2, 16, grid=4, rounds=1)
    assert module.native_rope_pays(2, 16, grid=4, rounds=1) == first and len(timed) == 1
    module.native_rope_pays(2, 32, grid=4, rounds=1)  # another shape: measured again
    assert len(timed) == 2


@needs_native
def test_the_vision_block_variant_equals_the_plain_block(calls):
    """Swapped into a bf16 vision block, the kernel gives the plain block's output bit for bit."""
    torch.manual_seed(0)
    block = VisionBlock(64, num_heads=4).bfloat16().eval()
    rope = native_rope._rope(4, 6, 16)
    x = torch.randn(2, 24, 64).bfloat16()
    fast = swap_inference_blocks(copy.deepcopy(block), native_rope=True)
    assert isinstance(fast.attn, InferenceVisionAttention) and fast.attn.native_rope
    with torch.inference_mode():
        want, got = block(x, rope), fast(x, rope)
    assert calls["native"] == 1
    assert torch.equal(_bits(got), _bits(want))
    with torch.inference_mode():
        assert torch.equal(_bits(swap_inference_blocks(copy.deepcopy(block))(x, rope)), _bits(want))  # off: default
    assert calls["native"] == 1


def test_unknown_kernel_switch_is_an_error():
    with pytest.raises(TypeError, match="unknown kernel switches.*native_rope"):
        swap_inference_blocks(VisionBlock(32, num_heads=2), native_ropes=True)


def test_plan_measures_the_kernel_once_and_obeys_the_flag(tiny_model, monkeypatch, cpu_like, caplog):
    from dualvitok import inference

    cpu_like("amx")  # a bf16 tower whatever this CPU
    monkeypatch.setattr(native_rope, "native_available", lambda: True)
    asked = []
    monkeypatch.setattr(native_rope, "native_rope_pays", lambda heads, dim: asked.append((heads, dim)) or True)
    tower = tiny_model.config.semantic_encoder.semantic_encoder_config
    measured = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu")
    assert asked == [(tower.num_heads, tower.embed_dim // tower.num_heads)] and measured.inference_plan.native_rope
    attention = [m for m in measured.modules() if isinstance(m, InferenceVisionAttention)]
    assert attention and all(m.native_rope for m in attention)
    off = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_rope=False)
    assert not off.inference_plan.native_rope and len(asked) == 1
    float32 = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", dtype=None)
    assert not float32.inference_plan.native_rope and len(asked) == 1  # a float32 tower: the kernel never applies
    inference.use_kernels(measured, native_rope=False)
    assert not measured.inference_plan.native_rope and not any(m.native_rope for m in attention)
    monkeypatch.setattr(native_rope, "native_available", lambda: False)
    with caplog.at_level("WARNING"):
        missing = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_rope=True)
        inference.use_kernels(measured, native_rope=True)
    assert not missing.inference_plan.native_rope and not measured.inference_plan.native_rope
    assert "native RoPE kernel is unavailable" in caplog.text
    variants = [m for m in missing.modules() if isinstance(m, InferenceVariant)]
    assert variants and not any(m.native_rope for m in variants)


@needs_native
def test_fast_path_tokens_do_not_depend_on_the_kernel(tiny_model, cpu_like, calls):
    cpu_like("amx")
    on = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_rope=True)
    off = copy.deepcopy(tiny_model).optimize_for_inference(device="cpu", native_rope=False)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        enc_on, enc_off = on.encode(images), off.encode(images)
    assert calls["native"] > 0
    assert torch.equal(enc_on.semantic_indices, enc_off.semantic_indices)
    assert torch.equal(enc_on.semantic_target, enc_off.semantic_target)  # the tower's features, bit for bit


def test_kernel_builds_and_passes_its_self_check_where_there_is_a_compiler(monkeypatch, tmp_path):
    """With a compiler the kernel must be there: a build or a self-check that fails is an error, not a skip."""
    import os
    import shlex
    import shutil

    from dualvitok import _native

    monkeypatch.delenv("DUALVITOK_NATIVE", raising=False)
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    if shutil.which(compiler[0]) is None or not _native.enabled():
        pytest.skip("no C compiler here, or native kernels are not built on this platform")
    monkeypatch.setenv("DUALVITOK_CACHE", str(tmp_path))  # a fresh build, not the cached one
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(native_rope, "_loaded", False)
    monkeypatch.setattr(native_rope, "_function", None)
    assert native_rope.native_available()
    assert list(tmp_path.glob("native/rope-*"))
