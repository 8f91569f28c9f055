"""The README's quick start stays in step with CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    assert "pytest" in commands[1] and "[dev]" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _quick_start_commands()[1] in ci.splitlines()
    assert "HF_HUB_OFFLINE=1" in ci and "venv" in ci


def test_readme_main_command_names_a_real_subcommand():
    from dualvitok.cli import build_parser

    command = _quick_start_commands()[0].split("&&")[-1].split()
    assert command[0] == "dualvitok"
    build_parser().parse_args(command[1:])  # raises SystemExit on an unknown subcommand


# ---------------------------------------------------------------------------------------------- executable examples
# Every ```python block of README.md and docs/*.md runs here (as lucidrains' test_readme.py does), in a fresh
# namespace, in a temporary working folder, offline. A block that cannot run here (released weights from the Hub, a
# GPU, a dataset) is preceded by an HTML comment ``<!-- no-test: why -->``; those are listed as skipped with the
# reason, so nothing is left out silently.

_BLOCK = re.compile(r"(?:<!--\s*no-test:\s*(?P<why>.*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", flags=re.S)


def _python_blocks() -> list:
    import pytest

    params = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, match in enumerate(_BLOCK.finditer(doc.read_text(encoding="utf-8"))):
            name = f"{doc.relative_to(ROOT).as_posix()}#{i}"
            marks = [pytest.mark.skip(reason=f"not runnable offline: {match['why']}")] if match["why"] else []
            params.append(pytest.param(match["code"], id=name, marks=marks))
    return params


def pytest_generate_tests(metafunc):  # noqa: D103 - collected by pytest for this module only
    if "doc_block" in metafunc.fixturenames:
        metafunc.parametrize("doc_block", _python_blocks())


def test_documented_python_block_runs(doc_block, tmp_path, monkeypatch):
    import shutil

    from dualvitok.assets import sample_images

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    photo = sample_images()[0]
    for name in ("cat.jpg", "photo.jpg"):  # the file names the examples use
        shutil.copy(photo, tmp_path / name)
    exec(compile(doc_block, "<doc block>", "exec"), {"__name__": "__doc_example__"})
