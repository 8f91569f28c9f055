"""Token folders: images encoded to DualViTok indices, in safetensors shards with JSON-lines indexes.

Layout of a token folder (written by ``dualvitok encode``, readable without dualvitok)::

    meta.json                        model (name, sha256 of its weights), size policy, dtype, library version
    index.jsonl                      one record per image (rank 0): path (the source key), shard, key, height, width,
                                     semantic_shape, pixel_shape, source_size
    index.rank001.jsonl ...          the records of the other torchrun ranks (read as one index with index.jsonl)
    tokens-r000-00000.safetensors    int32 tensors "<key>.semantic" [hs, ws] and "<key>.pixel" [h, w]; the header
                                     metadata holds the format, codebook sizes, model hash, grid sizes and the
                                     source keys of the shard in order
    skipped.jsonl                    unreadable inputs of the last run: {"path": ..., "reason": ...}

A shard is written atomically (temp file, fsync, rename) before its records are appended to its index (one write,
fsync'ed), so an interrupted run resumes from the indexes: a shard whose records never reached the index is an
orphan and is deleted on resume, and a torn last index line (power loss, full disk) is ignored with a warning.
Read the tokens back with :func:`iter_tokens` (shard by shard) or :class:`TokenDataset` (a torch Dataset, map-style
or iterable, yielding token grids or the unified model's image-block ids).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._utils import atomic_write

logger = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
META_NAME = "meta.json"
SKIPPED_NAME = "skipped.jsonl"
FORMAT = "dualvitok-tokens"
FORMAT_VERSION = 2
_RANK_INDEX = re.compile(r"^index\.rank(\d+)\.jsonl$")


def index_name(rank: int = 0) -> str:
    """The index file of a torchrun rank: ``index.jsonl`` for rank 0, ``index.rank{N:03d}.jsonl`` for the others."""
    return INDEX_NAME if rank == 0 else f"index.rank{rank:03d}.jsonl"


def shard_prefix(rank: int = 0) -> str:
    """The name prefix of a rank's shards (``tokens-r000-``)."""
    return f"tokens-r{rank:03d}-"


def index_files(folder: str | os.PathLike) -> list[Path]:
    """The index files of a token folder, rank 0 first, then by rank."""
    folder = Path(folder)
    files = [folder / INDEX_NAME] if (folder / INDEX_NAME).is_file() else []
    ranked = [(int(m.group(1)), p) for p in folder.glob("index.rank*.jsonl") if (m := _RANK_INDEX.match(p.name))]
    return files + [p for _, p in sorted(ranked)]


@dataclass
class TokenRecord:
    """One encoded image: its source key, its token grids and sizes."""

    path: str  # the source key (relative path, ``shard.tar/member``, ``file.parquet#row``, ...)
    semantic_indices: Tensor  # [hs, ws] int64
    pixel_indices: Tensor  # [h, w] int64
    height: int  # size the image was encoded at
    width: int
    source_size: tuple[int, int] | None = None  # (height, width) of the source image, when recorded


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file (empty if absent).

    An incomplete final line (a torn write) is ignored with a warning; any other line that is not a JSON object
    raises ``ValueError`` naming the file and line, since skipping it would silently lose a record.
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        except ValueError as e:
            if number == last:
                logger.warning("%s: ignoring the incomplete last line %d (%d bytes; an interrupted write)", path,
                               number + 1, len(line))
                break
            raise ValueError(f"{path}: line {number + 1} is not a valid record ({e}); the file is damaged in the "
                             "middle: restore it from a backup or re-encode with --overwrite") from e
        records.append(obj)
    return records


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn last line (no final newline, or not JSON) off a JSON-lines file before appending to it.

    Returns:
        the number of bytes removed (0 when the file is complete or absent). A damaged middle line raises
        ``ValueError`` (see :func:`read_jsonl`).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    read_jsonl(path)  # raises for a damaged middle line
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    body = data[:keep]
    stripped = body.rstrip(b"\n")
    if stripped:
        last_start = stripped.rfind(b"\n") + 1
        try:
            json.loads(stripped[last_start:].decode("utf-8"))
        except ValueError:
            keep = last_start
    if keep != len(data):
        logger.warning("%s: removing an incomplete last line (%d bytes) left by an interrupted run", path,
                       len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def read_index(folder: str | os.PathLike) -> list[dict]:
    """The records of all index files of a token folder (rank 0 first), empty if there are none."""
    return [r for path in index_files(folder) for r in read_jsonl(path)]


def read_meta(folder: str | os.PathLike) -> dict | None:
    """``meta.json`` of a token folder, or None."""
    path = Path(folder) / META_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-encode with --overwrite") from e


def shard_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The header metadata of a token shard, with the JSON fields (grids, sources) decoded."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for name in ("semantic_grids", "pixel_grids", "sources"):
        if name in meta:
            meta[name] = json.loads(meta[name])
    for name in ("semantic_codebook_size", "pixel_codebook_size", "count", "format_version"):
        if name in meta:
            meta[name] = int(meta[name])
    return meta


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, sorted by name): the model's identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


class ShardWriter:
    """Collects token grids and writes them as shards of one rank, then appends their records to its index.

    Args:
        folder: the token folder.
        rank: the torchrun rank (its own shard names and index file).
        shard_size: images per shard.
        metadata: string fields written into every shard's header (format, codebook sizes, model hash, ...).
    """

    def __init__(self, folder: str | os.PathLike, rank: int = 0, shard_size: int = 1000,
                 metadata: dict[str, str] | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size = rank, shard_size
        self.metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **(metadata or {})}
        prefix = shard_prefix(rank)
        numbers = [int(p.name[len(prefix):-len(".safetensors")]) for p in self.folder.glob(f"{prefix}*.safetensors")
                   if p.name[len(prefix):-len(".safetensors")].isdigit()]
        self.next_shard = max(numbers) + 1 if numbers else 0
        self.written = 0
        self._tensors: dict[str, Tensor] = {}
        self._records: list[dict] = []

    def add(self, path: str, semantic: Tensor, pixel: Tensor, height: int, width: int,
            source_size: tuple[int, int] | list[int] | None = None) -> None:
        """Add one image's grids (``semantic [hs, ws]``, ``pixel [h, w]``); writes a shard when it is full."""
        key = str(len(self._records))
        self._tensors[f"{key}.semantic"] = semantic.to(torch.int32).contiguous().cpu()
        self._tensors[f"{key}.pixel"] = pixel.to(torch.int32).contiguous().cpu()
        record = {"path": path, "key": key, "height": int(height), "width": int(width),
                  "semantic_shape": list(semantic.shape), "pixel_shape": list(pixel.shape)}
        if source_size is not None:
            record["source_size"] = [int(s) for s in source_size]
        self._records.append(record)
        if len(self._records) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the collected grids as one shard (atomically) and append their records to the index."""
        if not self._records:
            return
        name = f"{shard_prefix(self.rank)}{self.next_shard:05d}.safetensors"
        header = {**self.metadata, "count": str(len(self._records)),
                  "semantic_grids": json.dumps(sorted({tuple(r["semantic_shape"]) for r in self._records})),
                  "pixel_grids": json.dumps(sorted({tuple(r["pixel_shape"]) for r in self._records})),
                  "sources": json.dumps([r["path"] for r in self._records])}
        with atomic_write(self.folder / name, fsync=True) as tmp:
            save_file(self._tensors, tmp, metadata=header)
        text = "".join(json.dumps({**r, "shard": name}) + "\n" for r in self._records)
        index = self.folder / index_name(self.rank)
        try:
            with open(index, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, f"cannot append to {index} ({e.strerror or e}); free some space and resume with "
                                   "--resume (the last, incomplete line is ignored)") from e
        self.written += len(self._records)
        self.next_shard += 1
        self._tensors, self._records = {}, []


def clean_folder(folder: str | os.PathLike, rank: int, referenced: set[str]) -> list[str]:
    """Remove what an interrupted run of ``rank`` left: temp files of its shards and index, and orphan shards
    (written, but their records never reached an index). Returns the removed names."""
    folder = Path(folder)
    prefix = shard_prefix(rank)
    removed = []
    temps = list(folder.glob(f".{prefix}*.tmp*")) + list(folder.glob(f".{index_name(rank)}.*.tmp*"))
    if rank == 0:
        temps += list(folder.glob(f".{META_NAME}.*.tmp*")) + list(folder.glob(f".{SKIPPED_NAME}.*.tmp*"))
    for p in temps:
        p.unlink(missing_ok=True)
        removed.append(p.name)
    for p in folder.glob(f"{prefix}*.safetensors"):
        if p.name not in referenced:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        logger.warning("removed %d file(s) left by an interrupted run in %s: %s", len(removed), folder,
                       ", ".join(sorted(removed)[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


def _record(r: dict, shard: dict[str, Tensor] | Any, get) -> TokenRecord:
    size = r.get("source_size")
    return TokenRecord(r["path"], get(shard, f"{r['key']}.semantic").long(), get(shard, f"{r['key']}.pixel").long(),
                       r["height"], r["width"], tuple(size) if size else None)


def _require_records(folder: Path) -> list[dict]:
    records = read_index(folder)
    if not records:
        raise FileNotFoundError(f"no {INDEX_NAME} with records in {folder}; create one with `dualvitok encode`")
    return records


def iter_tokens(folder: str | os.PathLike) -> Iterator[TokenRecord]:
    """Iterate over the images of a token folder, shard by shard (one shard in memory at a time)."""
    folder = Path(folder)
    shard_name, shard = None, None
    for r in _require_records(folder):
        if r["shard"] != shard_name:
            shard_name, shard = r["shard"], load_file(folder / r["shard"])
        yield _record(r, shard, dict.__getitem__)


class _Output:
    """Turns a record into a sample: token grids, or the unified model's image-block ids."""

    def __init__(self, output: str, vocabulary: Any, meta: dict | None):
        if output not in ("grids", "image_block"):
            raise ValueError(f"output must be 'grids' or 'image_block', got {output!r}")
        if output == "image_block":
            if vocabulary is None:
                raise ValueError("output='image_block' needs the unified model's vocabulary: pass "
                                 "vocabulary=dualvitok.unified.VisionVocabulary(first_id, semantic_codebook_size, "
                                 "pixel_codebook_size)")
            for name in ("semantic_codebook_size", "pixel_codebook_size"):
                got, want = getattr(vocabulary, name), (meta or {}).get(name)
                if want is not None and got != want:
                    raise ValueError(f"the vocabulary has {name}={got} but the tokens were encoded with {want}")
        self.output, self.vocabulary = output, vocabulary

    def __call__(self, record: TokenRecord) -> dict:
        sample = {"path": record.path, "height": record.height, "width": record.width}
        if self.output == "grids":
            return {**sample, "semantic_indices": record.semantic_indices, "pixel_indices": record.pixel_indices}
        from .unified.sequence import build_image_block  # needs the unified extra (transformers)

        return {**sample, "input_ids": build_image_block(self.vocabulary, record.semantic_indices,
                                                         record.pixel_indices)}


class TokenDataset(Dataset):
    """A token folder as a map-style torch Dataset, for autoregressive training on pretokenized images.

    Each sample is a dict: ``path`` (the source key), ``height``, ``width`` and either ``semantic_indices [hs, ws]``
    and ``pixel_indices [h, w]`` (int64, ``output="grids"``) or ``input_ids [L]`` (``output="image_block"``: the
    ids of :func:`dualvitok.unified.build_image_block` for ``vocabulary``; needs the ``unified`` extra). Grids of
    different images may differ in size; batch with ``batch_size=None`` or a padding ``collate_fn``, or encode at
    one ``--size``.

    Args:
        folder: a folder written by ``dualvitok encode``.
        output: ``"grids"`` or ``"image_block"``.
        vocabulary: a :class:`dualvitok.unified.VisionVocabulary` (for ``"image_block"``).
        open_shards: shards kept open (memory-mapped) at a time.

    Example:
        >>> ds = TokenDataset("tokens/")  # doctest: +SKIP
        >>> ds[0]["pixel_indices"].shape  # doctest: +SKIP
        torch.Size([16, 16])
    """

    def __init__(self, folder: str | os.PathLike, output: str = "grids", vocabulary: Any = None,
                 open_shards: int = 8):
        self.folder = Path(folder)
        self.records = _require_records(self.folder)
        self.meta = read_meta(self.folder)
        self.to_sample = _Output(output, vocabulary, self.meta)
        self.open_shards = max(1, open_shards)
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:  # DataLoader workers open their own shards
        return {**self.__dict__, "_handles": OrderedDict()}

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"token shard {path} listed in the index is missing")
            handle = self._handles[name] = safe_open(os.fspath(path), framework="pt")
            while len(self._handles) > self.open_shards:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(name)
        return handle

    def record(self, index: int) -> TokenRecord:
        """The :class:`TokenRecord` at ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        r = self.records[index]
        return _record(r, self._shard(r["shard"]), lambda handle, key: handle.get_tensor(key))

    def __getitem__(self, index: int) -> dict:
        return self.to_sample(self.record(index))

    def iterable(self, shuffle: bool = False, seed: int = 0) -> IterableTokenDataset:
        """The same records as an ``IterableDataset`` that reads whole shards (see :class:`IterableTokenDataset`)."""
        return IterableTokenDataset(self.folder, self.to_sample.output, self.to_sample.vocabulary, shuffle, seed,
                                    records=self.records)


class IterableTokenDataset(IterableDataset):
    """A token folder as an iterable torch Dataset: shard by shard, one shard in memory per worker.

    Shards are dealt round robin to every (rank, DataLoader worker) pair, so under torchrun and with workers each
    record is read exactly once per epoch (ranks get whole shards: with fewer shards than ranks x workers some get
    none; encode with a smaller ``--shard-size`` then). For the map-style dataset use a ``DistributedSampler``.
    ``shuffle`` permutes the shards and the records inside each shard, with
    ``seed + epoch`` (call :meth:`set_epoch` each epoch). Samples as :class:`TokenDataset`.
    """

    def __init__(self, folder: str | os.PathLike, output: str = "grids", vocabulary: Any = None,
                 shuffle: bool = False, seed: int = 0, records: list[dict] | None = None):
        self.folder = Path(folder)
        self.records = records if records is not None else _require_records(self.folder)
        self.to_sample = _Output(output, vocabulary, read_meta(self.folder))
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        shards: dict[str, list[dict]] = {}
        for r in self.records:
            shards.setdefault(r["shard"], []).append(r)
        self.shards = list(shards.items())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        from ._utils.distributed import is_distributed

        if is_distributed():
            import torch.distributed as dist

            rank, world = dist.get_rank(), dist.get_world_size()
        else:  # DataLoader workers of a torchrun process: torchrun's environment
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers, me = world * workers, rank * workers + worker
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.shards)))
        if self.shuffle:
            rng.shuffle(order)
        for position, shard_index in enumerate(order):
            if position % consumers != me:
                continue
            name, records = self.shards[shard_index]
            shard = load_file(self.folder / name)
            if self.shuffle:
                records = records.copy()
                random.Random(self.seed + self.epoch + shard_index + 1).shuffle(records)
            for r in records:
                yield self.to_sample(_record(r, shard, dict.__getitem__))


def grid_batches(records: list[dict], batch_size: int) -> list[list[int]]:
    """Positions of ``records`` batched by equal grid shapes (``[semantic, pixel]``), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((tuple(r["semantic_shape"]), tuple(r["pixel_shape"])), []).append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


__all__ = ["FORMAT", "INDEX_NAME", "META_NAME", "SKIPPED_NAME", "IterableTokenDataset", "ShardWriter",
           "TokenDataset", "TokenRecord", "clean_folder", "index_files", "index_name", "iter_tokens",
           "model_fingerprint", "read_index", "read_jsonl", "read_meta", "repair_jsonl", "shard_metadata",
           "shard_prefix"]
