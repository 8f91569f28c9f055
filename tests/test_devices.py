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
