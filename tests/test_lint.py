"""The code base passes ``ruff check`` with the project's settings (pyproject.toml, ruff pinned in the dev extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_package_cites_upstream_repositories_not_local_paths():
    """Users have no ``../shared``: files cite the upstream repository and path instead (and carry no stamps)."""
    offending = []
    for path in sorted((REPO_ROOT / "dualvitok").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for marker in ("../shared", "shared/reference", "Own design.", "Own code."):
            if marker in text:
                offending.append(f"{path.relative_to(REPO_ROOT)}: {marker}")
    assert not offending, offending


def test_declared_core_dependencies_are_imported():
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower().replace("-", "_") for d in deps}
    modules = {"pillow": "PIL", "huggingface_hub": "huggingface_hub"}
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO_ROOT / "dualvitok").rglob("*.py"))
    unused = [n for n in names if not re.search(rf"^\s*(import|from) {modules.get(n, n)}\b", source, flags=re.M)]
    assert not unused, f"declared but never imported: {unused}"
