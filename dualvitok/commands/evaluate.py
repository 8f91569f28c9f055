"""``dualvitok evaluate``: reconstruction metrics of a tokenizer over a folder of images.

With no arguments it evaluates the bundled demo model on the bundled sample photos, offline. rFID and LPIPS need
network weights (the FID backend's Inception, torchvision's VGG16/AlexNet); by default they are computed when the
weights are found locally and skipped with a note otherwise. Runs under ``torchrun`` for large sets (this command
owns the process group from start to end) and resumes with ``--resume``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch

from . import _args

logger = logging.getLogger(__name__)

AUTO_METRICS = ("psnr", "ssim", "ssim_reference_inflated", "usage", "lpips", "rfid")
DEFAULT_OUTPUT = "dualvitok_eval"  # listed in the repository's .gitignore
RESULT_FILES = ("results.json", "results.md", "per_image.jsonl", "grid.png", "fid_stats_originals.npz",
                "fid_stats_reconstructions.npz", "codebook_histograms.npz")


class _DeprecatedWorkers(argparse.Action):
    """``--workers N``: the old name of ``--num-workers`` (hidden; warns)."""

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning("--workers is deprecated; use --num-workers")
        namespace.num_workers = values


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..evaluation.protocols import PROTOCOLS
    from ..metrics.fid_backends import FID_BACKENDS

    p = subparsers.add_parser(
        "evaluate", help="rFID, PSNR, SSIM, LPIPS and codebook usage of reconstructions",
        description="Evaluate a DualViTok's reconstructions. Without arguments: the bundled demo model on the bundled "
                    "sample photos. Writes results.json, results.md, per_image.jsonl and grid.png into --output.")
    _args.add_model(p, default="demo")
    p.add_argument("--data", default=None,
                   help="folder of images, searched recursively (default: the bundled sample photos)")
    p.add_argument("--protocol", default="imagenet256", choices=sorted(PROTOCOLS),
                   help="imagenet256: shorter side 256 + centre crop (as ILLUME+); native: sizes rounded to 16 "
                        "(default: imagenet256)")
    p.add_argument("--max-pixels", type=_args.positive_int, default=None,
                   help="area cap of the native protocol (default: 512*512)")
    p.add_argument("--limit", type=_args.non_negative_int, default=None,
                   help="evaluate only the first N files, sorted by path (default: all)")
    _args.add_batch_size(p, 8)
    _args.add_device(p)
    _args.add_default_malloc(p)
    _args.add_output(p, DEFAULT_OUTPUT, help="output folder (a relative default: ./dualvitok_eval)")
    p.add_argument("--metrics", default="auto",
                   help="comma list of psnr,ssim,ssim_reference_inflated,lpips,rfid,usage; 'auto' (default): all, "
                        "skipping lpips/rfid with a note when their weights are not available offline")
    p.add_argument("--lpips-net", default="vgg", choices=("vgg", "alex"), help="LPIPS backbone (default: vgg)")
    p.add_argument("--lpips-weights", default=None,
                   help="torchvision vgg16-397923af.pth / alexnet-owt-7be5be79.pth (default: looked up locally)")
    p.add_argument("--fid-backend", default="pytorch-fid", choices=FID_BACKENDS,
                   help="rFID convention: pytorch-fid, torch-fidelity (ILLUME+'s; extra 'fidelity') or clean-fid "
                        "(extra 'cleanfid') (default: pytorch-fid)")
    p.add_argument("--fid-weights", default=None,
                   help="the backend's Inception file: pt_inception-2015-12-05-6726825d.pth (pytorch-fid), "
                        "weights-inception-2015-12-05-6726825d.pth (torch-fidelity), inception-2015-12-05.pt "
                        "(clean-fid) (default: looked up locally)")
    p.add_argument("--download-weights", action="store_true",
                   help="download missing LPIPS/Inception weights into the torch hub cache (needs internet; "
                        "a failed download is an error) (default: off)")
    _args.add_dtype(p, "float32", help="float32 (the reference numerics) or bfloat16/float16 via "
                                       "dualvitok.inference.optimize_for_inference (faster; recorded in results.json)")
    _args.add_num_workers(p, 0)
    p.add_argument("--workers", type=_args.non_negative_int, action=_DeprecatedWorkers, help=argparse.SUPPRESS)
    _args.add_resume(p)
    p.add_argument("--grid", type=_args.non_negative_int, default=8,
                   help="image pairs in grid.png, 0 for none (default: 8)")
    p.add_argument("--checkpoint-every", type=_args.positive_int, default=50,
                   help="save resume state every N batches (default: 50)")
    _args.add_progress(p)
    options = [(a.option_strings[0], a.dest, a.default, a.nargs == 0) for a in p._actions
               if a.option_strings and a.dest not in ("help", "resume", "overwrite") and a.help != argparse.SUPPRESS]
    p.set_defaults(func=run, _evaluate_options=options)
    return p


def resume_command(args: argparse.Namespace) -> str:
    """The ``dualvitok evaluate ... --resume`` command that continues this run (non-default options only)."""
    parts = ["dualvitok", "evaluate"]
    for flag, dest, default, is_switch in getattr(args, "_evaluate_options", []):
        value = getattr(args, dest, default)
        if value == default:
            continue
        parts += [flag] if is_switch else [flag, str(value)]
    return shlex.join(parts + ["--resume"])


def _load_model(spec: str | None, device: torch.device):
    from ..loading import load_model

    if spec in (None, "demo"):
        from ..assets import DEMO_MODEL_DIR

        try:
            return load_model("demo", device=device), "demo (bundled)"
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"`dualvitok evaluate` without --model evaluates the bundled demo model, which this installation does "
                f"not have yet ({DEMO_MODEL_DIR} needs config.json + model.safetensors, made by the demo training). "
                f"Pass --model with a folder saved by DualViTok.save_pretrained, a Hub repo id, or a registered name "
                f"(e.g. --model dualvitok_tiny for random weights). [{e}]") from e
    return load_model(spec, device=device), str(spec)


def _short_reason(error: Exception, spec) -> str:
    if isinstance(error, ImportError):
        return f"a package is missing ({error})"
    return f"weights {spec.filename} not found locally"


def _select_metrics(args) -> tuple[list[str], dict, list[str]]:
    """Metric names, the networks they need (Evaluator keywords), and notes about skipped ones."""
    from ..metrics.fid_backends import WEIGHTS, build_fid_backend
    from ..metrics.lpips import BACKBONES
    from ..metrics.weights import WeightsNotFoundError

    auto = args.metrics == "auto"
    names = list(AUTO_METRICS) if auto else [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(names) - set(AUTO_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(AUTO_METRICS)} or 'auto'")

    def may_skip(error: Exception, explicit_choice: bool = False) -> bool:
        if not auto or explicit_choice:
            return False
        return not (args.download_weights and isinstance(error, WeightsNotFoundError))  # a failed download: error

    nets, notes = {}, []
    if "lpips" in names:
        from ..metrics.lpips import LPIPS

        try:
            nets["lpips_model"] = LPIPS.from_pretrained(args.lpips_net, args.lpips_weights, args.download_weights)
            nets["lpips_name"] = f"lpips_{args.lpips_net}"
        except (WeightsNotFoundError, ImportError) as e:
            if not may_skip(e):
                raise
            names.remove("lpips")
            logger.warning("LPIPS skipped: %s", e)
            notes.append(f"LPIPS skipped: {_short_reason(e, BACKBONES[args.lpips_net])}; pass --lpips-weights PATH "
                         "or --download-weights")
    if "rfid" in names:
        try:
            nets["fid_backend"] = build_fid_backend(args.fid_backend, args.fid_weights, args.download_weights)
        except (WeightsNotFoundError, ImportError) as e:
            if not may_skip(e, explicit_choice=isinstance(e, ImportError) and args.fid_backend != "pytorch-fid"):
                raise
            names.remove("rfid")
            logger.warning("rFID skipped: %s", e)
            notes.append(f"rFID skipped: {_short_reason(e, WEIGHTS[args.fid_backend])}; pass --fid-weights PATH or "
                         "--download-weights")
    return names, nets, notes


def _prepare_output(args, rank: int, is_main: bool) -> None:
    """Refuse to silently discard an unfinished run; ``--overwrite`` deletes what an earlier run left."""
    from ..evaluation.state import saved_run_complete

    out = Path(args.output)
    state_dir = out / "state"
    if args.overwrite:
        if is_main:
            for name in RESULT_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "samples", ignore_errors=True)
        for stale in state_dir.glob(f"*rank{rank}.*") if state_dir.is_dir() else ():
            stale.unlink(missing_ok=True)
        return
    if not args.resume and saved_run_complete(state_dir, rank) is False:
        raise ValueError(f"{out} holds an unfinished evaluation; continue it with --resume "
                         f"(e.g. {resume_command(args)}) or start over with --overwrite")


def run(args: argparse.Namespace) -> int:
    from .._utils.distributed import init_distributed, shutdown_distributed
    from .._utils.locking import output_lock
    from ..devices import resolve_device

    device = resolve_device(args.device)
    info = init_distributed(device)  # owned by this command from here to the end
    try:
        if device.type == "cuda" and device.index is None and info.enabled:
            device = torch.device("cuda", info.local_rank)  # one GPU per torchrun process
        with output_lock(args.output, "evaluate", info.rank):
            return _run(args, device, info)
    except KeyboardInterrupt:
        if info.is_main:
            how = "rerun the same torchrun command with --resume" if info.enabled else "resume with"
            print(f"dualvitok evaluate: interrupted; the progress is saved in {args.output}; {how}:\n"
                  f"  {resume_command(args)}", file=sys.stderr)
        raise
    finally:
        shutdown_distributed(info)


def _run(args: argparse.Namespace, device: torch.device, info) -> int:
    from .._utils.distributed import barrier
    from .._utils.io import json_path
    from ..assets import sample_images
    from ..evaluation import EvaluationSettings, Evaluator, get_protocol, markdown_table, scan_folder, write_reports

    _prepare_output(args, info.rank, info.is_main)
    protocol = get_protocol(args.protocol, max_pixels=args.max_pixels)
    if args.data is None:
        files = sample_images()
        files = files[: args.limit] if args.limit is not None else files
        data_name = "bundled sample photos (dualvitok/assets/images)"
    else:
        files, data_name = scan_folder(args.data, args.limit), json_path(os.fspath(args.data))
    model, model_name = _load_model(args.model, device)
    if args.dtype != "float32":
        from ..inference import agree_on_kernels, agree_on_low_precision, optimize_for_inference

        agree_on_low_precision(_args.dtype_of(args.dtype), device)  # under torchrun: rank 0's measured bf16 speedup
        model = optimize_for_inference(model, dtype=_args.dtype_of(args.dtype),
                                       keep_freed_memory=not args.default_malloc)
        agree_on_kernels(model)  # under torchrun: rank 0's kernel choices on every rank
    metrics, nets, notes = _select_metrics(args)
    settings = EvaluationSettings(
        protocol, batch_size=args.batch_size, device=device, num_workers=args.num_workers, output_dir=args.output,
        resume=args.resume, grid_images=args.grid, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress, model_name=json_path(model_name), data_name=data_name, dtype_name=args.dtype,
        lock_output=False)  # the lock is held by run() for the whole command
    result = Evaluator(model, settings, metrics, **nets).run(files)
    result.notes = notes + result.notes
    if info.is_main:
        paths = write_reports(result, args.output)
        print(markdown_table(result), end="")
        print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    barrier()
    return 0
