"""Fixtures of the unified-MLLM tests: one tiny random model (tiny BPE tokenizer, tiny Qwen2, dualvitok_tiny)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models decode token by token: one intra-op thread avoids oversubscribing the shared CPU cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def unified():
    """Shared tiny :class:`UnifiedMLLM` (do not modify; tests that set ``refiner`` restore it)."""
    from dualvitok.unified.tiny import tiny_unified_model

    return tiny_unified_model()
