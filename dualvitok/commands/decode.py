"""``dualvitok decode TOKENS --output DIR``: turn a token folder (``dualvitok encode``) back into PNG images.

Records are batched by grid shape and decoded on the fast path (``--dtype bfloat16``, the default) or the float32
reference path. ``DIR/<key with .png>`` mirrors the source keys (``a/photo.jpg`` -> ``a/photo.png``); ``--resume``
skips images already written, ``--overwrite`` rewrites them.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch

from ._args import (
    add_batch_size,
    add_default_malloc,
    add_device,
    add_dtype,
    add_output,
    add_progress,
    add_resume,
    dtype_of,
    positive_int,
)

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    from ._args import MODEL_HELP

    p = subparsers.add_parser("decode", help="decode a token folder (dualvitok encode) back into images",
                              description="Decode every record of a token folder into a PNG under --output, with "
                                          "the model that encoded it (recorded in meta.json) unless --model says "
                                          "otherwise.")
    p.add_argument("tokens", metavar="TOKENS", help="token folder written by dualvitok encode")
    add_output(p, None, "folder for the decoded PNG images")
    p.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: the model recorded in TOKENS/meta.json)")
    add_device(p)
    add_default_malloc(p)
    add_dtype(p, default="bfloat16",
              help="compute dtype: bfloat16/float16 run the fast path (optimize_for_inference), float32 the "
                   "reference path")
    add_batch_size(p, 8)
    add_resume(p)
    add_progress(p)
    p.add_argument("--limit", type=positive_int, default=None, help="decode only the first N records (default: all)")
    p.set_defaults(func=run)


def output_names(keys: list[str]) -> list[str]:
    """Relative PNG names for source keys: the suffix becomes ``.png``; keys that would collide keep theirs.

    ``..`` parts, absolute prefixes and characters other than letters, digits and ``._-/`` are made safe, so a name
    never leaves the output folder.
    """
    def safe(key: str) -> str:
        parts = [re.sub(r"[^\w.\-]", "_", part) for part in key.split("/")]
        parts = ["__" if part in ("..", ".") else part for part in parts if part]
        return "/".join(parts) or "_"

    bases = [safe(k) for k in keys]
    stems = [re.sub(r"\.[A-Za-z0-9]{1,5}$", "", b) + ".png" for b in bases]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else b + ".png" for s, b in zip(stems, bases, strict=True)]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .._utils.io import save_image
    from .._utils.locking import output_lock
    from ..devices import resolve_device
    from ..loading import load_model
    from ..processor import ImageProcessor
    from ..tokens import TokenDataset, grid_batches, model_fingerprint

    tokens, out = Path(args.tokens), Path(args.output)
    if not tokens.is_dir():
        raise FileNotFoundError(f"token folder not found: {tokens} (write one with `dualvitok encode`)")
    if out.resolve() == tokens.resolve():
        raise ValueError("--output must be another folder than TOKENS")
    dataset = TokenDataset(tokens)
    meta = dataset.meta or {}
    spec = args.model or meta.get("model") or "demo"
    device = resolve_device(args.device)
    model = load_model(spec, device=device).eval()
    for name, quantizer in (("semantic_codebook_size", model.semantic_quantizer),
                            ("pixel_codebook_size", model.pixel_quantizer)):
        if name in meta and meta[name] != quantizer.codebook_size:
            raise ValueError(f"--model {spec} has {name}={quantizer.codebook_size} but {tokens} was encoded with "
                             f"{meta[name]} (model {meta.get('model')!r}); decode with the model that encoded it")
    if meta.get("model_sha256") and meta["model_sha256"] != model_fingerprint(model):
        logger.warning("%s was encoded with another model (%r, sha256 %s...); decoding with %s", tokens,
                       meta.get("model"), meta["model_sha256"][:12], spec)
    if args.dtype != "float32":
        model.optimize_for_inference(dtype=dtype_of(args.dtype), keep_freed_memory=not args.default_malloc)
    records = dataset.records[: args.limit]
    names = output_names([r["path"] for r in records])
    with output_lock(out, "decode"):
        existing = [n for n in names if (out / n).is_file()]
        if existing and not (args.resume or args.overwrite):
            raise ValueError(f"{out} already holds {len(existing)} of the images (e.g. {existing[0]}); pass --resume "
                             "to decode only the missing ones or --overwrite to rewrite them")
        todo = [i for i, n in enumerate(names) if args.overwrite or not (out / n).is_file()]
        processor = ImageProcessor()
        bar = tqdm(total=len(todo), unit="img", desc="decode", disable=args.no_progress)
        for batch in grid_batches([records[i] for i in todo], args.batch_size):
            positions = [todo[j] for j in batch]
            items = [dataset.record(i) for i in positions]
            semantic = torch.stack([r.semantic_indices for r in items]).to(device)
            pixel = torch.stack([r.pixel_indices for r in items]).to(device)
            with torch.inference_mode():
                images = model.decode_indices(semantic, pixel)
            for i, image in zip(positions, processor.postprocess(images.float()), strict=True):
                save_image(image, out / names[i])
            bar.update(len(items))
        bar.close()
    print(f"decoded {len(todo)} images into {out}/ ({len(records) - len(todo)} already there)")
    return 0
