"""Import guard for the optional ``diffusers`` dependency of :mod:`dualvitok.refiner` (own code)."""

from __future__ import annotations

from types import ModuleType


def require_diffusers() -> ModuleType:
    """Return the ``diffusers`` module, or raise an ImportError that says which extra to install."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dualvitok.refiner needs the 'diffusers' package: pip install 'dualvitok[refiner]'"
        ) from e
    return diffusers
