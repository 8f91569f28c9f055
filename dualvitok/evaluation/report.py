"""Writing an evaluation's results: ``results.json``, ``results.md`` (a Markdown table), ``grid.png`` and statistics.

Files written into the output folder (each atomically):

* ``results.json``: every metric (mean and standard deviation over images), rFID, codebook usage of both codebooks,
  the protocol, the model, the library version, the image count, skipped files with reasons, converted modes, notes;
* ``results.md``: the same headline numbers as one Markdown table row (plus notes);
* ``grid.png``: originals (left) beside reconstructions (right) for the first images;
* ``fid_stats_originals.npz`` / ``fid_stats_reconstructions.npz``: pytorch-fid compatible statistics, reusable with
  ``python -m pytorch_fid a.npz b.npz``;
* ``codebook_histograms.npz``: per-code counts of both codebooks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image

from .._utils import atomic_write
from .runner import EvaluationResult
from .state import atomic_write_text

COLUMNS = (  # (key in metrics, header, format)
    ("rfid", "rFID ↓", "{:.3f}"),
    ("psnr", "PSNR ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("ssim_reference_inflated", "SSIM (ref., inflated)", "{:.4f}"),
    ("lpips_vgg", "LPIPS-VGG ↓", "{:.4f}"),
    ("lpips_alex", "LPIPS-Alex ↓", "{:.4f}"),
)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def markdown_table(result: EvaluationResult) -> str:
    """One-row Markdown table of the headline numbers (columns only for metrics that were computed)."""
    header = ["Model", "Protocol", "Images"]
    row = [result.model or "?", result.protocol["name"], str(result.num_images)]
    for key, title, fmt in COLUMNS:
        if key in result.metrics:
            v = result.metrics[key]
            header.append(title)
            row.append(fmt.format(v) if math.isfinite(v) else str(v))
    for name in ("semantic", "pixel"):
        u = result.codebook_usage.get(name)
        if u:
            header.append(f"{name.capitalize()} usage / ppl")
            row.append(f"{100 * u['utilisation']:.1f}% / {u['perplexity']:.1f}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
             "| " + " | ".join(row) + " |"]
    extra = []
    if result.skipped:
        extra.append(f"Skipped {len(result.skipped)} of {result.num_files} files (see results.json).")
    extra += result.notes
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in extra) if extra else "") + "\n"


def make_grid(pairs: list[Path], row_height: int = 192) -> Image.Image:
    """Stack original|reconstruction pair images vertically, each scaled to ``row_height`` and left-aligned."""
    rows = []
    for p in pairs:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w = max(1, round(im.width * row_height / im.height))
            rows.append(im.resize((w, row_height), Image.BICUBIC))
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, row_height * len(rows)), (255, 255, 255))
    for i, r in enumerate(rows):
        grid.paste(r, (0, i * row_height))
    return grid


def write_reports(result: EvaluationResult, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write all result files into ``output_dir``; returns their paths by kind."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_text(paths["json"], json.dumps(_json_safe(result.to_dict()), indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], markdown_table(result))
    pairs = sorted((out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    pairs = [p for p in pairs if not p.name.endswith(".tmp.png")]
    if pairs:
        paths["grid"] = out / "grid.png"
        with atomic_write(paths["grid"]) as tmp:
            make_grid(pairs).save(tmp, format="PNG")
    if result.fid_real is not None and result.fid_real.count >= 2:
        paths["fid_originals"] = result.fid_real.save(out / "fid_stats_originals.npz")
        paths["fid_reconstructions"] = result.fid_fake.save(out / "fid_stats_reconstructions.npz")
    if result.usage is not None:
        paths["histograms"] = result.usage.save_histograms(out / "codebook_histograms.npz")
    return paths
