"""Shared fixtures. Tests run offline on CPU.

Conformance runs against two sets: the compact one shipped in ``tests/data/conformance`` (always; made by
``tests/data/make_fixtures.py``) and the full one in ``../shared/conformance`` (or ``$DUALVITOK_SHARED/conformance``)
when it is present. A missing full set skips its tests with the reason, and the terminal summary says so; with
``DUALVITOK_REQUIRE_SHARED=1`` (CI with the shared folder) a missing full set is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# MKL's float32 GEMMs (torch.mm / F.linear) may round differently in other buffers unless MKL_CBWR is set (seen on
# an AMD EPYC: two copies of one model gave other last bits); MKL reads it at its first call, so before any test
os.environ.setdefault("MKL_CBWR", "AUTO")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DUALVITOK_SHARED", REPO_ROOT.parent / "shared"))
CONFORMANCE = SHARED / "conformance"
REFERENCE = SHARED / "reference"
DATA = REPO_ROOT / "tests" / "data"
CONFORMANCE_SETS = {"compact": DATA / "conformance", "full": CONFORMANCE}
_MISSING_SETS: dict[str, str] = {}  # name -> why, reported by pytest_terminal_summary
_USED_SETS: dict[str, Path] = {}


def available_devices() -> list[str]:
    """Devices the device matrix runs on: ``cpu`` always, ``cuda`` and ``mps`` when present.

    ``DUALVITOK_TEST_DEVICES=cuda`` (comma-separated) restricts the matrix, e.g. to the GPU on a GPU machine; a listed
    device that is not present is skipped with its reason.
    """
    requested = os.environ.get("DUALVITOK_TEST_DEVICES", "").strip()
    if requested:
        return [d.strip() for d in requested.split(",") if d.strip()]
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def _device_present(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and mps.is_available()
    return kind == "cpu"


@pytest.fixture(scope="session", params=[pytest.param(d, id=d, marks=getattr(pytest.mark, torch.device(d).type))
                                         for d in available_devices()])
def device(request) -> torch.device:
    """Each available device in turn (the device matrix). On CUDA, TF32 is off for matmuls and convolutions."""
    name = request.param
    if not _device_present(name):
        pytest.skip(f"device {name!r} is not present on this machine")
    dev = torch.device(name)
    if dev.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield dev
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield dev


@pytest.fixture(scope="session")
def tiny_model_on(tiny_model, device):
    """The shared tiny model on the matrix device (a copy; do not modify it in tests)."""
    import copy

    return tiny_model if device.type == "cpu" else copy.deepcopy(tiny_model).to(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    """Native kernels (``dualvitok._native``) build into a folder of this test session, not the user's cache (set
    before collection: test modules ask whether the kernel is available at import)."""
    if "DUALVITOK_CACHE" not in os.environ:
        folder = tempfile.mkdtemp(prefix="dualvitok-native-cache-")
        os.environ["DUALVITOK_CACHE"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(autouse=True)
def _default_malloc(monkeypatch):
    """The test process keeps glibc's allocator settings: the fast path's process-wide
    ``keep_freed_cpu_memory()`` is replaced by a stand-in that does nothing and reports it did not apply
    (``tests/test_devices.py`` runs the real one in subprocesses; ``tests/test_inference.py`` checks the plan's
    call)."""
    import dualvitok.devices

    monkeypatch.setattr(dualvitok.devices, "keep_freed_cpu_memory", lambda *a, **k: False)


def _missing(name: str, message: str) -> None:
    _MISSING_SETS[name] = message
    if os.environ.get("DUALVITOK_REQUIRE_SHARED", "") not in ("", "0"):
        pytest.fail(f"{message} (DUALVITOK_REQUIRE_SHARED is set)")
    pytest.skip(message)


@pytest.fixture(scope="session", params=list(CONFORMANCE_SETS))
def conformance_dir(request) -> Path:
    """A conformance set: ``compact`` (shipped; missing is a failure) or ``full`` (``../shared``; missing skips)."""
    name, path = request.param, CONFORMANCE_SETS[request.param]
    if not (path / "cases.json").is_file():
        if name == "compact":
            pytest.fail(f"the compact conformance set is missing at {path}: run tests/data/make_fixtures.py")
        _missing(name, f"full conformance set not found at {path}: its tests are skipped "
                       "(set DUALVITOK_SHARED to the shared/ folder to run them)")
    _USED_SETS[name] = path
    return path


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
    """Reference facts (``dualvitok_state_dict.txt``): ``../shared/reference``, else the copy in ``tests/data``."""
    for path in (REFERENCE, DATA / "reference"):
        if (path / "dualvitok_state_dict.txt").is_file():
            return path
    pytest.fail(f"reference facts not found at {REFERENCE} nor {DATA / 'reference'}: run tests/data/make_fixtures.py")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say which conformance sets ran and which were missing (never a silent skip)."""
    if not _USED_SETS and not _MISSING_SETS:
        return
    terminalreporter.section("conformance data")
    for name, path in _USED_SETS.items():
        terminalreporter.write_line(f"{name} set: {path}")
    for name, why in _MISSING_SETS.items():
        terminalreporter.write_line(f"{name} set MISSING: {why}", yellow=True)


@pytest.fixture
def cpu_like(monkeypatch):
    """``cpu_like(support="amx", speedup=6.0)``: make the fast path's CPU rule (:mod:`dualvitok.inference`) see a CPU
    with that bf16 support (:func:`dualvitok.cpu.cpu_bf16_support`) and that measured bf16 speedup
    (:func:`dualvitok.cpu.low_precision_speedup`), whatever this machine's CPU."""
    from dualvitok import inference

    def set_cpu(support: str = "amx", speedup: float = 6.0) -> None:
        monkeypatch.setattr(inference, "cpu_bf16_support", lambda: support)
        monkeypatch.setattr(inference, "low_precision_speedup", lambda dtype: speedup)

    return set_cpu


@pytest.fixture
def forked_child():
    """``forked_child(work) -> bool``: run ``work()`` (returning a bool) in a forked child with one PyTorch thread
    (PyTorch's own OpenMP threads are not fork-safe; the native kernels' pool must be) and return its answer; a child
    that hangs for 30 s or dies counts as ``False``. Skips where there is no ``os.fork``."""
    import os
    import select
    import signal

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")

    def run(work) -> bool:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compute, report, exit without pytest's teardown
            try:
                torch.set_num_threads(1)
                with torch.inference_mode():
                    os.write(write, b"1" if work() else b"0")
            finally:
                os._exit(0)
        os.close(write)
        try:
            ready, _, _ = select.select([read], [], [], 30)
            answer = os.read(read, 1) if ready else b"timeout"
        finally:
            os.close(read)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        return answer == b"1"

    return run


@pytest.fixture
def slowed(monkeypatch):
    """``slowed(module, name, seconds) -> calls``: replace ``module.name`` by a version that sleeps ``seconds`` before
    calling it (so a measured choice finds it slower than its baseline); ``calls`` grows by one per call."""
    import time

    def slow_down(module, name: str, seconds: float) -> list:
        real, calls = getattr(module, name), []

        def slow(*args, **kwargs):
            calls.append(1)
            time.sleep(seconds)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, slow)
        return calls

    return slow_down
