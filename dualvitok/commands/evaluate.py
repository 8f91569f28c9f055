"""``dualvitok evaluate``: reconstruction metrics of a tokenizer over a folder of images.

With no arguments it evaluates the bundled demo model on the bundled sample photos, offline. rFID and LPIPS need
network weights (pytorch-fid's Inception, torchvision's VGG16/AlexNet); by default they are computed when the weights
are found locally and skipped with a note otherwise. Runs under ``torchrun`` for large sets and resumes with
``--resume``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

AUTO_METRICS = ("psnr", "ssim", "ssim_reference_inflated", "usage", "lpips", "rfid")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..evaluation.protocols import PROTOCOLS

    p = subparsers.add_parser(
        "evaluate", help="rFID, PSNR, SSIM, LPIPS and codebook usage of reconstructions",
        description="Evaluate a DualViTok's reconstructions. Without arguments: the bundled demo model on the bundled "
                    "sample photos. Writes results.json, results.md and grid.png into --output.")
    p.add_argument("--model", default=None, help="folder saved with save_pretrained, Hub repo id, or registered name "
                                                 "(default: the bundled demo model)")
    p.add_argument("--data", default=None, help="folder of images, searched recursively (default: bundled samples)")
    p.add_argument("--protocol", default="imagenet256", choices=sorted(PROTOCOLS),
                   help="imagenet256: shorter side 256 + centre crop (as ILLUME+); native: sizes rounded to 16")
    p.add_argument("--max-pixels", type=int, default=None, help="area cap of the native protocol (default 512*512)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N files (sorted by path)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--output", default="dualvitok_eval", help="output folder (default: ./dualvitok_eval)")
    p.add_argument("--metrics", default="auto",
                   help="comma list of psnr,ssim,ssim_reference_inflated,lpips,rfid,usage; 'auto' (default): all, "
                        "skipping lpips/rfid with a note when their weights are not available offline")
    p.add_argument("--lpips-net", default="vgg", choices=("vgg", "alex"), help="LPIPS backbone (default vgg)")
    p.add_argument("--lpips-weights", default=None, help="torchvision vgg16-397923af.pth / alexnet-owt-7be5be79.pth")
    p.add_argument("--fid-weights", default=None, help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--download-weights", action="store_true",
                   help="download missing LPIPS/Inception weights into the torch hub cache (needs internet)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="float32 (the reference numerics, default) or bfloat16 autocast via "
                        "dualvitok.inference.optimize_for_inference (faster; recorded in results.json)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading images")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run saved in --output")
    p.add_argument("--grid", type=int, default=8, help="image pairs in grid.png (0: none)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="save resume state every N batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if "LOCAL_RANK" in os.environ and device.index is None:  # one GPU per torchrun process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _load_model(spec: str | None, device: torch.device):
    from ..loading import load_model

    if spec is None:
        from ..assets import DEMO_MODEL_DIR

        try:
            return load_model(None, device=device), "demo (bundled)"
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


def _select_metrics(args, device: torch.device) -> tuple[list[str], dict, list[str]]:
    """Metric names, the networks they need, and notes about skipped ones."""
    from ..metrics.lpips import BACKBONES
    from ..metrics.weights import FID_INCEPTION, WeightsNotFoundError

    auto = args.metrics == "auto"
    names = list(AUTO_METRICS) if auto else [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(names) - set(AUTO_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(AUTO_METRICS)} or 'auto'")
    nets, notes = {}, []
    if "lpips" in names:
        from ..metrics.lpips import LPIPS

        try:
            nets["lpips_model"] = LPIPS.from_pretrained(args.lpips_net, args.lpips_weights, args.download_weights)
            nets["lpips_name"] = f"lpips_{args.lpips_net}"
        except (WeightsNotFoundError, ImportError) as e:
            if not auto:
                raise
            names.remove("lpips")
            logger.warning("LPIPS skipped: %s", e)
            notes.append(f"LPIPS skipped: {_short_reason(e, BACKBONES[args.lpips_net])}; pass --lpips-weights PATH "
                         "or --download-weights")
    if "rfid" in names:
        from ..metrics.inception import InceptionFeatures

        try:
            nets["fid_extractor"] = InceptionFeatures.from_pretrained(args.fid_weights, args.download_weights)
        except (WeightsNotFoundError, ImportError) as e:
            if not auto:
                raise
            names.remove("rfid")
            logger.warning("rFID skipped: %s", e)
            notes.append(f"rFID skipped: {_short_reason(e, FID_INCEPTION)}; pass --fid-weights PATH or "
                         "--download-weights")
    return names, nets, notes


def run(args: argparse.Namespace) -> int:
    from ..assets import sample_images
    from ..evaluation import Evaluator, get_protocol, markdown_table, scan_folder, write_reports

    device = _device(args.device)
    protocol = get_protocol(args.protocol, max_pixels=args.max_pixels)
    if args.data is None:
        files, data_name = sample_images()[: args.limit], "bundled sample photos (dualvitok/assets/images)"
    else:
        files, data_name = scan_folder(args.data, args.limit), str(args.data)
    model, model_name = _load_model(args.model, device)
    if args.dtype == "bfloat16":
        from ..inference import optimize_for_inference

        model = optimize_for_inference(model, dtype=torch.bfloat16)
    metrics, nets, notes = _select_metrics(args, device)
    evaluator = Evaluator(model, protocol, metrics, batch_size=args.batch_size, device=device,
                          num_workers=args.workers, output_dir=args.output, resume=args.resume, grid_images=args.grid,
                          checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                          model_name=model_name, data_name=data_name, dtype_name=args.dtype, **nets)
    result = evaluator.run(files)
    result.notes = notes + result.notes
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        paths = write_reports(result, args.output)
        print(markdown_table(result), end="")
        print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0
