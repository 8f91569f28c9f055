"""``dualvitok encode FOLDER --output DIR``: tokenize a folder of images into token shards (see dualvitok.tokens)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode a folder of images into DualViTok token files",
                              description="Encode every image under FOLDER (recursively) into semantic and pixel "
                                          "indices, stored as safetensors shards with an index.jsonl. Uses the fast "
                                          "inference path (bf16, channels_last) unless --fp32. Resumes: images already "
                                          "in the index are skipped.")
    p.add_argument("folder", help="folder of images")
    p.add_argument("--output", required=True, help="output folder for the token files")
    p.add_argument("--model", default=None, help="folder, Hub repo id or registered name (default: bundled demo model)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W")
    p.add_argument("--max-pixels", type=int, default=512 * 512, help="area bound of the size policy (default 512*512)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp32", action="store_true", help="use the float32 reference path instead of the fast path")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator settings alone (by default freed large CPU buffers are kept for "
                        "reuse, see dualvitok.devices.keep_freed_cpu_memory)")
    p.set_defaults(func=run)


def _scan(folder: Path) -> list[Path]:
    from .._utils.files import scan_images

    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return scan_images(folder).files


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .._utils import atomic_write
    from ..loading import load_model
    from ..processor import ImageProcessor
    from ..tokens import META_NAME, ShardWriter, read_index
    from ..version import __version__

    folder, out = Path(args.folder), Path(args.output)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    paths = _scan(folder)
    done = {r["path"] for r in read_index(out)}
    todo = [p for p in paths if p.relative_to(folder).as_posix() not in done]
    logger.info("%d images found, %d already encoded, %d to do", len(paths), len(paths) - len(todo), len(todo))
    model = load_model(args.model, device=args.device)
    if next(model.parameters()).device.type == "cpu" and not args.default_malloc:
        from ..devices import keep_freed_cpu_memory

        keep_freed_cpu_memory()
    if not args.fp32:
        model.optimize_for_inference()
    processor = ImageProcessor(size=tuple(args.size) if args.size else None, max_pixels=args.max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(args.model or "demo"), "dualvitok_version": __version__, "fast_path": not args.fp32,
            "semantic_codebook_size": model.semantic_quantizer.codebook_size,
            "pixel_codebook_size": model.pixel_quantizer.codebook_size,
            "size": args.size, "max_pixels": args.max_pixels}
    with atomic_write(out / META_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))

    writer = ShardWriter(out, args.shard_size)
    pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
    skipped: list[str] = []
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="encode")

    def flush_group(key):
        items = pending.pop(key)
        x = torch.stack([t for _, t in items]).to(args.device)
        with torch.inference_mode():
            enc = model.encode(x)
        for (rel, _), sem, pix in zip(items, enc.semantic_indices, enc.pixel_indices, strict=True):
            writer.add(rel, sem, pix, key[0], key[1])
        bar.update(len(items))
        bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")

    for path in todo:
        rel = path.relative_to(folder).as_posix()
        try:
            tensor = processor.to_tensor(path)
        except (ValueError, OSError) as e:
            skipped.append(rel)
            logger.warning("skipping %s: %s", rel, e)
            bar.update(1)
            continue
        key = tuple(tensor.shape[-2:])
        pending.setdefault(key, []).append((rel, tensor))
        if len(pending[key]) >= args.batch_size:
            flush_group(key)
    for key in list(pending):
        flush_group(key)
    writer.flush()
    bar.close()
    total = len(read_index(out))
    print(f"encoded {len(todo) - len(skipped)} images ({total} in {out}/), skipped {len(skipped)} unreadable"
          + (f": {', '.join(skipped[:10])}" if skipped else ""))
    return 0
