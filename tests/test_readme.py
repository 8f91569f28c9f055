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
