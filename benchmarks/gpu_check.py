"""Prepared, unattended GPU check: device-matrix tests, conformance and benchmarks on one accelerator.

    bash benchmarks/gpu_check.sh OUTPUT_DIR                  # on a GPU machine, from the checkout
    PYTHONPATH=. python benchmarks/gpu_check.py --output OUTPUT_DIR [--device cuda] [--time-budget 420]
    PYTHONPATH=. python benchmarks/gpu_check.py --output /tmp/x --device cpu --quick --no-tests   # dry run

Written for a bare machine: Python with torch (>= 2.1), transformers and timm, no network, no pip, no ``../shared``,
only this repository. Steps (each prints one ``PASS``, ``FAIL`` or ``SKIP`` line with the reason):

1. environment: torch version, the device, TF32 settings;
2. the device-matrix tests on the device (``pytest -m <device>``: model, quantizers, checks, conformance, fast path),
   when pytest is installed; conformance uses the fixtures shipped in ``tests/data`` (and ``../shared`` if there);
3. conformance on the device without pytest: the shipped compact set, every float tensor within 1e-4 with TF32 off,
   indices equal where the reference's margin is above 1e-4;
4. the nearest-code search benchmark on the device, both tile plans (``cache``, ``large``), indices compared;
5. the tokenizer benchmark on the released architecture (random weights, built on the device): float32, the fast
   path (``optimize_for_inference()``) and the fast path compiled (``torch.compile``), at 256x256 with batch 1, 16
   and 64 and at 512x512 with batch 16; encode and decode-from-indices throughput, peak memory, and the fast paths'
   index equality and PSNR against float32 on the same batch.

Everything is written under ``OUTPUT_DIR``: ``gpu_check.md`` (summary and tables). A time budget (default 400 s)
keeps the whole run under 8 minutes: steps that would start after it are skipped with a ``SKIP (time budget)``
line. The exit status is 1 if any step failed, else 0.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

TOLERANCE = 1e-4
MARGIN = 1e-4


class Report:
    """PASS / FAIL / SKIP lines on stdout, collected for the Markdown summary."""

    def __init__(self, start: float, budget: float, path: Path, device: torch.device):
        self.start, self.budget, self.path, self.device = start, budget, path, device
        self.lines: list[tuple[str, str, str]] = []
        self.sections: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.lines.append((status, name, detail))
        print(f"{status} {name}" + (f": {detail}" if detail else "") + f"  [{self.elapsed():.0f}s]", flush=True)
        self.write()  # after every step: a run killed from outside still leaves its report

    def write(self, final: bool = False) -> None:
        status = "FAIL" if self.failed else ("PASS" if final else "INCOMPLETE (still running or killed)")
        summary = "\n".join(f"- **{s}** {n}" + (f": {d}" if d else "") for s, n, d in self.lines)
        text = (f"# GPU check: {status}\n\nDevice: {self.device} ({_device_name(self.device)}); torch "
                f"{torch.__version__}; {self.elapsed():.0f}s\n\n{summary}\n\n" + "\n\n".join(self.sections) + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.lines)


def _last_line() -> str:
    """The last line of the current exception's traceback (its type and message)."""
    return traceback.format_exc(limit=3).strip().splitlines()[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------- steps
def step_environment(report: Report, device: torch.device) -> bool:
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 1):
        report.add("FAIL", "environment", f"torch {torch.__version__} is older than 2.1")
        return False
    if device.type == "cuda" and not torch.cuda.is_available():
        report.add("FAIL", "environment", "--device cuda but torch.cuda.is_available() is False")
        return False
    packages = {name: importlib.util.find_spec(name) is not None
                for name in ("pytest", "transformers", "timm", "onnx", "diffusers", "lpips")}
    try:
        import dualvitok
    except Exception as exc:  # reported, not raised
        report.add("FAIL", "environment", f"import dualvitok failed: {exc!r}")
        return False
    detail = (f"torch {torch.__version__}, {device} = {_device_name(device)}, dualvitok from "
              f"{Path(dualvitok.__file__).parent}, packages: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in packages.items()))
    if device.type == "cuda":
        detail += (f", TF32 matmul {torch.backends.cuda.matmul.allow_tf32} / cudnn {torch.backends.cudnn.allow_tf32}"
                   " (benchmarks use these defaults; tests and conformance switch TF32 off)")
    report.add("PASS", "environment", detail)
    return True


def step_tests(report: Report, device: torch.device, out: Path) -> None:
    if importlib.util.find_spec("pytest") is None:
        report.add("SKIP", "device-matrix tests", "pytest is not installed (the conformance step below still runs)")
        return
    timeout = min(240.0, report.left() - 150.0)
    if timeout < 30:
        report.add("SKIP", "device-matrix tests", "time budget")
        return
    files = ["tests/quantizers", "tests/test_model.py", "tests/test_checks.py", "tests/test_conformance.py",
             "tests/test_inference.py"]
    files = [f for f in files if (REPO / f).exists()]
    junit = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-m", f"{device.type} and not slow", "-p", "no:cacheprovider",
           "--junitxml", str(junit), "-rfEs"]
    env = {**os.environ, "DUALVITOK_TEST_DEVICES": device.type, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or ""
        (out / "tests.log").write_text(partial.decode(errors="replace") if isinstance(partial, bytes) else partial)
        report.add("FAIL", "device-matrix tests", f"timed out after {timeout:.0f}s (log: tests.log)")
        return
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    if proc.returncode == 0:
        report.add("PASS", "device-matrix tests", tail[0])
    elif proc.returncode == 5:
        report.add("FAIL", "device-matrix tests", f"no test selected for -m {device.type} (log: tests.log)")
    else:
        report.add("FAIL", "device-matrix tests", f"{tail[0]} (exit {proc.returncode}; log: tests.log)")


def _conformance_dir() -> Path | None:
    shared = Path(os.environ.get("DUALVITOK_SHARED", REPO.parent / "shared"))
    for folder in (REPO / "tests" / "data" / "conformance", shared / "conformance"):
        if (folder / "cases.json").is_file():
            return folder
    return None


def step_conformance(report: Report, device: torch.device) -> None:
    from safetensors.torch import load_file

    from dualvitok import DualViTok

    folder = _conformance_dir()
    if folder is None:
        report.add("FAIL", "conformance", "no conformance fixtures in tests/data/conformance (nor ../shared)")
        return
    saved = None
    if device.type == "cuda":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = DualViTok.from_reference(folder / "reference_config.json",
                                         folder / "reference_state_dict.safetensors").to(device)
        worst, problems = 0.0, []
        for case in json.loads((folder / "cases.json").read_text()):
            ref = load_file(folder / case["file"])
            with torch.no_grad():
                enc = model.encode(ref["image"].to(device))
                ours = {
                    "semantic_target": enc.semantic_target, "semantic_z": enc.semantic_features,
                    "semantic_quantized": enc.semantic_codes, "pixel_z": enc.pixel_features,
                    "pixel_quantized": enc.pixel_codes,
                    "reconstruction": model.decode(enc.semantic_codes, enc.pixel_codes),
                    "reconstruction_from_indices": model.decode_indices(ref["semantic_indices"].to(device),
                                                                        ref["pixel_indices"].to(device)),
                    "semantic_reconstruction": model.decode_semantic(enc.semantic_codes),
                }
            for key, got in ours.items():
                if key not in ref:
                    continue
                diff = (got.float().cpu().reshape(ref[key].shape) - ref[key]).abs().max().item()
                worst = max(worst, diff)
                if not diff <= TOLERANCE:
                    problems.append(f"{case['file']}:{key} {diff:.2g}")
            for level in ("semantic", "pixel"):
                got = getattr(enc, f"{level}_indices").cpu()
                decisive = ref[f"{level}_indices_margin"] > MARGIN
                wrong = int(((got != ref[f"{level}_indices"]) & decisive).sum())
                if wrong:
                    problems.append(f"{case['file']}:{level}_indices {wrong} differ")
        where = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
        if problems:
            report.add("FAIL", "conformance", f"{where}: " + "; ".join(problems[:6]))
        else:
            report.add("PASS", "conformance", f"{where}: max abs diff {worst:.2g} <= {TOLERANCE} (TF32 off)")
    except Exception:
        report.add("FAIL", "conformance", _last_line())
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def step_search(report: Report, device: torch.device, quick: bool) -> None:
    from _common import table
    from bench_quantizer import run

    if report.left() < 60:
        report.add("SKIP", "search benchmark", "time budget")
        return
    try:
        if quick:
            headers, rows = run(device, [4096], [256], 2**24, repeats=1)
        else:  # pixel tokens of 256x256 batch 16 and 64 (4,096 and 16,384), the released codebook sizes
            headers, rows = run(device, [32768, 98304], [4096, 16384], 256 * 2**20, repeats=3)
        ok = all("**NO**" not in row for row in rows)
        report.sections.append("## Nearest-code search\n\n" + table(headers, rows))
        report.add("PASS" if ok else "FAIL", "search benchmark",
                   "both plans give equal indices" if ok else "the plans' indices differ")
    except Exception:
        report.add("FAIL", "search benchmark", _last_line())


def _images(size: int, batch: int, device: torch.device) -> torch.Tensor:
    try:
        from dualvitok import ImageProcessor
        from dualvitok.assets import sample_images

        processor, paths = ImageProcessor(size=(size, size)), sample_images()
        x = torch.cat([processor(paths[i % len(paths)]) for i in range(batch)])
    except Exception:  # no photos or no PIL: random images
        x = torch.rand(batch, 3, size, size) * 2 - 1
    return x.to(device)


def _fast_copy(model, compile_: bool):
    """The fast path, optionally compiled: ``optimize_for_inference(compile=True)`` where it exists."""
    fast = copy.deepcopy(model)
    if compile_ and "compile" in inspect.signature(fast.optimize_for_inference).parameters:
        return fast.optimize_for_inference(compile=True), "optimize_for_inference(compile=True)"
    fast = fast.optimize_for_inference()
    if compile_:
        fast.encode = torch.compile(fast.encode)
        fast.decode_indices = torch.compile(fast.decode_indices)
        return fast, "optimize_for_inference() + torch.compile(encode, decode_indices)"
    return fast, "optimize_for_inference()"


def step_tokenizer(report: Report, device: torch.device, quick: bool, compile_backend: str | None) -> None:
    from _common import table

    from dualvitok import create_model

    name = "dualvitok_tiny" if quick else "dualvitok_anyres_max512"
    configs = [(64, 1), (64, 2)] if quick else [(256, 1), (256, 16), (256, 64), (512, 16)]
    repeats = 1 if quick else 3
    if report.left() < 60:
        report.add("SKIP", "tokenizer benchmark", "time budget")
        return
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        reference = create_model(name, device=device).eval().requires_grad_(False)
        build_s = time.perf_counter() - t0
    except Exception:
        report.add("FAIL", "tokenizer benchmark", "building the model: "
                   + _last_line())
        return
    rows, modes = [], {"fp32": (reference, "float32 reference path")}
    for mode, compile_ in (("fast", False), ("fast+compile", True)):
        try:
            if compile_ and compile_backend == "skip":
                report.add("SKIP", f"tokenizer {mode}", "--compile-backend skip")
            elif compile_ and compile_backend not in (None, "inductor"):  # dry runs: trace only
                model = copy.deepcopy(reference).optimize_for_inference()
                model.encode = torch.compile(model.encode, backend=compile_backend)
                model.decode_indices = torch.compile(model.decode_indices, backend=compile_backend)
                modes[mode] = (model, f"optimize_for_inference() + torch.compile(backend={compile_backend!r})")
            else:
                modes[mode] = _fast_copy(reference, compile_)
        except Exception:
            report.add("FAIL", f"tokenizer {mode}", "preparing: " + _last_line())
    inputs = {config: _images(*config, device) for config in configs}
    baselines: dict[tuple[int, int], tuple] = {}
    for mode, (model, _) in modes.items():  # every size for a path, then the next path: compiled rows come last
        for size, batch in configs:
            x = inputs[(size, batch)]
            label = f"tokenizer {mode} {size}x{size} b{batch}"
            if report.left() < (120 if mode == "fast+compile" else 15):  # a compile of the 1.35 B model takes minutes
                report.add("SKIP", label, "time budget")
                continue
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for _ in range(2 if mode == "fast+compile" else 1):  # warm-up: compiles (and recompiles)
                        enc = model.encode(x)
                        out = model.decode_indices(enc.semantic_indices, enc.pixel_indices)
                    _sync(device)
                    warm_s = time.perf_counter() - t0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t_enc = _timed(lambda m=model, x=x: m.encode(x), device, repeats)
                    t_dec = _timed(lambda m=model, e=enc: m.decode_indices(e.semantic_indices, e.pixel_indices),
                                   device, repeats)
                    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError("non-finite reconstruction")
                base = baselines.get((size, batch))
                if mode == "fp32":
                    baselines[(size, batch)] = (enc, out, t_enc + t_dec)
                    eq, psnr, speed = "-", "-", "1.00x"
                elif base is None:
                    eq, psnr, speed = "n/a", "n/a", "n/a"
                else:
                    same = [(getattr(enc, k) == getattr(base[0], k)).float().mean().item()
                            for k in ("semantic_indices", "pixel_indices")]
                    mse = (out.float() - base[1]).pow(2).mean().item()
                    eq = f"{same[0]:.4f} / {same[1]:.4f}"
                    psnr = "inf" if mse == 0 else f"{10 * math.log10(4.0 / mse):.1f}"
                    speed = f"{base[2] / (t_enc + t_dec):.2f}x"
                rows.append([f"{size}x{size}", batch, mode, f"{batch / t_enc:.1f}", f"{batch / t_dec:.1f}",
                             f"{batch / (t_enc + t_dec):.1f}", speed, f"{peak:.1f}", eq, psnr, f"{warm_s:.1f}"])
                report.add("PASS", label, f"{batch / (t_enc + t_dec):.1f} img/s encode+decode")
            except Exception:
                report.add("FAIL", label, _last_line())
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    notes = "\n".join(f"- {mode}: {how}" for mode, (_, how) in modes.items())
    report.sections.append(
        f"## Tokenizer ({name}, random weights, built on the device in {build_s:.1f}s)\n\n{notes}\n\n"
        + table(["size", "batch", "path", "encode img/s", "decode img/s", "enc+dec img/s", "vs fp32",
                 "peak GiB", "idx equal to fp32 (sem / pix)", "PSNR vs fp32 dB", "first call s"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for gpu_check.md (created)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model and small searches (dry runs)")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    parser.add_argument("--time-budget", type=float, default=400.0, help="seconds; later steps are skipped")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled path (default inductor; 'eager' traces only, "
                             "'skip' leaves the compiled path out)")
    args = parser.parse_args(argv)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = Report(time.monotonic(), args.time_budget, out / "gpu_check.md", device)
    print(f"gpu_check: device {device}, output {out}, time budget {args.time_budget:.0f}s", flush=True)
    if step_environment(report, device):
        if args.no_tests:
            report.add("SKIP", "device-matrix tests", "--no-tests")
        else:
            step_tests(report, device, out)
        step_conformance(report, device)
        step_search(report, device, args.quick)
        step_tokenizer(report, device, args.quick, args.compile_backend)
    status = "FAIL" if report.failed else "PASS"
    report.write(final=True)
    print(f"\n{status} gpu_check ({report.elapsed():.0f}s); report: {out / 'gpu_check.md'}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
