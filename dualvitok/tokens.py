"""Token files: images encoded to DualViTok indices, stored in safetensors shards with a JSON-lines index.

Layout of a token folder (written by ``dualvitok encode``)::

    meta.json             model, library version, codebook sizes, size policy
    index.jsonl           one record per image: path, shard, key, height, width, semantic/pixel grid
    tokens-00000.safetensors   int32 tensors "<key>.semantic" [hs, ws] and "<key>.pixel" [h, w]

Shards are written atomically (temp file, then rename) before their records are appended to the index, so an
interrupted run resumes from the index and never leaves a half-written shard referenced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._utils import atomic_write

INDEX_NAME = "index.jsonl"
META_NAME = "meta.json"


@dataclass
class TokenRecord:
    """One encoded image: its source path (relative to the encoded folder) and its token grids."""

    path: str
    semantic_indices: Tensor  # [hs, ws] int64
    pixel_indices: Tensor  # [h, w] int64
    height: int
    width: int


def read_index(folder: str | os.PathLike) -> list[dict]:
    """The records of ``index.jsonl`` (empty if absent)."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ShardWriter:
    """Collects token grids and writes them as shards, then appends their records to the index."""

    def __init__(self, folder: str | os.PathLike, shard_size: int = 1000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        existing = sorted(self.folder.glob("tokens-*.safetensors"))
        self.next_shard = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self._tensors: dict[str, Tensor] = {}
        self._records: list[dict] = []

    def add(self, path: str, semantic: Tensor, pixel: Tensor, height: int, width: int) -> None:
        key = str(len(self._records))
        self._tensors[f"{key}.semantic"] = semantic.to(torch.int32).contiguous().cpu()
        self._tensors[f"{key}.pixel"] = pixel.to(torch.int32).contiguous().cpu()
        self._records.append({"path": path, "key": key, "height": height, "width": width,
                              "semantic_shape": list(semantic.shape), "pixel_shape": list(pixel.shape)})
        if len(self._records) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._records:
            return
        name = f"tokens-{self.next_shard:05d}.safetensors"
        with atomic_write(self.folder / name) as tmp:
            save_file(self._tensors, tmp)
        with open(self.folder / INDEX_NAME, "a", encoding="utf-8") as f:
            for record in self._records:
                f.write(json.dumps({**record, "shard": name}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.next_shard += 1
        self._tensors, self._records = {}, []


def iter_tokens(folder: str | os.PathLike) -> Iterator[TokenRecord]:
    """Iterate over the images of a token folder, shard by shard."""
    folder = Path(folder)
    records = read_index(folder)
    if not records:
        raise FileNotFoundError(f"no {INDEX_NAME} with records in {folder}; create one with `dualvitok encode`")
    shard_name, shard = None, None
    for r in records:
        if r["shard"] != shard_name:
            shard_name, shard = r["shard"], load_file(folder / r["shard"])
        yield TokenRecord(r["path"], shard[f"{r['key']}.semantic"].long(), shard[f"{r['key']}.pixel"].long(),
                          r["height"], r["width"])
