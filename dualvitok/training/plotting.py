"""Loss-curve PNG and reconstruction grids, drawn with Pillow (no plotting library needed).

``plot_loss_curve`` reads ``metrics.jsonl`` records and draws each requested key against ``step`` (raw
values faint, a moving average solid) with axes labels; files are written atomically.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .._utils import save_image
from .._utils.io import image_grid

__all__ = ["plot_loss_curve", "save_image_grid", "save_png_atomic"]

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PNG atomically (the package's one image writer, :func:`dualvitok._utils.save_image`)."""
    save_image(image, path, format="PNG")


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < 2 or window <= 1:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_loss_curve(records: list[dict], path: str | os.PathLike, keys: tuple[str, ...] = ("loss", "rec_loss"),
                    size: tuple[int, int] = (800, 480), log_y: bool = True) -> None:
    """Draw ``keys`` of ``records`` (dicts with ``step``) to a PNG at ``path``."""
    width, height = size
    margin_l, margin_r, margin_t, margin_b = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    series = []
    for key in keys:
        floor = 0 if log_y else -1e30
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] > floor]
        if pts:
            series.append((key, np.array(pts, dtype=np.float64)))
    if not series:
        draw.text((margin_l, height // 2), "no data yet", fill="black")
        save_png_atomic(img, path)
        return
    xs = np.concatenate([s[:, 0] for _, s in series])
    ys = np.concatenate([s[:, 1] for _, s in series])
    tf = np.log10 if log_y else (lambda v: v)
    x0, x1 = float(xs.min()), float(max(xs.max(), xs.min() + 1))
    y0, y1 = float(tf(ys).min()), float(tf(ys).max())
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_px(x, y):
        px = margin_l + (x - x0) / (x1 - x0) * (width - margin_l - margin_r)
        py = height - margin_b - (tf(y) - y0) / (y1 - y0) * (height - margin_t - margin_b)
        return px, py

    draw.rectangle([margin_l, margin_t, width - margin_r, height - margin_b], outline="black")
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        py = height - margin_b - frac * (height - margin_t - margin_b)
        draw.text((5, py - 6), label, fill="black")
        xv = x0 + frac * (x1 - x0)
        px = margin_l + frac * (width - margin_l - margin_r)
        draw.text((px - 10, height - margin_b + 5), f"{xv:.0f}", fill="black")
    draw.text((width // 2 - 15, height - 18), "step", fill="black")
    for i, (key, s) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        faint = tuple(int(c + (255 - c) * 0.7) for c in color)
        raw = [to_px(x, y) for x, y in s]
        smooth = [to_px(x, y) for x, y in zip(s[:, 0], _smooth(s[:, 1], max(1, len(s) // 50)), strict=True)]
        if len(raw) > 1:
            draw.line(raw, fill=faint, width=1)
            draw.line(smooth, fill=color, width=2)
        else:
            draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill=color)
        draw.text((margin_l + 10 + 150 * i, 8), key + (" (log)" if log_y else ""), fill=color)
    save_png_atomic(img, path)


def save_image_grid(rows: list[Tensor], path: str | os.PathLike) -> None:
    """Save rows of images ``[B, 3, H, W]`` in [-1, 1] (e.g. inputs, reconstructions) as one PNG grid."""
    save_png_atomic(image_grid(rows), path)
