"""An evaluation's result and the files it is written to: ``results.json``, ``results.md``, ``per_image.jsonl``,
``grid.png`` and the metrics' statistics files.

Files written into the output folder (each atomically, by :func:`write_reports`):

* ``results.json``: every metric (mean and standard deviation over images), rFID and its backend, codebook usage of
  both codebooks, the protocol, the model, the library version, the image count, skipped files with reasons,
  converted modes, notes, settings;
* ``results.md``: the same headline numbers as one Markdown table row (plus notes);
* ``per_image.jsonl``: one line per evaluated image: ``file``, ``size`` (H, W of the file), ``evaluated_size``,
  and its per-image metrics (``psnr``, ``ssim``, ``ssim_reference_inflated``, ``lpips_<net>`` when computed);
* ``grid.png``: originals (left) beside reconstructions (right) for the first images, each row labelled with the file
  name and its PSNR;
* ``fid_stats_originals.npz`` / ``fid_stats_reconstructions.npz``: pytorch-fid compatible statistics, reusable with
  ``python -m pytorch_fid a.npz b.npz``;
* ``codebook_histograms.npz``: per-code counts of both codebooks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .._utils import atomic_write, json_path
from ..metrics.fid import GaussianStatistics
from ..metrics.usage import DualCodebookUsage
from ..version import __version__

COLUMNS = (  # (key in metrics, header, format)
    ("rfid", "rFID ↓", "{:.3f}"),
    ("psnr", "PSNR ↑", "{:.2f}"),
    ("ssim", "SSIM ↑", "{:.4f}"),
    ("ssim_reference_inflated", "SSIM (ref., inflated)", "{:.4f}"),
    ("lpips_vgg", "LPIPS-VGG ↓", "{:.4f}"),
    ("lpips_alex", "LPIPS-Alex ↓", "{:.4f}"),
)


def json_safe(obj):
    """Non-finite floats -> ``None``/``"inf"``/``"-inf"``; file names -> JSON-safe strings; recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, str):
        return json_path(obj)
    if isinstance(obj, Path):
        return json_path(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


@dataclass
class EvaluationResult:
    """Everything ``results.json`` holds, plus the objects behind the statistics files."""

    metrics: dict[str, float]  # name -> mean over images (rfid: the distance)
    metrics_std: dict[str, float]
    codebook_usage: dict
    num_images: int
    num_files: int
    skipped: list[dict]
    converted: dict[str, int]
    protocol: dict
    model: str
    data: str
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    fid_real: GaussianStatistics | None = None  # features of the originals (not in to_dict)
    fid_fake: GaussianStatistics | None = None  # features of the reconstructions
    usage: DualCodebookUsage | None = None  # histograms of both codebooks
    fid_backend: str | None = None  # "pytorch-fid", "torch-fidelity", "clean-fid" or "custom"
    per_image: list[dict] = field(default_factory=list)  # per_image.jsonl records (not in to_dict)
    metric_objects: list = field(default_factory=list, repr=False)  # their write_artifacts files

    def to_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s["reason"].split(":")[0].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        out = {
            "library": "dualvitok", "version": __version__, "model": self.model, "data": self.data,
            "protocol": self.protocol, "num_images": self.num_images, "num_files": self.num_files,
            "metrics": self.metrics, "metrics_std": self.metrics_std, "codebook_usage": self.codebook_usage,
            "skipped": {"count": len(self.skipped), "by_reason": reasons, "files": self.skipped},
            "converted": self.converted, "notes": self.notes, "settings": self.settings,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.num_images / self.elapsed_s, 3) if self.elapsed_s > 0 else None,
        }
        if self.fid_backend is not None:
            out["fid_backend"] = self.fid_backend
        return out


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
    if result.fid_backend is not None and "rfid" in result.metrics:
        extra.append(f"rFID convention: {result.fid_backend}.")
    extra += result.notes
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in extra) if extra else "") + "\n"


LABEL_HEIGHT = 16


def tile_label(record: dict | None) -> str:
    """``"a/photo.jpg  PSNR 21.37 dB"`` for a per-image record (the file name only when PSNR is not computed)."""
    if record is None:
        return ""
    text = os.path.basename(record["file"])
    psnr = record.get("psnr")
    if isinstance(psnr, (int, float)):
        text += f"  PSNR {psnr:.2f} dB" if math.isfinite(psnr) else "  PSNR inf"
    return text


def make_grid(pairs: list[Path], row_height: int = 192, labels: list[str] | None = None) -> Image.Image:
    """Stack original|reconstruction pair images vertically, each scaled to ``row_height`` and left-aligned.

    With ``labels``, each row gets a ``LABEL_HEIGHT`` px caption above it (file name and PSNR).
    """
    rows = []
    for p in pairs:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w = max(1, round(im.width * row_height / im.height))
            rows.append(im.resize((w, row_height), Image.BICUBIC))
    label_h = LABEL_HEIGHT if labels is not None else 0
    step = row_height + label_h
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, step * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, r in enumerate(rows):
        grid.paste(r, (0, i * step + label_h))
        if labels is not None:
            draw.text((2, i * step + 2), labels[i], fill=(0, 0, 0), font=font)
    return grid


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def write_reports(result: EvaluationResult, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write all result files into ``output_dir``; returns their paths by kind."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    _write_text(paths["json"], json.dumps(json_safe(result.to_dict()), indent=2, allow_nan=False) + "\n")
    _write_text(paths["markdown"], markdown_table(result))
    if result.per_image:
        paths["per_image"] = out / "per_image.jsonl"
        fields = [{k: v for k, v in r.items() if k != "index"} for r in result.per_image]
        _write_text(paths["per_image"], "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in fields))
    pairs = sorted((out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    pairs = [p for p in pairs if not p.name.startswith(".") and p.stem.isdigit()]
    if pairs:
        by_index = {r["index"]: r for r in result.per_image}
        labels = [tile_label(by_index.get(int(p.stem))) for p in pairs]
        paths["grid"] = out / "grid.png"
        with atomic_write(paths["grid"]) as tmp:
            make_grid(pairs, labels=labels).save(tmp, format="PNG")
    for metric in result.metric_objects:
        paths.update(metric.write_artifacts(out))
    if not result.metric_objects:  # a result built by hand: its statistics objects
        if result.fid_real is not None and result.fid_real.count >= 2:
            paths["fid_originals"] = result.fid_real.save(out / "fid_stats_originals.npz")
            paths["fid_reconstructions"] = result.fid_fake.save(out / "fid_stats_reconstructions.npz")
        if result.usage is not None:
            paths["histograms"] = result.usage.save_histograms(out / "codebook_histograms.npz")
    return paths
