"""benchmarks/gpu_check.sh runs unattended: a CPU dry run (tiny model, small searches) and a clean refusal without CUDA.

The GPU run itself needs a GPU machine; these tests check that the script parses its options, runs every step,
prints one PASS/FAIL/SKIP line per step, writes its report and exits non-zero exactly when a step failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(PASS|FAIL|SKIP) (.+?)(: .*)?  \[\d+s\]$")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _steps(stdout: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(LINE.match, stdout.splitlines()) if m]


def test_cpu_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    proc = _run(str(tmp_path), "--device", "cpu", "--quick", "--no-tests", "--compile-backend", "skip")
    steps = _steps(proc.stdout)
    names = [name for _, name in steps]
    assert names[:4] == ["environment", "device-matrix tests", "conformance", "search benchmark"], proc.stdout
    assert any(name.startswith("tokenizer fp32 64x64") for name in names)
    assert any(name.startswith("tokenizer fast 64x64") for name in names)
    failed = [name for status, name in steps if status == "FAIL"]
    shared = Path(os.environ.get("DUALVITOK_SHARED", REPO.parent / "shared"))
    fixtures = any((folder / "cases.json").is_file() for folder in (REPO / "tests" / "data" / "conformance",
                                                                    shared / "conformance"))
    assert failed == ([] if fixtures else ["conformance"]), proc.stdout
    assert proc.returncode == (1 if failed else 0)
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check: " + ("FAIL" if failed else "PASS"))
    assert "| vectors | codes |" in report and "| size | batch | path |" in report
    assert (tmp_path / "gpu_check.log").read_text().strip().endswith("gpu_check.md")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_fails_clearly(tmp_path):
    proc = _run(str(tmp_path), "--device", "cuda", timeout=120)
    assert proc.returncode == 1
    assert ("FAIL", "environment") in _steps(proc.stdout)
    assert "torch.cuda.is_available() is False" in proc.stdout


def test_usage_error_without_output_folder():
    proc = _run(timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
