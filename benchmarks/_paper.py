"""Shared pieces of the paper-claim experiments (``benchmarks/paper_table*.py``).

Each experiment trains the registered ``dualvitok_tiny`` with the library's trainer (the shipped ``tiny_cpu`` recipe,
changed only where stated: crop size, step count, seed, and the ``model.overrides`` of the arm under test) on the
13 public-domain / CC0 photos of scikit-image (``builtin:skimage``), and evaluates on tiles of the 7 photos bundled in
``dualvitok/assets/images`` (from the ILLUME+ repository), which are never trained on. Everything runs on CPU with one
thread and fixed seeds, so a rerun on the same machine and torch version gives the same numbers.

The claims come from ILLUME+ (arXiv 2504.01934): Table 8 (SimVQ vs VQ), Table 9 (token-noise injection) and Table 6
(dual vs pixel-only tokenizer). At this scale (4.4 M parameters, a few hundred steps, 64x64 crops, a randomly
initialised semantic tower) they test the *direction* of a claim, not its size.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine
from PIL import Image

from dualvitok._utils import atomic_write
from dualvitok.metrics import DualCodebookUsage, psnr, ssim
from dualvitok.training import Trainer, load_train_config
from dualvitok.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
EVAL_DIR = REPO / "dualvitok" / "assets" / "images"
EVAL_SCALES = (128, 256)  # each held-out photo: short side resized to S, centre S x S crop, cut into tiles
QUICK_STEPS = 2


def parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The common command line: ``--quick``, ``--seeds``, ``--steps``, ``--resolution``, ``--output``, ``--work``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_STEPS} steps, one seed, 8 held-out tiles; writes to a temporary folder "
                        "unless --output is given")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per training run")
    p.add_argument("--resolution", type=int, default=64, help="training crop and evaluation tile size (multiple of 16)")
    p.add_argument("--output", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder, deleted)")
    return p


def resolve(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Apply ``--quick`` and pick the output / work folders.

    Finished runs are appended to ``<output>/.<name>.partial.jsonl`` and reused by a rerun with the same settings, so
    an interrupted experiment continues where it stopped; the file is removed once the results are written.
    """
    args.tmp = Path(tempfile.mkdtemp(prefix="dualvitok_paper_"))
    if args.quick:
        args.steps, args.seeds = QUICK_STEPS, args.seeds[:1]
        args.output = args.output or args.tmp / "results"
    args.output = args.output or RESULTS_DIR
    args.partial = args.output / f".{name}.partial.jsonl"
    args.work = args.work or args.tmp / "runs"
    args.command = "python " + " ".join([Path(sys.argv[0]).as_posix().split(str(REPO) + "/")[-1], *sys.argv[1:]])
    return args


def train_config(overrides: dict[str, Any], seed: int, steps: int, resolution: int) -> TrainConfig:
    """The ``tiny_cpu`` recipe with ``model.overrides`` updated by ``overrides`` (nested dicts merged)."""
    cfg = load_train_config("tiny_cpu")
    merged = copy.deepcopy(cfg.model.overrides)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    cfg.model.overrides = merged
    cfg.data.stages = (replace(cfg.data.stages[0], resolution=resolution),)
    cfg.run.seed = seed
    cfg.run.max_steps = steps
    cfg.run.checkpoint_every = 0  # one checkpoint at the end only
    cfg.run.sample_every = 0
    cfg.run.plot_every = 0
    cfg.run.log_every = 50
    cfg.run.threads = 1
    cfg.run.device = "cpu"
    return cfg


def train(cfg: TrainConfig, folder: Path) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train; returns the model in eval mode and training facts (wall time, mean L2 loss of the last 20 steps)."""
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.time()
    trainer = Trainer(cfg, folder, progress=False)
    trainer.train()
    wall = time.time() - t0
    records = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tail = records[-20:]
    model = trainer.model.eval()
    torch.set_num_threads(1)
    rec_tail = float(np.mean([r["rec_loss"] for r in tail]))
    return model, {"train_wall_s": round(wall, 1), "train_rec_loss_last20": rec_tail}


def heldout_tiles(tile: int = 64, scales: tuple[int, ...] = EVAL_SCALES, limit: int | None = None) -> torch.Tensor:
    """Tiles of the bundled held-out photos: ``[N, 3, tile, tile]`` in [-1, 1] (N = 7 * sum((S/tile)^2))."""
    paths = sorted(p for p in EVAL_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(f"no held-out photos in {EVAL_DIR}")
    tiles = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        for s in scales:
            w, h = image.size
            scale = s / min(w, h)
            resized = image.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
            left, top = (resized.width - s) // 2, (resized.height - s) // 2
            array = np.asarray(resized.crop((left, top, left + s, top + s)), dtype=np.float32) / 127.5 - 1.0
            x = torch.from_numpy(array).permute(2, 0, 1)  # [3, s, s]
            for i in range(0, s - tile + 1, tile):
                for j in range(0, s - tile + 1, tile):
                    tiles.append(x[:, i:i + tile, j:j + tile])
    out = torch.stack(tiles)
    return out[:limit] if limit else out


def corrupt_key(fraction: float) -> str:
    """Result key of a corruption fraction: ``0.05 -> 'corrupt_5pct'``."""
    return f"corrupt_{round(fraction * 100)}pct"


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) / 2).float()


@torch.no_grad()
def evaluate(model, images: torch.Tensor, corrupt: tuple[float, ...] = (), seed: int = 1234,
             batch: int = 28) -> dict[str, Any]:
    """Held-out PSNR/SSIM, codebook usage, and quality when a fraction of pixel tokens is replaced at decode time.

    A corrupted token gets a code drawn uniformly from the other ``K - 1`` codes (as an autoregressive model's wrong
    token would); exactly ``round(fraction * tokens)`` positions per image, drawn with a fixed ``seed``.
    """
    usage = DualCodebookUsage.for_model(model)
    psnrs: dict[float, list[torch.Tensor]] = {f: [] for f in (0.0, *corrupt)}
    ssims: dict[float, list[torch.Tensor]] = {f: [] for f in (0.0, *corrupt)}
    generator = torch.Generator().manual_seed(seed)
    k = model.pixel_quantizer.codebook_size
    for b in range(0, len(images), batch):
        x = images[b:b + batch]
        enc = model.encode(x)
        usage.update(enc)
        target = _to01(x)
        for fraction in psnrs:
            pix = enc.pixel_indices.clone()
            if fraction > 0:
                flat = pix.view(pix.shape[0], -1)
                n = round(fraction * flat.shape[1])
                for row in flat:
                    where = torch.randperm(flat.shape[1], generator=generator)[:n]
                    shift = torch.randint(1, k, (n,), generator=generator)
                    row[where] = (row[where] + shift) % k  # always a different code
            recon = _to01(model.decode_indices(enc.semantic_indices, pix))
            psnrs[fraction].append(psnr(recon, target))
            ssims[fraction].append(ssim(recon, target))
    out: dict[str, Any] = {"usage": usage.to_dict(), "images": len(images)}
    for fraction in psnrs:
        key = "clean" if fraction == 0 else corrupt_key(fraction)
        out[key] = {"psnr": float(torch.cat(psnrs[fraction]).mean()), "ssim": float(torch.cat(ssims[fraction]).mean())}
    return out


def run_arm(name: str, overrides: dict[str, Any], args: argparse.Namespace, images: torch.Tensor,
            corrupt: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """Train and evaluate one arm for every seed; one record per seed."""
    records = []
    done = {}
    if args.partial.is_file():
        for line in args.partial.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            done[(r["arm"], r["seed"], r["steps"], r["resolution"], len(images))] = r
    for seed in args.seeds:
        key = (name, seed, args.steps, args.resolution, len(images))
        if key in done:
            print(f"reusing {name} seed {seed} from {args.partial}", flush=True)
            records.append(done[key])
            continue
        cfg = train_config(overrides, seed, args.steps, args.resolution)
        model, facts = train(cfg, args.work / f"{name}-seed{seed}")
        grids = model.grid_sizes(args.resolution, args.resolution)
        tokens = {"semantic": math.prod(grids[0]), "pixel": math.prod(grids[1])}
        bits = (tokens["semantic"] * math.log2(model.semantic_quantizer.codebook_size)
                + tokens["pixel"] * math.log2(model.pixel_quantizer.codebook_size))
        record = {"arm": name, "seed": seed, "steps": args.steps, "resolution": args.resolution,
                  "overrides": overrides, **facts, "tokens_per_image": tokens,
                  "bits_per_image": bits, **evaluate(model, images, corrupt)}
        print(json.dumps({k: record[k] for k in ("arm", "seed", "train_wall_s", "train_rec_loss_last20", "clean")}),
              flush=True)
        records.append(record)
        args.output.mkdir(parents=True, exist_ok=True)
        with open(args.partial, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shutil.rmtree(args.work / f"{name}-seed{seed}", ignore_errors=True)
    return records


def get(record: dict[str, Any], path: str) -> float:
    """``get(r, "usage.pixel.utilisation")``."""
    value: Any = record
    for part in path.split("."):
        value = value[part]
    return float(value)


def values(records: list[dict[str, Any]], arm: str, path: str) -> list[float]:
    return [get(r, path) for r in records if r["arm"] == arm]


def summary(vals: list[float], digits: int = 2) -> str:
    """``mean [min, max]`` over seeds (just the value for one seed)."""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} [{min(vals):.{digits}f}, {max(vals):.{digits}f}]"


def verdict(claimed_better: list[float], other: list[float], higher_is_better: bool = True) -> str:
    """'holds (every seed)' if the claimed-better arm's worst seed beats the other's best, 'mean only' if only the
    means agree with the claim, else 'does not hold'."""
    sign = 1.0 if higher_is_better else -1.0
    a, b = [sign * v for v in claimed_better], [sign * v for v in other]
    if min(a) > max(b):
        return "holds (every seed)"
    if np.mean(a) > np.mean(b):
        return "mean only (seeds overlap)"
    return "does not hold"


def write_results(name: str, args: argparse.Namespace, markdown: str, records: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> Path:
    """``<output>/<name>.md`` (the table and its notes) and ``<name>.json`` (every per-seed record), atomically."""
    args.output.mkdir(parents=True, exist_ok=True)
    meta = {"command": args.command, "date": datetime.date.today().isoformat(), "machine": machine(),
            "steps": args.steps, "seeds": args.seeds, "resolution": args.resolution, "quick": bool(args.quick),
            "train_data": "builtin:skimage (13 photos)",
            "eval_data": f"dualvitok/assets/images (7 photos), scales {list(EVAL_SCALES)}, {args.resolution}px tiles"}
    header = (f"Command: `{meta['command']}` ({meta['date']}; {meta['machine']}; {args.steps} steps per run, seeds "
              f"{args.seeds}, {args.resolution}x{args.resolution} crops).\n\n")
    md_path = args.output / f"{name}.md"
    with atomic_write(md_path) as tmp:
        tmp.write_text(markdown.replace("{HEADER}", header), encoding="utf-8")
    with atomic_write(args.output / f"{name}.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, **(extra or {}), "runs": records}, indent=1) + "\n",
                       encoding="utf-8")
    print(markdown.replace("{HEADER}", header))
    print(f"wrote {md_path} and {name}.json")
    shutil.rmtree(args.tmp / "runs", ignore_errors=True)
    args.partial.unlink(missing_ok=True)
    return md_path
