"""Device resolution: cpu always, npu/cuda refused clearly when unavailable, torch_npu never imported by default."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from dualvitok.devices import is_npu_available, resolve_device


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not is_npu_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_unavailable_accelerators_get_clear_errors():
    if not is_npu_available():
        with pytest.raises(RuntimeError, match=r"dualvitok\[npu\]"):
            resolve_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_importing_dualvitok_does_not_import_torch_npu():
    import dualvitok  # noqa: F401

    assert "torch_npu" not in sys.modules


_MALLINFO_SCRIPT = """
import ctypes, sys, torch
from dualvitok.devices import keep_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_cpu_memory() if sys.argv[1] == "1" else None
x = torch.empty(64 << 20, dtype=torch.uint8)
print(applied, libc.mallinfo2().hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_cpu_memory_serves_large_buffers_from_the_heap():
    """glibc's own accounting (mallinfo2): a 64 MiB tensor is a separate mmap by default, a heap block once tuned
    (so that, freed, it stays for reuse instead of being unmapped)."""
    import subprocess

    def run(flag: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _MALLINFO_SCRIPT, flag], capture_output=True, text=True)
        if out.returncode and "mallinfo2" in out.stderr:
            pytest.skip("the C library has no mallinfo2 (glibc < 2.33)")
        assert out.returncode == 0, out.stderr
        applied, mmapped = out.stdout.split()
        return applied, int(mmapped)

    _, default_mmapped = run("0")
    applied, tuned_mmapped = run("1")
    assert default_mmapped >= 64 << 20
    if applied != "True":
        pytest.skip("this C library refuses mallopt")
    assert tuned_mmapped < 64 << 20, tuned_mmapped


def test_reproducible_cpu_blas_sets_mkl_cbwr_only_when_unset(monkeypatch):
    from dualvitok.devices import reproducible_cpu_blas

    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert reproducible_cpu_blas() is True and os.environ["MKL_CBWR"] == "AUTO"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert reproducible_cpu_blas() is False and os.environ["MKL_CBWR"] == "COMPATIBLE"  # the user's choice stays


def test_the_command_asks_for_reproducible_blas_first(monkeypatch):
    from dualvitok import cli, devices

    calls = []
    monkeypatch.setattr(devices, "reproducible_cpu_blas", lambda: calls.append("blas") or True)
    real = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: calls.append("parser") or real())
    assert cli.main([]) == 0  # no command: the help
    assert calls == ["blas", "parser"]

