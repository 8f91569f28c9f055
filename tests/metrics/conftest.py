"""Fixtures of the metric tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """No metric-network weights anywhere (empty torch hub cache, no environment paths), downloads disabled."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("DUALVITOK_FID_WEIGHTS", "DUALVITOK_LPIPS_VGG_WEIGHTS", "DUALVITOK_LPIPS_ALEX_WEIGHTS",
                "DUALVITOK_FIDELITY_WEIGHTS", "DUALVITOK_CLEANFID_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "torch_home"
