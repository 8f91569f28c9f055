"""The ILLUME+ reference tokenizer against this library's float32 path and fast path, side by side, same weights.

    python benchmarks/bench_reference.py --reference-src PATH/ILLUME_plus --reference-python REFENV/bin/python
    python benchmarks/bench_reference.py --reference-src PATH/ILLUME_plus --quick      # tiny config, 1 minute

What it does:

1. In the reference's environment, builds the reference ``DualViTok`` from its own config
   (``configs/example/dualvitok/dualvitok_anyres_max512.py``, or ``--reference-config`` a JSON in the reference's
   nested layout) with seeded random weights, and saves them (reference key names, safetensors) with the config.
   The Qwen2-VL tower is built from a config object instead of being downloaded (``Qwen2VLVisionConfig`` defaults:
   the released tower's shape; ``semantic_encoder.semantic_encoder_config`` when the JSON config has one).
2. Saves the inputs (the bundled photos, resized and centre-cropped to each size) once, so every path sees the
   same tensors.
3. For each of ``--rounds`` rounds, runs one process per path in turn -- ``reference`` (float32), ``fp32``
   (``DualViTok.from_reference``) and ``fast`` (the same, then ``optimize_for_inference()``), and with ``--paths``
   ``reference_kept`` (the reference with freed buffers kept for reuse, as the fast path's CPU plan sets it) and
   ``fast_default_malloc`` (``optimize_for_inference(keep_freed_memory=False)``) and ``fast_plain_norm``
   (``optimize_for_inference(native_norm=False)``: no native GroupNorm + SiLU kernel) and ``fast_plain_conv``
   (``optimize_for_inference(pack_conv=False)``: no prepacked convolution weights) and ``fast_direct_conv``
   (``optimize_for_inference(winograd_conv=False)``: no Winograd convolutions) and ``fast_blas``
   (``optimize_for_inference(pack_float32=False)``: float32 linear layers on PyTorch's BLAS) -- so the paths are
   interleaved and each one's peak RSS (``ru_maxrss``) is its own. Each process times ``encode`` and ``decode``
   (from the indices) once per configuration, after a warm-up call on the first one, and saves its indices and
   reconstructions.
4. Prints best and median times per path and stage, the ratios, peak RSS, the share of indices equal to the
   reference's and the PSNR of each path's reconstruction against the reference's. With ``--profile``, each process
   of the first round runs each stage once more under ``torch.profiler``, and a table per configuration and stage
   puts the top operators by self CPU time of every path side by side (which operator holds a path back).

The reference's environment (it needs transformers 4.46.3 and huggingface_hub < 1.0; torch as here):

    python -m venv refenv && refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.46.3 \
        einops einx timm "huggingface_hub<1.0"

or, to reuse this environment's torch (and timm), ``pip install --target REFSITE transformers==4.46.3 einops einx
"huggingface_hub<1.0" "tokenizers<0.21"`` and pass ``--reference-site REFSITE`` (put first on ``PYTHONPATH`` of the
reference process only). The reference source is ``illume-unified-mllm/ILLUME_plus`` (``vision_tokenizer/``,
``configs/example/dualvitok/``); no file of it is edited.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAST_PATHS: dict[str, dict[str, bool]] = {
    "fast": {},  # the default plan (on CPU: freed buffers kept for reuse)
    "fast_default_malloc": {"keep_freed_memory": False},
    "fast_plain_norm": {"native_norm": False},
    "fast_plain_conv": {"pack_conv": False},
    "fast_direct_conv": {"winograd_conv": False},
    "fast_blas": {"pack_float32": False},
}
"""Each fast path's ``optimize_for_inference`` arguments."""
PATHS = ("reference", "reference_kept", "fp32", *FAST_PATHS)
DEFAULT_PATHS = "reference,fp32,fast"
"""The fast path's CPU plan keeps freed buffers for reuse (``keep_freed_cpu_memory()``, process-wide) unless told not
to: ``fast_default_malloc`` leaves glibc's allocator alone, as the reference and the float32 path run, and
``reference_kept`` gives the reference the fast path's setting. ``fast_plain_norm`` is the fast path with the
decoder's GroupNorm + modulation + SiLU left to PyTorch's operators (``native_norm=False``), ``fast_plain_conv`` the
fast path with the decoder's convolutions on plain weights (``pack_conv=False``), ``fast_direct_conv`` the fast path
with oneDNN's direct convolutions instead of Winograd's in a float32 decoder (``winograd_conv=False``), ``fast_blas``
the fast path with its float32 linear layers on PyTorch's BLAS (``pack_float32=False``)."""


# ---------------------------------------------------------------------------------------------- workers
def _load_inputs(work: Path, size: int, batch: int):
    from safetensors.torch import load_file

    return load_file(str(work / f"inputs_{size}.safetensors"))["image"][:batch].contiguous()


def _reference_model(src: Path, config: dict):
    """Build the reference DualViTok from a nested config dict, the tower from a config object (no download)."""
    sys.path.insert(0, str(src / "vision_tokenizer"))
    from tokenizer.builder import build_vq_model
    from tokenizer.qwen2vit import modeling_qwen2_vl
    from tokenizer.qwen2vit.configuration_qwen2_vl import Qwen2VLVisionConfig
    from utils.registry_utils import Config

    config = json.loads(json.dumps(config))
    tower = config["semantic_encoder"].pop("semantic_encoder_config", {})

    def build_tower(cls, name, **kwargs):
        return cls(Qwen2VLVisionConfig(**{**tower, "attn_implementation": kwargs.get("attn_implementation", "sdpa")}))

    modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel.from_pretrained = classmethod(build_tower)
    cfg = Config(dict(vq_model=dict(type="DualViTok", config=config)))
    return build_vq_model(cfg.vq_model)


def _our_model(path: str, work: Path):
    from dualvitok import DualViTok

    model = DualViTok.from_reference(str(work / "config.json"), str(work / "weights.safetensors")).eval()
    model.requires_grad_(False)
    if path in FAST_PATHS:
        model.optimize_for_inference(**FAST_PATHS[path])
    return model


def worker(args: argparse.Namespace) -> None:
    """One path in one process: time encode/decode per configuration, save indices and reconstructions."""
    import resource

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    configs = json.loads(args.configs)
    if args.worker == "reference_kept":  # the fast path's allocator setting, from dualvitok/devices.py alone
        import importlib.util  # (the reference's process does not import this library)

        spec = importlib.util.spec_from_file_location("_devices", HERE.parent / "dualvitok" / "devices.py")
        devices = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(devices)
        if not devices.keep_freed_cpu_memory():
            raise SystemExit("reference_kept: keep_freed_cpu_memory() does not apply here (no glibc mallopt)")
    if args.worker.startswith("reference"):
        config = json.loads((work / "config.json").read_text())
        model = _reference_model(Path(args.reference_src), config).eval().requires_grad_(False)
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(work / "weights.safetensors")), strict=False)
        if unexpected or [k for k in missing if "frozen_codebook" not in k]:
            raise SystemExit(f"reference weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

        def encode(x):
            return model.encode_code(x)

        def decode(indices):
            return model.decode_code(*indices)
    else:
        model = _our_model(args.worker, work)

        def encode(x):
            enc = model.encode(x)
            return enc.semantic_indices, enc.pixel_indices

        def decode(indices):
            return model.decode_indices(*indices)

    results, profiles = [], []
    with torch.inference_mode():
        for i, (size, batch) in enumerate(configs):
            x = _load_inputs(work, size, batch)
            if i == 0:  # warm-up on the first configuration (later ones are long on a small CPU)
                decode(encode(x))
            t0 = time.perf_counter()
            indices = encode(x)
            t1 = time.perf_counter()
            recon = decode(indices)
            t2 = time.perf_counter()
            results.append({"size": size, "batch": batch, "encode": t1 - t0, "decode": t2 - t1})
            if args.save_outputs:
                save_file({"semantic_indices": indices[0].contiguous(), "pixel_indices": indices[1].contiguous(),
                           "reconstruction": recon.float().contiguous()},
                          str(work / f"out_{args.worker}_{size}_{batch}.safetensors"))
            if args.profile:  # one more call of each stage, under torch.profiler (after the timed ones)
                indices, enc_ops = _operator_times(encode, x, args.top)
                _, dec_ops = _operator_times(decode, indices, args.top)
                profiles.append({"size": size, "batch": batch, "encode": enc_ops, "decode": dec_ops})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # this machine's GEMM peaks, measured right after this path's timings (on a shared host they drift)
    sys.path.insert(0, str(HERE))
    from _common import gemm_peak, print_result

    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    plan = getattr(model, "inference_plan", None)
    kept = args.worker == "reference_kept" or bool(plan and plan.keep_freed_memory)
    print_result({"path": args.worker, "runs": results, "peak_rss": peak, "gemm_peaks": peaks,
                  "freed_buffers_kept": kept, "native_norm": bool(plan and plan.native_norm),
                  "native_rope": bool(plan and plan.native_rope), "pack_float32": bool(plan and plan.pack_float32),
                  "pack_conv": bool(plan and plan.pack_conv), "winograd_conv": bool(plan and plan.winograd_conv),
                  "low_precision": bool(plan and plan.low_precision), "profiles": profiles})


def _operator_times(fn, arg, top: int) -> tuple[object, dict]:
    """``(fn(arg), {"ops": {operator: [self CPU s, calls]} for the top operators by self CPU time, "total": s})``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(arg)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return out, {"ops": {e.key: [e.self_cpu_time_total / 1e6, e.count] for e in events[:top]},
                 "total": sum(e.self_cpu_time_total for e in events) / 1e6}


def make_weights(args: argparse.Namespace) -> None:
    """In the reference environment: seeded random reference weights + the nested config, saved to ``--work``."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    src, work = Path(args.reference_src), Path(args.work)
    if args.reference_config:
        config = json.loads(Path(args.reference_config).read_text())
    else:
        sys.path.insert(0, str(src / "vision_tokenizer"))
        from utils.registry_utils import Config

        cfg = Config.fromfile(str(src / "configs/example/dualvitok/dualvitok_anyres_max512.py"))
        config = json.loads(json.dumps(cfg.vq_model.config, default=lambda o: dict(o)))
    model = _reference_model(src, config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(work / "weights.safetensors"))
    (work / "config.json").write_text(json.dumps(config, indent=1))
    sys.path.insert(0, str(HERE))
    from _common import print_result

    print_result({"tensors": len(state), "params": sum(v.numel() for v in state.values())})


# ---------------------------------------------------------------------------------------------- orchestration
def _bf16_support() -> str:
    sys.path.insert(0, str(HERE.parent))
    from dualvitok.cpu import cpu_bf16_support

    return cpu_bf16_support()



def _reference_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    parts = [p for p in (args.reference_site, str(Path(args.reference_src) / "vision_tokenizer")) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)  # nothing of this repository: the reference runs on its own
    env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _our_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _save_inputs(work: Path, sizes: list[int], batch: int) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE.parent))
    from dualvitok import ImageProcessor
    from dualvitok.assets import sample_images

    paths = sample_images()
    for size in sizes:
        processor = ImageProcessor(size=(size, size))
        x = torch.cat([processor(paths[i % len(paths)]) for i in range(batch)])
        save_file({"image": x.contiguous()}, str(work / f"inputs_{size}.safetensors"))


def _compare(work: Path, configs: list, paths: list[str]) -> list[list[object]]:
    from safetensors.torch import load_file

    rows = []
    for size, batch in configs:
        ref = load_file(str(work / f"out_reference_{size}_{batch}.safetensors"))
        for path in paths[1:]:
            ours = load_file(str(work / f"out_{path}_{size}_{batch}.safetensors"))
            eq = {k: (ours[k] == ref[k]).float().mean().item() for k in ("semantic_indices", "pixel_indices")}
            mse = (ours["reconstruction"] - ref["reconstruction"]).pow(2).mean().item()
            psnr = float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)  # data range 2 ([-1, 1])
            diff = (ours["reconstruction"] - ref["reconstruction"]).abs().max().item()
            rows.append([f"{size}x{size}", batch, path, f"{eq['semantic_indices']:.4f}", f"{eq['pixel_indices']:.4f}",
                         f"{psnr:.1f}", f"{diff:.2e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-src", required=True, help="checkout of illume-unified-mllm/ILLUME_plus")
    parser.add_argument("--reference-python", default=sys.executable, help="python of the reference's environment")
    parser.add_argument("--reference-site", default=None,
                        help="folder put first on the reference process's PYTHONPATH (pip install --target ...)")
    parser.add_argument("--reference-config", default=None,
                        help="JSON config in the reference's nested layout (default: dualvitok_anyres_max512.py)")
    parser.add_argument("--configs", default="256x1,256x8,512x1", help="SIZExBATCH list (default: 256x1,256x8,512x1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best and median over them")
    parser.add_argument("--paths", default=DEFAULT_PATHS,
                        help=f"paths to time, comma-separated, from {', '.join(PATHS)} (default: {DEFAULT_PATHS}; "
                             "the reference is always first)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every path (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for weights, inputs and outputs (default: a temp dir)")
    parser.add_argument("--output", default=None, help="write the Markdown tables here too")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny conformance-size config, 64x1 and 64x2, 1 round (checks the set-up)")
    parser.add_argument("--profile", action="store_true",
                        help="in the first round, run each stage once more under torch.profiler and add a table of "
                             "the top operators by self CPU time, path beside path")
    parser.add_argument("--top", type=int, default=12, help="operators per --profile table (default: 12)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the tables from --work's runs.jsonl (e.g. of an interrupted run) without timing")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--make-weights", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-outputs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        return worker(args)
    if args.make_weights:
        return make_weights(args)

    if args.quick:
        tiny = {"semantic_encoder": {"semantic_encoder": "vit", "attn_implementation": "sdpa", "target_mlp": "norm",
                                     "proj_layer": "linear", "num_blocks": 2, "z_channels": 8, "embed_dim": 64,
                                     "semantic_encoder_config": {"depth": 2, "embed_dim": 64, "num_heads": 4,
                                                                 "hidden_size": 96}},
                "semantic_quantizer": {"type": "SimVQ", "channel_first": True, "rotation_trick": False, "dim": 8,
                                       "codebook_size": 256},
                "semantic_decoder": {"proj_layer": "linear_norm", "attn_implementation": "sdpa", "z_channels": 8,
                                     "embed_dim": 64, "output_channels": 96, "num_blocks": 2}}
        movq = {"attn_resolutions": [4], "ch_mult": [1, 1, 2, 2, 4], "double_z": False, "dropout": 0.0,
                "in_channels": 3, "out_channels": 3, "use_dc_up_down_blocks": True, "codebook_size": 512, "ch": 32,
                "num_res_blocks": 1}
        tiny.update(pixel_encoder={**movq, "z_channels": 8, "embed_dim": 8},
                    pixel_quantizer={"type": "SimVQ", "channel_first": True, "rotation_trick": False, "dim": 8,
                                     "codebook_size": 512},
                    pixel_decoder={**movq, "z_channels": 16, "embed_dim": 16},
                    pixel_drop_rate=None, pixel_drop_batch_rate=0.1, pixel_noise_type="random")
        args.configs, args.rounds = "64x1,64x2", 1
    configs = [[int(v) for v in c.lower().split("x")] for c in args.configs.split(",")]
    paths = ["reference"] + [p for p in dict.fromkeys(args.paths.split(",")) if p and p != "reference"]
    if set(paths) - set(PATHS) or len(paths) < 2:
        parser.error(f"--paths {args.paths!r}: expected the reference and at least one of {', '.join(PATHS[1:])}")
    if args.report_only and not args.work:
        parser.error("--report-only needs the --work folder of the run")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_reference_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick and not args.reference_config:
        args.reference_config = str(work / "tiny_config.json")
        Path(args.reference_config).write_text(json.dumps(tiny))

    import torch

    sys.path.insert(0, str(HERE))
    from _common import emit_report, gemm_peak, machine, run_worker, table

    torch.set_num_threads(args.threads)
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    print(f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
          f"GEMM peak: float32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    script = [str(Path(__file__).resolve())]
    common = ["--reference-src", args.reference_src, "--work", str(work), "--threads", str(args.threads)]
    log = work / "runs.jsonl"  # every worker's result as it comes: --report-only rebuilds the tables from it
    if not args.report_only:
        made = run_worker([args.reference_python, *script, "--make-weights", *common, "--seed", str(args.seed)]
                    + (["--reference-config", args.reference_config] if args.reference_config else []),
                    env=_reference_env(args))
        print(f"reference weights: {made['tensors']} tensors, {made['params']:,} elements", flush=True)
        _save_inputs(work, sorted({s for s, _ in configs}), max(b for _, b in configs))
        log.unlink(missing_ok=True)
        for r in range(args.rounds):
            for path in paths:
                python, env = ((args.reference_python, _reference_env(args)) if path.startswith("reference")
                               else (sys.executable, _our_env(args)))
                out = run_worker([python, *script, "--worker", path, *common, "--configs", json.dumps(configs)]
                           + (["--save-outputs"] if r == 0 else [])
                           + (["--profile", "--top", str(args.top)] if r == 0 and args.profile else []), env=env)
                with open(log, "a") as f:
                    f.write(json.dumps({**out, "round": r}) + "\n")
                print(f"round {r + 1}/{args.rounds} {path}: "
                      + ", ".join(f"{x['size']}x{x['batch']} {x['encode'] + x['decode']:.2f}s" for x in out["runs"]),
                      flush=True)
    outs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if args.report_only:  # the paths of the run
        paths = [p for p in PATHS if p in {o["path"] for o in outs}]
    if not {o["path"] for o in outs} >= set(paths):
        raise SystemExit(f"{log} has no complete round: run without --report-only first")
    rounds = len({o["round"] for o in outs})
    times: dict[tuple, list[float]] = {}
    rss: dict[str, int] = {}
    # the peak a path is held to: bf16's where its plan converted a stage, else float32's (a CPU without bf16
    # matrix hardware keeps every stage float32)
    peak_kind = {o["path"]: "bf16" if o.get("low_precision", o["path"].startswith("fast")) else "fp32" for o in outs}
    measured_peaks: dict[str, list[float]] = {} if args.report_only else {k: [v] for k, v in peaks.items()}
    for out in outs:
        path = out["path"]
        rss[path] = max(rss.get(path, 0), out["peak_rss"])
        for k, v in out["gemm_peaks"].items():
            measured_peaks.setdefault(k, []).append(v)
        for run in out["runs"]:
            for stage in ("encode", "decode"):
                times.setdefault((path, run["size"], run["batch"], stage), []).append(run[stage])
            times.setdefault((path, run["size"], run["batch"], "encode+decode"), []).append(
                run["encode"] + run["decode"])

    # "% of peak": best time against the highest peak measured during the run (both are the machine at its quietest)
    peak_range = {k: (min(v), statistics.median(v), max(v)) for k, v in measured_peaks.items()}
    peaks = {k: max(v) for k, v in measured_peaks.items()}
    flops = _flops(work, configs)
    ours = [p for p in paths if not p.startswith("reference")]
    bases = [p for p in paths if p.startswith("reference")]  # ratio columns: every other path against each of them
    pairs = [(p, b) for b in bases for p in paths if p != b and not (p.startswith("reference") and b != "reference")]
    rows = []
    for size, batch in configs:
        for stage in ("encode", "decode", "encode+decode"):
            t = {p: times[(p, size, batch, stage)] for p in paths}
            best = {p: min(v) for p, v in t.items()}
            med = {p: statistics.median(v) for p, v in t.items()}
            f = flops[(size, batch, stage)]
            row = [f"{size}x{size}", batch, stage] + [f"{best[p]:.3f}" for p in paths]
            for p, b in pairs:
                ratio = f"{best[b] / best[p]:.2f}x / {med[b] / med[p]:.2f}x"
                row.append(f"**{ratio.replace(' /', '** /', 1)}" if p.startswith("fast") else ratio)
            for p in ours:
                kind = peak_kind[p]
                row.append(f"{f / best[p] / peaks[kind]:.0%} / {f / best[p] / peak_range[kind][1]:.0%}")
            rows.append(row)
    timing = table(["size", "batch", "stage"] + [f"{p} s (best)" for p in paths]
                   + [f"{p} vs {b} (best / median)" for p, b in pairs]
                   + [f"{p} % {peak_kind[p]} peak (max / median)" for p in ours], rows)
    memory = table(["path", "peak RSS (GiB)"], [[p, f"{rss[p] / 2**30:.2f}"] for p in paths])
    quality = table(["size", "batch", "path", "semantic idx = ref", "pixel idx = ref", "PSNR vs ref (dB)",
                     "max abs diff"], _compare(work, configs, paths))
    spread = ", ".join(f"{k} {lo / 1e9:,.0f} / {mid / 1e9:,.0f} / {hi / 1e9:,.0f}"
                       for k, (lo, mid, hi) in peak_range.items())
    report = (f"Machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 matrix support: "
              f"{_bf16_support()}; {rounds} interleaved rounds, {args.threads} threads\n\n"
              f"GEMM peak (GFLOP/s; min / median / max of {len(measured_peaks['fp32'])} measurements, one after each "
              f"path's timings): {spread}. The % columns use the max and the median, of bf16's peak for a path "
              "whose plan converted a stage and of float32's otherwise; FLOPs are counted as direct convolutions and "
              "matrix products compute them (Winograd convolutions do fewer multiplications, so a path using them can "
              "read above 100%).\n\n"
              f"{timing}\n\n{memory}\n\n{quality}\n")
    profiled = [o for o in outs if o.get("profiles")]
    if profiled:
        report += ("\nTop operators by self CPU time (s, calls), one more call of each stage under torch.profiler "
                   "in the first round; the profiler's own overhead is included.\n\n"
                   + _profile_tables(profiled, args.top))
    emit_report(report, args.output)


def _profile_tables(outs: list[dict], top: int) -> str:
    """One Markdown table per configuration and stage: the operators in any path's top ``top``, the slowest (in any
    path) first, with each path's self CPU seconds and calls, and every operator's total."""
    from _common import table  # (main put this folder on the path)

    paths = [o["path"] for o in outs]
    parts = []
    for k, first in enumerate(outs[0]["profiles"]):
        for stage in ("encode", "decode"):
            per_path = {o["path"]: o["profiles"][k][stage] for o in outs}
            names = {name for prof in per_path.values() for name in prof["ops"]}
            order = sorted(names, key=lambda n: -max(p["ops"].get(n, [0.0])[0] for p in per_path.values()))[:top]
            rows = [[f"`{name}`"] + [f"{per_path[p]['ops'][name][0]:.2f} ({per_path[p]['ops'][name][1]})"
                                     if name in per_path[p]["ops"] else "-" for p in paths] for name in order]
            rows.append(["all operators"] + [f"{per_path[p]['total']:.2f}" for p in paths])
            parts.append(f"{first['size']}x{first['size']}, batch {first['batch']}, {stage}:\n\n"
                         + table(["operator"] + paths, rows))
    return "\n\n".join(parts) + "\n"


def _flops(work: Path, configs: list) -> dict:
    """FLOPs of encode and decode per configuration, counted on our float32 model (one image, times the batch)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(HERE.parent))
    from dualvitok import DualViTok

    model = DualViTok.from_reference(str(work / "config.json"), str(work / "weights.safetensors")).eval()
    out = {}
    with torch.inference_mode():
        for size, batch in configs:
            x = _load_inputs(work, size, 1)
            counter = FlopCounterMode(display=False)
            with counter:
                enc = model.encode(x)
            f_enc = counter.get_total_flops() * batch
            counter = FlopCounterMode(display=False)
            with counter:
                model.decode_indices(enc.semantic_indices, enc.pixel_indices)
            f_dec = counter.get_total_flops() * batch
            out.update({(size, batch, "encode"): f_enc, (size, batch, "decode"): f_dec,
                        (size, batch, "encode+decode"): f_enc + f_dec})
    del model
    return out


if __name__ == "__main__":
    main()
