"""Import guard for the optional ``diffusers`` dependency of :mod:`dualvitok.refiner`."""

from __future__ import annotations

from types import ModuleType

from .._utils.deps import require


def require_diffusers() -> ModuleType:
    """Return the ``diffusers`` module, or raise an ImportError that says which extra to install."""
    return require("diffusers", "refiner", "dualvitok.refiner")
