"""Shared fixtures. Tests run offline on CPU; the conformance data is expected at ../shared/conformance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DUALVITOK_SHARED", REPO_ROOT.parent / "shared"))
CONFORMANCE = SHARED / "conformance"
REFERENCE = SHARED / "reference"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """``../shared/conformance``; a missing folder is a failure, not a skip."""
    if not (CONFORMANCE / "cases.json").is_file():
        pytest.fail(f"conformance data not found at {CONFORMANCE} (set DUALVITOK_SHARED to the shared/ folder)")
    return CONFORMANCE


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random DualViTok in eval mode (shared; do not modify it in tests)."""
    from dualvitok import create_model

    torch.manual_seed(0)
    return create_model("dualvitok_tiny").eval()


@pytest.fixture(scope="session")
def reference_model(conformance_dir):
    """The conformance model loaded with ``from_reference``."""
    from dualvitok import DualViTok

    return DualViTok.from_reference(conformance_dir / "reference_config.json",
                                    conformance_dir / "reference_state_dict.safetensors")


@pytest.fixture(scope="session")
def sample_image_paths():
    from dualvitok.assets import sample_images

    return sample_images()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``; missing is a failure."""
    if not (REFERENCE / "dualvitok_state_dict.txt").is_file():
        pytest.fail(f"reference facts not found at {REFERENCE} (set DUALVITOK_SHARED to the shared/ folder)")
    return REFERENCE
