"""Device resolution: cpu always, npu/cuda refused clearly when unavailable, torch_npu never imported by default."""

from __future__ import annotations

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


_FAULTS_SCRIPT = """
import resource, sys, torch
from dualvitok.devices import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "1" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1); del x
start = faults()
for _ in range(10):
    x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1); del x
print(applied, faults() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_cpu_memory_reuses_large_buffers():
    """Counted, not timed: page faults of ten 64 MiB allocations, each written and freed, in fresh processes."""
    import subprocess

    def run(flag: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, flag], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)

    _, default_faults = run("0")
    applied, tuned_faults = run("1")
    if applied != "True":
        pytest.skip("this C library refuses mallopt")
    # glibc's default maps each allocation afresh (16,384 faults each with 4 KiB pages); tuned, they are reused
    assert tuned_faults * 4 <= default_faults, (tuned_faults, default_faults)
