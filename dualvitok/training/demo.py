"""Export a training run as the bundled demo model and measure its reconstruction quality on held-out photos.

``python -m dualvitok.training.demo RUN_DIR [--output dualvitok/assets/demo_model]`` loads
``RUN_DIR/final`` (written by the trainer with ``save_pretrained``), stores it in float16 with ``save_pretrained`` (the
loader casts back to the model's float32 parameters), and prints PSNR / SSIM of 256x256 center crops of the bundled
sample photos (``dualvitok/assets/images``, never used for training), for both the float32 and the stored weights.
PSNR and SSIM come from scikit-image on uint8 images (data range 255, SSIM with Gaussian weights, sigma 1.5, as in
Wang et al. 2004).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..assets import sample_images
from ..model import DualViTok
from ..processor import load_image

logger = logging.getLogger(__name__)

__all__ = ["ReconstructionScores", "center_crop_batch", "reconstruction_scores", "export_demo_model"]


@dataclass
class ReconstructionScores:
    """Mean ``psnr`` (dB) and ``ssim`` over ``num_images`` images, and per-image values."""

    psnr: float
    ssim: float
    num_images: int
    per_image: list[dict]


def center_crop_batch(paths: list[Path], size: int = 256) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased), center-crop: ``[N, 3, size, size]`` in [-1, 1]."""
    from PIL import Image

    out = []
    for path in paths:
        img = load_image(path)
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)  # (3, size, size)
    return torch.stack(out)


@torch.no_grad()
def reconstruction_scores(model: DualViTok, images: torch.Tensor,
                          names: list[str] | None = None) -> ReconstructionScores:
    """PSNR / SSIM (scikit-image, uint8, data range 255) of ``model``'s reconstructions of ``images [N,3,H,W]``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    model.eval()
    per_image = []
    for i in range(images.shape[0]):
        x = images[i:i + 1]
        recon = model(x).reconstruction
        a = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        b = ((recon[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        psnr = float(peak_signal_noise_ratio(a, b, data_range=255))
        ssim = float(structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False))
        per_image.append({"image": names[i] if names else i, "psnr": psnr, "ssim": ssim})
    return ReconstructionScores(float(np.mean([p["psnr"] for p in per_image])),
                                float(np.mean([p["ssim"] for p in per_image])), len(per_image), per_image)


def export_demo_model(run_dir: str | Path, output: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy ``run_dir/final`` to ``output`` with ``save_pretrained``, weights stored in ``dtype``."""
    model = DualViTok.from_pretrained(Path(run_dir) / "final")
    card = Path(output) / "README.md"  # keep a hand-written card (the bundled demo's) when exporting over it
    model.to(dtype).save_pretrained(output, model_card=card.read_text(encoding="utf-8") if card.is_file() else None)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="training run folder (with final/)")
    parser.add_argument("--output", default=None, help="export the model here (float16); omit to only evaluate")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    paths = sample_images()
    images = center_crop_batch(paths, args.size)
    names = [p.name for p in paths]
    results = {"float32": reconstruction_scores(DualViTok.from_pretrained(Path(args.run_dir) / "final"), images, names)}
    if args.output:
        export_demo_model(args.run_dir, args.output)
        results["exported"] = reconstruction_scores(DualViTok.from_pretrained(args.output), images, names)
    print("| weights | PSNR (dB) | SSIM | images |\n|---|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s.psnr:.2f} | {s.ssim:.4f} | {s.num_images} |")
    print(json.dumps({k: v.per_image for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
