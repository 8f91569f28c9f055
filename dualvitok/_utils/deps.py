"""The optional-dependency guard: import a module of an extra, or fail with the ``pip install`` line to run."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"lpips"``), or raise an ImportError naming the extra that provides it.

    Args:
        module: the import name.
        extra: the dualvitok extra that installs it (``eval``, ``train``, ``unified``, ``refiner``, ``timm``, ...).
        feature: what needs it, for the message (default: ``module``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = feature or "this feature of dualvitok"
        raise ImportError(f"{what} needs the package providing '{module}' ({e}); install it with: "
                          f"pip install 'dualvitok[{extra}]'") from e
