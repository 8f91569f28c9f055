"""``dualvitok encode INPUT... --output DIR``: pretokenize images into token shards (docs/tokens.md).

Inputs are folders, webdataset tar shards, parquet/arrow tables or file lists (:mod:`dualvitok.sources`). DataLoader
workers decode and resize while the model runs; under ``torchrun`` every rank encodes a disjoint, deterministic part
of the inputs into its own shards and index file. ``--resume`` continues an interrupted run after checking that the
model, size policy, dtype and library version are the ones recorded in ``meta.json``; ``--overwrite`` starts over.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from .._utils.io import json_path
from ..inference import INDEX_MODES, agree_on_kernels, agree_on_low_precision
from . import _args
from ._args import dtype_of

logger = logging.getLogger(__name__)

# meta.json fields a resume must match (the model is identified by the sha256 of its weights, not its name or path)
CHECKED = ("format_version", "model_sha256", "semantic_codebook_size", "pixel_codebook_size", "size_policy", "dtype",
           "indices", "dualvitok_version")


def add_parser(subparsers) -> None:
    from ..sources import INPUT_HELP

    p = subparsers.add_parser(
        "encode", help="pretokenize images (folders, tar shards, parquet, file lists) into token shards",
        description="Encode every image of the inputs into semantic and pixel indices, stored as safetensors shards "
                    "with JSON-lines indexes (docs/tokens.md). Runs on one CPU, one GPU or under torchrun on many "
                    "(each rank writes its own shards). Unreadable images are skipped and listed in skipped.jsonl.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    _args.add_output(p, None, "token folder")
    _args.add_model(p)
    _args.add_device(p)
    _args.add_dtype(p, default=None,
                    help="compute dtype: bfloat16/float16 run the fast path (dualvitok.inference."
                         "optimize_for_inference; see --indices), float32 the reference path",
                    default_text="bfloat16, or float32 on CPU where the fast path is not faster: images of at most "
                                 "64x64 pixels with a model narrower than 128 channels")
    p.add_argument("--indices", choices=INDEX_MODES, default="guarded",
                   help="fast path only: how the encoders in front of the quantizers run: guarded (>= 99%% of pixel "
                        "indices equal float32's, faster), exact (pixel indices equal float32's) or fast (default: "
                        "guarded)")
    _args.add_batch_size(p, 8)
    _args.add_num_workers(p)
    _args.add_resume(p)
    _args.add_progress(p)
    p.add_argument("--size", type=_args.image_side, nargs=2, metavar=("H", "W"),
                   help="resize every image to H x W (multiples of 16) instead of the size policy (default: policy)")
    p.add_argument("--max-pixels", type=_args.max_pixels, default=512 * 512,
                   help="area bound of the size policy (default: 262144 = 512*512)")
    p.add_argument("--shard-size", type=_args.positive_int, default=1000, help="images per shard file (default: 1000)")
    p.add_argument("--limit", type=_args.positive_int, default=None,
                   help="encode only the first N images of the inputs (default: all)")
    p.add_argument("--image-column", default=None,
                   help="image column of parquet/arrow inputs (default: 'image', 'img', 'jpg', ... or the first "
                        "binary column)")
    _args.add_default_malloc(p)
    p.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)  # deprecated: --dtype float32
    p.set_defaults(func=run)


SMALL_IMAGE_AREA = 64 * 64
"""On CPU, images of at most this many pixels are encoded in float32 by default when the model is narrow: there the
fast path was 0.92-0.98x of float32 for the 32-channel models at 64x64 and 1.5-1.7x at 128x128 (Intel Xeon with AMX,
``benchmarks/bench_fast_vs_fp32.py``)."""


def choose_dtype(args: argparse.Namespace, model, device: torch.device) -> str:
    """``--dtype`` as given, else ``"bfloat16"`` unless the fast path would not be faster (logged)."""
    from ..inference import MIN_BF16_WIDTH

    if args.dtype is not None:
        return args.dtype
    area = args.size[0] * args.size[1] if args.size else args.max_pixels
    width = model.config.pixel_decoder.ch
    if device.type == "cpu" and area <= SMALL_IMAGE_AREA and width < MIN_BF16_WIDTH:
        logger.info("--dtype float32: images of at most %d pixels with a model of base width %d encode faster in "
                    "float32 than on the fast path on CPU (benchmarks/bench_fast_vs_fp32.py); pass --dtype bfloat16 "
                    "to use the fast path anyway", area, width)
        return "float32"
    return "bfloat16"


def _stage_dtype(model) -> str:
    return str(next(model.pixel_decoder.parameters()).dtype).replace("torch.", "")


def build_meta(args: argparse.Namespace, model, fingerprint: str) -> dict:
    """The settings of this run, as recorded in ``meta.json`` (the ``CHECKED`` ones must match on resume)."""
    from ..tokens import FORMAT, FORMAT_VERSION
    from ..version import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": _model_name(args.model),
            "model_sha256": fingerprint, "semantic_codebook_size": model.semantic_quantizer.codebook_size,
            "pixel_codebook_size": model.pixel_quantizer.codebook_size,
            "size_policy": {"size": list(args.size) if args.size else None, "max_pixels": args.max_pixels,
                            "min_pixels": 32 * 32, "factor": 16},
            "dtype": args.dtype, "fast_path": args.dtype != "float32",
            "indices": args.indices if args.dtype != "float32" else None, "dualvitok_version": __version__}


def _our_files(out: Path) -> list[Path]:
    from ..tokens import META_NAME, SKIPPED_NAME, index_files

    names = [out / META_NAME, out / SKIPPED_NAME, *index_files(out), *out.glob("tokens-*.safetensors")]
    return [p for p in names if p.exists()]


def _our_temp_files(out: Path) -> list[Path]:
    return [p for p in out.glob(".*.tmp*") if p.name.startswith((".tokens-", ".index", ".meta.json", ".skipped"))]


def prepare_output(out: Path, meta: dict, resume: bool, overwrite: bool) -> str:
    """Check (or start) the token folder on rank 0: returns what happens (``"new"``, ``"resume"``).

    Raises:
        ValueError: a previous run is there without --resume/--overwrite, or its settings differ (named).
    """
    from .._utils.io import write_json
    from ..tokens import META_NAME, read_meta

    files = _our_files(out)  # temp files of an interrupted run are removed later (tokens.clean_folder)
    if files and overwrite:
        logger.info("--overwrite: removing %d file(s) of the previous run in %s", len(files), out)
        for p in files + _our_temp_files(out):
            p.unlink(missing_ok=True)
        files = []
    if not files:
        write_json(out / META_NAME, meta)
        return "new"
    if not resume:
        raise ValueError(f"{out} already holds tokens of a previous run; pass --resume to continue it (refused if "
                         f"the model or settings differ) or --overwrite to start over")
    old = read_meta(out)
    if old is None:
        raise ValueError(f"{out} has token files but no {META_NAME}, so they cannot be checked; start over with "
                         "--overwrite or choose another --output")
    diffs = []
    for name in CHECKED:
        if old.get(name) != meta.get(name):
            extra = f" (model {old.get('model')!r} then, {meta.get('model')!r} now)" if name == "model_sha256" else ""
            diffs.append(f"{name} was {old.get(name, 'not recorded')!r}, now {meta.get(name)!r}{extra}")
    if diffs:
        raise ValueError(f"cannot resume into {out}: it was encoded with other settings: {'; '.join(diffs)}. "
                         "Run with the same settings, --overwrite to start over, or choose another --output")
    return "resume"


def _clean_rank(out: Path, rank: int) -> None:
    from ..tokens import clean_folder, index_name, read_jsonl, repair_jsonl

    index = out / index_name(rank)
    repair_jsonl(index)
    clean_folder(out, rank, {r["shard"] for r in read_jsonl(index)})


def _clean_stale_ranks(out: Path, world: int) -> None:
    """Repair and clean what ranks >= ``world`` of an earlier, larger run left (their locks must be free)."""
    import re

    from .._utils.locking import OutputLockedError, output_lock

    ranks = set()
    for p in out.iterdir():
        m = re.match(r"^\.?(?:tokens-r|index\.rank)(\d+)", p.name)
        if m and int(m.group(1)) >= world:
            ranks.add(int(m.group(1)))
    for rank in sorted(ranks):
        try:
            with output_lock(out, "encode", rank=rank):
                _clean_rank(out, rank)
        except OutputLockedError:
            logger.warning("rank %d of another encode job is writing into %s; its files are left alone", rank, out)


def _model_name(spec) -> str:
    """The ``--model`` as recorded: a local folder or file by its absolute path (decode may run elsewhere)."""
    if spec is not None and os.path.exists(spec):
        return json_path(os.path.abspath(spec))
    return str(spec)


def run(args: argparse.Namespace) -> int:
    from .._utils.distributed import init_distributed, shutdown_distributed
    from ..devices import resolve_device

    if args.fp32:
        logger.warning("--fp32 is deprecated; use --dtype float32")
        args.dtype = "float32"
    if args.dtype is not None:
        dtype_of(args.dtype)
    device = resolve_device(args.device)
    info = init_distributed(device)
    if device.type == "cuda" and info.enabled and device.index is None:
        device = torch.device("cuda", info.local_rank)
    try:
        return _run(args, device, info)
    finally:
        shutdown_distributed(info)


def _run(args: argparse.Namespace, device: torch.device, info) -> int:
    from tqdm import tqdm

    from .._utils import atomic_write
    from .._utils.distributed import all_gather_json, barrier
    from .._utils.locking import output_lock
    from ..loading import load_model
    from ..processor import ImageProcessor
    from ..sources import ImageItems, collate_samples, open_sources, split_units
    from ..tokens import SKIPPED_NAME, ShardWriter, model_fingerprint, read_index

    out = Path(args.output)
    rank, world = info.rank, info.world_size
    source = open_sources(args.inputs, args.image_column, args.limit)  # bad inputs fail before --output is made
    with output_lock(out, "encode", rank=rank):
        model = load_model(args.model, device=device).eval()
        args.dtype = choose_dtype(args, model, device)
        fingerprint = model_fingerprint(model)
        meta = build_meta(args, model, fingerprint)
        refusal = None
        if info.is_main:
            try:
                state = prepare_output(out, meta, args.resume, args.overwrite)
                logger.info("%s run in %s", state, out)
            except ValueError as e:
                refusal = str(e)
        refusal = all_gather_json(refusal)[0]  # every rank waits for rank 0's decision
        if refusal:
            raise ValueError(refusal)
        _clean_rank(out, rank)
        if info.is_main:
            _clean_stale_ranks(out, world)
        barrier()
        done = {r["path"] for r in read_index(out)}
        todo = [item for item in source.items if item.key not in done]
        units = split_units(todo, world, rank)
        mine = sum(len(u) for u in units)
        logger.info("rank %d/%d: %d images listed, %d already encoded, %d to do here", rank, world,
                    len(source.items), len(source.items) - len(todo), mine)

        if args.dtype != "float32":  # the CPU plan keeps freed buffers for reuse unless --default-malloc
            agree_on_low_precision(dtype_of(args.dtype), device)  # under torchrun: rank 0's measured bf16 speedup
            model.optimize_for_inference(dtype=dtype_of(args.dtype), indices=args.indices,
                                         keep_freed_memory=not args.default_malloc)
            agree_on_kernels(model)
        elif device.type == "cpu" and not args.default_malloc:
            from ..devices import keep_freed_cpu_memory

            keep_freed_cpu_memory()
        logger.info("encoding with %s stages (--dtype %s)", _stage_dtype(model), args.dtype)
        processor = ImageProcessor(size=tuple(args.size) if args.size else None, max_pixels=args.max_pixels)
        loader = torch.utils.data.DataLoader(
            ImageItems(units, source.containers, processor), batch_size=args.batch_size,
            num_workers=args.num_workers, collate_fn=collate_samples,
            prefetch_factor=2 if args.num_workers else None)
        header = {"model": _model_name(args.model), "model_sha256": fingerprint,
                  "semantic_codebook_size": str(meta["semantic_codebook_size"]),
                  "pixel_codebook_size": str(meta["pixel_codebook_size"]),
                  "dualvitok_version": meta["dualvitok_version"]}
        writer = ShardWriter(out, rank, args.shard_size, header)
        pending: dict[tuple[int, int], list[dict]] = {}
        skipped: list[dict] = []
        bar = tqdm(total=mine, unit="img", desc="encode", disable=args.no_progress or not info.is_main)
        start = time.perf_counter()

        def encode(items: list[dict]):
            with torch.inference_mode():
                return model.encode(torch.stack([s["image"] for s in items]).to(device))

        def flush_group(shape: tuple[int, int]) -> None:
            items = pending.pop(shape)
            try:
                results = [(items, encode(items))]
            except ValueError:  # an input the model refuses: encode one by one, skip (and list) the refused ones
                results = []
                for s in items:
                    try:
                        results.append(([s], encode([s])))
                    except ValueError as e:
                        skipped.append({"path": s["key"], "reason": f"the model refused it: {e}"})
                        logger.warning("skipping %s: the model refused it: %s", s["key"], e)
            for group, enc in results:
                for s, sem, pix in zip(group, enc.semantic_indices, enc.pixel_indices, strict=True):
                    writer.add(s["key"], sem, pix, shape[0], shape[1], s["source_size"])
            bar.update(len(items))
            bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")

        for batch in loader:
            for s in batch:
                if s["image"] is None:
                    skipped.append({"path": s["key"], "reason": s["error"]})
                    logger.warning("skipping %s: %s", s["key"], s["error"])
                    bar.update(1)
                    continue
                shape = tuple(s["image"].shape[-2:])
                pending.setdefault(shape, []).append(s)
                if len(pending[shape]) >= args.batch_size:
                    flush_group(shape)
            if sum(len(v) for v in pending.values()) > 4 * args.batch_size:  # many sizes: bound the memory
                flush_group(max(pending, key=lambda k: len(pending[k])))
        for shape in list(pending):
            flush_group(shape)
        writer.flush()
        bar.close()
        elapsed = time.perf_counter() - start

        listed = [{"path": key, "reason": reason} for key, reason in source.skipped]
        gathered = all_gather_json({"encoded": writer.written, "skipped": skipped})
        if info.is_main:
            all_skipped = listed + [s for g in gathered for s in g["skipped"]]
            encoded = sum(g["encoded"] for g in gathered)
            import json


            lines = [json.dumps({"path": json_path(s["path"]), "reason": json_path(s["reason"])}) + "\n"
                     for s in all_skipped]
            with atomic_write(out / SKIPPED_NAME) as tmp:
                tmp.write_text("".join(lines), encoding="utf-8")
        barrier()
        if not info.is_main:
            return 0
        total = len(read_index(out))
        names = ", ".join(s["path"] for s in all_skipped[:10]) + (" ..." if len(all_skipped) > 10 else "")
        print(f"encoded {encoded} images in {elapsed:.1f} s on {world} process(es) ({total} in {out}/), "
              f"skipped {len(all_skipped)} unreadable" + (f": {names} (see {out / SKIPPED_NAME})" if all_skipped
                                                          else ""))
    return 0
