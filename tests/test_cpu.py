"""This CPU's low-precision support: the flags, oneDNN's ISA limit, the measured speedup."""

from __future__ import annotations

import time

import pytest
import torch

from dualvitok import cpu


@pytest.fixture
def x86_with(monkeypatch):
    """``x86_with(amx, avx512_bf16)``: the CPU flags torch reports, on an x86 machine."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def flags(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)

    return flags


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, True, "amx"), (False, True, "avx512_bf16"),
                                                     (False, False, "none")])
def test_support_from_the_flags(x86_with, amx, avx512_bf16, want):
    x86_with(amx, avx512_bf16)
    assert cpu.cpu_bf16_support() == want


def test_not_x86_is_unknown(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.cpu_bf16_support() == "unknown"


@pytest.mark.parametrize("limit, want", [("avx512_core_bf16", "avx512_bf16"), ("AVX10_1_512", "avx512_bf16"),
                                         ("AVX2", "none"), ("avx512_core_vnni", "none"),
                                         ("AVX512_CORE_AMX", "amx"), ("ALL", "amx"), ("DEFAULT", "amx"),
                                         ("", "amx")])
def test_onednn_limit_is_honoured(x86_with, monkeypatch, limit, want):
    """A CPU with AMX whose oneDNN is limited below AMX (or below AVX-512-BF16) is treated as such."""
    x86_with(True, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert cpu.cpu_bf16_support() == want


def test_onednn_limit_never_adds_support(x86_with, monkeypatch):
    x86_with(False, True)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_AMX")  # the older spelling; the CPU has no AMX
    assert cpu.onednn_isa_limit() == "AVX512_CORE_AMX"
    assert cpu.cpu_bf16_support() == "avx512_bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the new spelling wins over the old one
    assert cpu.cpu_bf16_support() == "none"


def _sleepy_mm(calls: list, low: float, high: float):
    """A ``torch.mm`` stand-in that sleeps ``low`` seconds for bf16 operands and ``high`` for float32 ones (no
    arithmetic: the test must not depend on this CPU's speed)."""
    def mm(a, b):
        calls.append(a.dtype)
        time.sleep(low if a.dtype == torch.bfloat16 else high)
        return a
    return mm


def test_speedup_is_measured_once_and_compares_the_two_dtypes(monkeypatch):
    """A bf16 product far slower than float32 ends at the probe (4 calls: warm-up + 3 rounds), and a slow reading is
    taken twice; a far faster one goes on to the full measurement (4 + 6 calls), once; each key is measured once."""
    monkeypatch.setattr(cpu, "_speedups", {})
    calls = []
    monkeypatch.setattr(cpu.torch, "mm", _sleepy_mm(calls, 0.02, 0.0))
    slow = cpu.low_precision_speedup(torch.bfloat16)
    assert 0 < slow < 0.5 and calls.count(torch.bfloat16) == 2 * 4
    assert cpu.low_precision_speedup(torch.bfloat16) == slow and calls.count(torch.bfloat16) == 2 * 4  # cached
    calls.clear()
    monkeypatch.setattr(cpu.torch, "mm", _sleepy_mm(calls, 0.0, 0.02))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another key: measured again
    fast = cpu.low_precision_speedup(torch.bfloat16)
    assert fast > cpu.MIN_LOW_PRECISION_SPEEDUP and calls.count(torch.bfloat16) == 4 + 6


def test_a_slow_reading_is_measured_again_and_the_faster_kept(monkeypatch, caplog):
    """A busy spell during the first measurement (bf16 reads slow) must not put the whole plan in float32: the second
    measurement, on a quiet machine, decides."""
    monkeypatch.setattr(cpu, "_speedups", {})
    calls = []
    quiet = _sleepy_mm(calls, 0.0, 0.01)

    def busy_then_quiet(a, b):
        if len(calls) < 8:  # the whole first measurement (probe + full) with bf16 slowed down
            calls.append(a.dtype)
            time.sleep(0.03 if a.dtype == torch.bfloat16 else 0.01)
            return a
        return quiet(a, b)

    monkeypatch.setattr(cpu.torch, "mm", busy_then_quiet)
    with caplog.at_level("INFO", logger="dualvitok.cpu"):
        speedup = cpu.low_precision_speedup(torch.bfloat16)
    assert speedup > cpu.MIN_LOW_PRECISION_SPEEDUP
    assert "then" in caplog.text and "keeping" in caplog.text


def test_another_processs_measurement_is_taken(monkeypatch):
    monkeypatch.setattr(cpu, "_speedups", {})
    monkeypatch.setattr(cpu.torch, "mm", lambda a, b: pytest.fail("measured"))
    cpu.use_low_precision_speedup(torch.bfloat16, 1.7)
    assert cpu.low_precision_speedup(torch.bfloat16) == 1.7


def test_failing_dtype_measures_zero(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_speedups", {})

    def mm(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return a @ b

    monkeypatch.setattr(cpu.torch, "mm", mm)
    with caplog.at_level("WARNING"):
        assert cpu.low_precision_speedup(torch.float16) == 0.0
    assert "stages stay float32" in caplog.text
