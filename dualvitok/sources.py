"""Image sources for pretokenizing: folders, webdataset ``.tar`` shards, parquet/arrow tables and file lists.

:func:`open_sources` lists the images of one or more inputs (cheaply: no image is decoded) as :class:`Item` s, each
with a stable, JSON-safe key that maps a token record back to its source:

==========================  ==============================================  =================================
input                       what is read                                    key
==========================  ==============================================  =================================
folder                      image files below it (the library's suffixes)   path relative to the folder
``.tar`` (webdataset)        every image member; ``.cls``/``.json`` ignored   ``shard.tar/member.jpg``
``.tar.gz`` / ``.tgz``      the same, streamed (one worker per shard)       ``shard.tar.gz/member.jpg``
``.parquet`` / ``.arrow``   one image column (HF ``Image`` struct, bytes    ``file.parquet#row``
                            or a path)
HF ``save_to_disk`` folder  its ``data-*.arrow`` files (read by pyarrow)    ``data-00000-of-00001.arrow#row``
``.txt`` / ``.jsonl`` list  one path per line / ``{"path": ...}`` objects   the path as written in the list
==========================  ==============================================  =================================

With several inputs, folder keys (and table keys of a dataset folder) are prefixed with the input's name, and a key
that occurs twice is refused. Tables need ``pyarrow`` (``pip install 'dualvitok[data]'``).

:class:`ImageItems` is the ``IterableDataset`` that decodes and resizes the images in DataLoader workers; items
are grouped into *units* (one file, 64 neighbouring tar members or table rows, one parquet row group, one whole
compressed shard) that are split round robin over ranks (:func:`split_units`) and workers, so every process reads
a disjoint, deterministic part and each container is read by as few workers as possible.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ._utils.files import has_image_suffix, scan_images
from ._utils.io import json_path

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar",)
STREAMED_TAR_SUFFIXES = (".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet", ".arrow")
LIST_SUFFIXES = (".txt", ".lst", ".jsonl")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
LIST_FIELDS = ("path", "file", "filename", "image")
CHUNK = 64  # neighbouring tar members / arrow rows read by one worker

INPUT_HELP = ("folders of images, webdataset .tar/.tar.gz shards, .parquet/.arrow files or a Hugging Face dataset "
              "folder (save_to_disk), or .txt/.jsonl file lists")


@dataclass(frozen=True, slots=True)
class Item:
    """One image of a source.

    ``kind`` is ``"file"`` (``ref`` a path), ``"tar"`` (``ref`` the member name, ``offset``/``size`` of its data in
    a plain tar) or ``"table"`` (``ref`` the row). ``container`` indexes :attr:`ImageSource.containers`; ``unit``
    groups items read together by one worker.
    """

    key: str
    kind: str
    ref: str | int
    container: int = -1
    unit: int = 0
    offset: int = 0
    size: int = 0


@dataclass(frozen=True)
class Container:
    """A tar shard or table file that holds many items."""

    path: str
    kind: str  # "tar", "tar-stream", "parquet", "arrow"
    column: str | None = None  # table image column
    row_groups: tuple[int, ...] = ()  # parquet: first row of each row group


@dataclass
class ImageSource:
    """The listed images of some inputs: :attr:`items` in a deterministic order, and entries skipped while listing."""

    items: list[Item] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    inputs: list[str] = field(default_factory=list)


def _pyarrow():
    from ._utils.deps import require

    return require("pyarrow", "data", "reading parquet/arrow datasets")


def open_sources(inputs: Sequence[str | os.PathLike], image_column: str | None = None,
                 limit: int | None = None) -> ImageSource:
    """List the images of ``inputs`` (see the module docstring); at most ``limit`` items (the first ones).

    Raises:
        FileNotFoundError: an input does not exist. ValueError: an unsupported input, a table without an image
            column, a key that occurs twice, or inputs without a single image.
    """
    if not inputs:
        raise ValueError(f"no inputs given; pass {INPUT_HELP}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    source = ImageSource(inputs=[json_path(os.fspath(p)) for p in inputs])
    lister = _Lister(source, image_column, prefix=len(inputs) > 1)
    for raw in inputs:
        lister.add(Path(raw))
        if limit is not None and len(source.items) >= limit:
            break
    if limit is not None:
        del source.items[limit:]
    seen: set[str] = set()
    for item in source.items:
        if item.key in seen:
            raise ValueError(f"the key {item.key!r} occurs twice in the inputs: every image needs its own key (give "
                             "folders with different names, or one list without repeated lines)")
        seen.add(item.key)
    if not source.items and not source.skipped:
        raise ValueError(f"no images found in {', '.join(source.inputs)}; expected {INPUT_HELP} "
                         f"(image suffixes: see dualvitok._utils.files.IMAGE_SUFFIXES)")
    return source


class _Lister:
    def __init__(self, source: ImageSource, image_column: str | None, prefix: bool):
        self.source, self.image_column, self.prefix = source, image_column, prefix
        self.next_unit = 0

    def unit(self) -> int:
        self.next_unit += 1
        return self.next_unit - 1

    def add(self, path: Path) -> None:
        name = path.name.lower()
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
                return self.add_hf_dataset(path)
            if (path / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in path.iterdir() if p.is_dir())
                raise ValueError(f"{path} is a Hugging Face DatasetDict; pass one split folder, e.g. "
                                 f"{path / (splits[0] if splits else 'train')}")
            return self.add_folder(path)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path} (expected {INPUT_HELP})")
        if name.endswith(STREAMED_TAR_SUFFIXES) or name.endswith(TAR_SUFFIXES):
            return self.add_tar(path, path.name)
        if name.endswith(TABLE_SUFFIXES):
            return self.add_table(path, path.name)
        if name.endswith(LIST_SUFFIXES):
            return self.add_list(path)
        if has_image_suffix(name):
            self.source.items.append(Item(json_path(path.name), "file", os.fspath(path), unit=self.unit()))
            return
        raise ValueError(f"unsupported input {path}: expected {INPUT_HELP}")

    def add_folder(self, root: Path) -> None:
        scan = scan_images(root)
        pre = f"{json_path(root.name)}/" if self.prefix else ""
        for p in scan.files:
            self.source.items.append(Item(pre + json_path(scan.relative(p)), "file", os.fspath(p), unit=self.unit()))
        for p, reason in scan.skipped:
            self.source.skipped.append((pre + json_path(scan.relative(p)), reason))
        if not scan.files:  # a folder of shards or tables
            for p in sorted(root.iterdir()):
                lower = p.name.lower()
                if p.is_file() and lower.endswith(STREAMED_TAR_SUFFIXES + TAR_SUFFIXES):
                    self.add_tar(p, pre + json_path(p.name))
                elif p.is_file() and lower.endswith(TABLE_SUFFIXES):
                    self.add_table(p, pre + json_path(p.name))

    def add_tar(self, path: Path, label: str) -> None:
        streamed = path.name.lower().endswith(STREAMED_TAR_SUFFIXES)
        index = len(self.source.containers)
        self.source.containers.append(Container(os.fspath(path), "tar-stream" if streamed else "tar"))
        unit, count = self.unit(), 0
        try:
            with tarfile.open(path, "r|*" if streamed else "r:") as tar:
                for member in tar:
                    if not has_image_suffix(member.name):
                        continue
                    key = f"{label}/{json_path(member.name)}"
                    if not member.isfile():
                        self.source.skipped.append((key, "not a regular file in the tar shard"))
                        continue
                    if not streamed and count and count % CHUNK == 0:
                        unit = self.unit()
                    count += 1
                    self.source.items.append(Item(key, "tar", member.name, index, unit, member.offset_data,
                                                  member.size))
        except (tarfile.TarError, OSError, EOFError) as e:
            self.source.skipped.append((label, f"unreadable tar shard ({type(e).__name__}: {e}); the images "
                                               f"listed before the damage are kept"))

    def add_hf_dataset(self, root: Path) -> None:
        files: list[Path] = []
        state = root / "state.json"
        if state.is_file():
            try:
                files = [root / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"cannot read {state} of the Hugging Face dataset ({e})") from e
        files = files or sorted(root.glob("*.arrow"))
        if not files:
            raise ValueError(f"no .arrow files in the dataset folder {root}")
        pre = f"{json_path(root.name)}/" if self.prefix else ""
        for f in files:
            self.add_table(f, pre + json_path(f.name))

    def add_table(self, path: Path, label: str) -> None:
        pa = _pyarrow()
        index = len(self.source.containers)
        if path.name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            schema, meta = pf.schema_arrow, pf.metadata
            starts, first = [], 0
            for rg in range(meta.num_row_groups):
                starts.append(first)
                first += meta.row_group(rg).num_rows
            column = pick_image_column(schema, self.image_column, path)
            self.source.containers.append(Container(os.fspath(path), "parquet", column, tuple(starts)))
            units = [self.unit() for _ in starts]
            group = 0
            for row in range(first):
                while group + 1 < len(starts) and row >= starts[group + 1]:
                    group += 1
                self.source.items.append(Item(f"{label}#{row}", "table", row, index, units[group]))
            return
        table = read_arrow(pa, path)
        column = pick_image_column(table.schema, self.image_column, path)
        self.source.containers.append(Container(os.fspath(path), "arrow", column))
        unit = self.unit()
        for row in range(table.num_rows):
            if row and row % CHUNK == 0:
                unit = self.unit()
            self.source.items.append(Item(f"{label}#{row}", "table", row, index, unit))

    def add_list(self, path: Path) -> None:
        base = path.parent
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                if path.name.lower().endswith(".jsonl"):
                    try:
                        obj = json.loads(text)
                    except ValueError as e:
                        raise ValueError(f"{path}:{number}: not a JSON object ({e})") from e
                    name = next((obj[k] for k in LIST_FIELDS if isinstance(obj, dict) and k in obj), None)
                    if not isinstance(name, str):
                        raise ValueError(f"{path}:{number}: expected an object with one of the fields "
                                         f"{', '.join(LIST_FIELDS)} holding a path")
                    text = name
                file = Path(text) if os.path.isabs(text) else base / text
                self.source.items.append(Item(json_path(text), "file", os.fspath(file), unit=self.unit()))


def read_arrow(pa: Any, path: str | os.PathLike):
    """An Arrow IPC file (file or stream format, as ``datasets.save_to_disk`` writes) as a memory-mapped table."""
    source = pa.memory_map(os.fspath(path))
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def pick_image_column(schema: Any, requested: str | None, path: Path) -> str:
    """The image column of a table: ``requested``, else a column named like an image, else the first binary one."""
    import pyarrow as pa

    names = list(schema.names)
    if requested is not None:
        if requested not in names:
            raise ValueError(f"{path} has no column {requested!r}; its columns: {', '.join(names)}")
        return requested
    for name in names:
        if name.lower() in IMAGE_COLUMNS:
            return name
    for f in schema:
        t = f.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return f.name
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return f.name
    raise ValueError(f"no image column found in {path} (columns: {', '.join(names)}); pass --image-column NAME")


def open_image_bytes(data: bytes) -> Image.Image:
    """Encoded image bytes -> a loaded PIL image (the file is fully decoded, so truncation shows here)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


class ItemReader:
    """Opens the images of a source; keeps at most one open tar per shard and one parquet row group cached."""

    def __init__(self, containers: Sequence[Container]):
        self.containers = containers
        self._files: dict[int, Any] = {}
        self._tables: dict[int, Any] = {}
        self._row_group: tuple[int, int, Any] | None = None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files, self._tables, self._row_group = {}, {}, None

    def read(self, item: Item) -> Image.Image:
        """The image of ``item`` (raises ``OSError``/``ValueError`` and others for unreadable data)."""
        if item.kind == "file":
            from .processor import load_image

            return load_image(item.ref)
        if item.kind == "tar":
            f = self._files.get(item.container)
            if f is None:
                f = self._files[item.container] = open(self.containers[item.container].path, "rb")
            f.seek(item.offset)
            data = f.read(item.size)
            if len(data) != item.size:
                raise ValueError(f"tar member truncated ({len(data)} of {item.size} bytes)")
            return open_image_bytes(data)
        return self.cell_to_image(self.table_cell(item), self.containers[item.container])

    def table_cell(self, item: Item) -> Any:
        c = self.containers[item.container]
        row = int(item.ref)
        if c.kind == "arrow":
            table = self._tables.get(item.container)
            if table is None:
                table = self._tables[item.container] = read_arrow(_pyarrow(), c.path).select([c.column])
            return table.column(0)[row].as_py()
        import bisect

        import pyarrow.parquet as pq

        group = bisect.bisect_right(c.row_groups, row) - 1
        cached = self._row_group
        if cached is None or cached[:2] != (item.container, group):
            cached = self._row_group = (item.container, group,
                                        pq.ParquetFile(c.path).read_row_group(group, columns=[c.column]).column(0))
        return cached[2][row - c.row_groups[group]].as_py()

    @staticmethod
    def cell_to_image(value: Any, container: Container) -> Image.Image:
        from .processor import load_image

        if isinstance(value, dict):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return open_image_bytes(bytes(value))
        if isinstance(value, str):
            path = Path(value)
            return load_image(path if path.is_absolute() else Path(container.path).parent / path)
        raise ValueError(f"the image cell is {type(value).__name__}, not image bytes or a path")

    def stream(self, items: Sequence[Item]) -> Iterator[tuple[Item, Image.Image | Exception]]:
        """Read the ``items`` of one compressed shard in one pass: ``(item, image or the error)`` in shard order."""
        wanted = {item.ref: item for item in items}
        path = self.containers[items[0].container].path
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    item = wanted.pop(member.name, None)
                    if item is None:
                        continue
                    try:
                        f = tar.extractfile(member)
                        if f is None:
                            raise ValueError("not a regular file in the tar shard")
                        yield item, open_image_bytes(f.read())
                    except Exception as e:  # noqa: BLE001 - one bad member never stops the run
                        yield item, e
                    if not wanted:
                        return
        except (tarfile.TarError, OSError, EOFError) as e:
            error: Exception = e
        else:
            error = ValueError("member not found in the tar shard (was the shard changed?)")
        for item in wanted.values():
            yield item, error


def split_units(items: Sequence[Item], parts: int, part: int) -> list[list[Item]]:
    """The units (see module docstring) of ``items`` that go to ``part`` of ``parts`` (round robin, in order)."""
    units: dict[int, list[Item]] = {}
    for item in items:
        units.setdefault(item.unit, []).append(item)
    return [u for i, u in enumerate(units.values()) if i % parts == part]


def describe_error(error: BaseException) -> str:
    """A short reason for skipped.jsonl."""
    text = str(error) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}"


class ImageItems(IterableDataset):
    """Decodes and resizes items in DataLoader workers (each worker takes every ``num_workers``-th unit).

    Yields dicts: ``key``, ``image`` (``[3, H, W]`` float in [-1, 1], or None when unreadable), ``source_size``
    (``[height, width]`` before resizing) and ``error`` (the reason, or ``""``).
    """

    def __init__(self, units: Sequence[Sequence[Item]], containers: Sequence[Container], processor: Any):
        self.units, self.containers, self.processor = units, containers, processor

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        reader = ItemReader(self.containers)
        try:
            for i, unit in enumerate(self.units):
                if i % workers != worker:
                    continue
                if self.containers and unit[0].container >= 0 and \
                        self.containers[unit[0].container].kind == "tar-stream":
                    pairs: Iterator = reader.stream(unit)
                else:
                    pairs = ((item, self._read(reader, item)) for item in unit)
                for item, image in pairs:
                    yield self._sample(item, image)
        finally:
            reader.close()

    @staticmethod
    def _read(reader: ItemReader, item: Item) -> Image.Image | Exception:
        try:
            return reader.read(item)
        except Exception as e:  # noqa: BLE001 - unreadable inputs are skipped and listed, never fatal
            return e

    def _sample(self, item: Item, image: Image.Image | Exception) -> dict:
        if not isinstance(image, Exception):
            try:
                from .processor import load_image

                image = load_image(image)  # RGB
                size = [image.height, image.width]
                return {"key": item.key, "image": self.processor.to_tensor(image), "source_size": size, "error": ""}
            except Exception as e:  # noqa: BLE001
                image = e
        return {"key": item.key, "image": None, "source_size": None, "error": describe_error(image)}


def collate_samples(samples: list[dict]) -> list[dict]:
    """DataLoader ``collate_fn``: keep the samples as a list (their sizes may differ)."""
    return samples
