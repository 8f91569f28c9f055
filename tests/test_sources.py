"""Image sources of ``dualvitok encode``: folders, webdataset tars (plain and streamed), parquet/arrow, file lists."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from dualvitok import ImageProcessor
from dualvitok.sources import ImageItems, collate_samples, open_sources, split_units

PROCESSOR = ImageProcessor(size=(32, 32))


def _decode_all(source, workers: int = 0) -> dict[str, dict]:
    units = split_units(source.items, 1, 0)
    loader = DataLoader(ImageItems(units, source.containers, PROCESSOR), batch_size=3, num_workers=workers,
                        collate_fn=collate_samples)
    return {s["key"]: s for batch in loader for s in batch}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def photos(sample_image_paths):
    return sample_image_paths[:4]


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz")])
def test_webdataset_tar_members_become_images_with_shard_member_keys(tmp_path, photos, suffix, mode):
    path = tmp_path / f"shard-000{suffix}"
    with tarfile.open(path, mode) as tar:
        for i, p in enumerate(photos):
            _add(tar, f"sample{i:03d}.jpg", p.read_bytes())
            _add(tar, f"sample{i:03d}.cls", b"7")
        _add(tar, "broken.jpg", b"not a jpeg")
    source = open_sources([path])
    keys = [item.key for item in source.items]
    assert keys == [f"shard-000{suffix}/sample{i:03d}.jpg" for i in range(4)] + [f"shard-000{suffix}/broken.jpg"]
    samples = _decode_all(source, workers=2 if suffix == ".tar" else 0)
    for i, p in enumerate(photos):
        s = samples[f"shard-000{suffix}/sample{i:03d}.jpg"]
        assert torch.equal(s["image"], PROCESSOR.to_tensor(p))
    broken = samples[f"shard-000{suffix}/broken.jpg"]
    assert broken["image"] is None and "cannot identify image" in broken["error"]


def test_streamed_shard_is_one_unit_and_plain_items_are_split(tmp_path, photos):
    gz = tmp_path / "a.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        for i, p in enumerate(photos):
            _add(tar, f"{i}.jpg", p.read_bytes())
    folder = tmp_path / "f"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    source = open_sources([gz, folder])
    parts = [split_units(source.items, 3, r) for r in range(3)]
    keys = [[i.key for u in part for i in u] for part in parts]
    assert sorted(k for part in keys for k in part) == sorted(i.key for i in source.items)  # disjoint, complete
    gz_part = [r for r, part in enumerate(keys) if "a.tar.gz/0.jpg" in part][0]
    assert sum(k.startswith("a.tar.gz/") for k in keys[gz_part]) == 4  # the whole compressed shard on one rank
    assert all(k.startswith("f/") for k in sum(keys, []) if not k.startswith("a.tar.gz"))  # folder keys prefixed


def test_parquet_and_hf_arrow_tables(tmp_path, photos):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    images = [p.read_bytes() for p in photos]
    table = pa.table({"label": list(range(4)),
                      "image": [{"bytes": b, "path": None} for b in images[:3]] + [{"bytes": None,
                                                                                     "path": str(photos[3])}]})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    ds = tmp_path / "hf"
    ds.mkdir()
    with pa.ipc.new_stream(ds / "data-00000-of-00001.arrow", table.schema) as writer:  # as datasets.save_to_disk
        writer.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for path, label in ((tmp_path / "train.parquet", "train.parquet"), (ds, "data-00000-of-00001.arrow")):
        source = open_sources([path])
        assert [i.key for i in source.items] == [f"{label}#{r}" for r in range(4)]
        samples = _decode_all(source)
        for r, p in enumerate(photos):
            assert torch.equal(samples[f"{label}#{r}"]["image"], PROCESSOR.to_tensor(p))
    binary = pa.table({"jpg_bytes": images[:2], "caption": ["a", "b"]})
    pq.write_table(binary, tmp_path / "binary.parquet")
    assert torch.equal(_decode_all(open_sources([tmp_path / "binary.parquet"]))["binary.parquet#1"]["image"],
                       PROCESSOR.to_tensor(photos[1]))
    with pytest.raises(ValueError, match="no column 'pixels'.*jpg_bytes, caption"):
        open_sources([tmp_path / "binary.parquet"], image_column="pixels")
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match="--image-column"):
        open_sources([tmp_path / "text.parquet"])


def test_file_lists_keep_the_written_paths_as_keys(tmp_path, photos):
    (tmp_path / "imgs").mkdir()
    for p in photos[:2]:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "list.txt").write_text(f"# comment\nimgs/{photos[0].name}\n\n{photos[1]}\nimgs/missing.jpg\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": f"imgs/{photos[1].name}", "caption": "x"}) + "\n")
    source = open_sources([tmp_path / "list.txt", tmp_path / "list.jsonl"])
    keys = [i.key for i in source.items]
    assert keys == [f"imgs/{photos[0].name}", str(photos[1]), "imgs/missing.jpg", f"imgs/{photos[1].name}"]
    samples = _decode_all(source)
    assert torch.equal(samples[f"imgs/{photos[0].name}"]["image"], PROCESSOR.to_tensor(photos[0]))
    assert samples["imgs/missing.jpg"]["image"] is None and "not found" in samples["imgs/missing.jpg"]["error"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        open_sources([tmp_path / "bad.jsonl"])


def test_inputs_are_checked(tmp_path, photos):
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_sources([tmp_path / "nope"])
    (tmp_path / "notes.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported input"):
        open_sources([tmp_path / "notes.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        open_sources([tmp_path / "empty"])
    (tmp_path / "l.txt").write_text("a.jpg\na.jpg\n")
    with pytest.raises(ValueError, match="occurs twice"):
        open_sources([tmp_path / "l.txt"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dir.jpg").mkdir()  # a folder named like an image is listed as skipped
    (tmp_path / "d" / photos[0].name).write_bytes(photos[0].read_bytes())
    source = open_sources([tmp_path / "d"], limit=1)
    assert [i.key for i in source.items] == [photos[0].name]
    assert source.skipped == [("dir.jpg", "a directory, not an image file")]


def test_encode_cli_on_a_tar_shard_and_a_parquet_file(tiny_model, tmp_path, photos):
    """The keys in the index map every record back to its shard member / table row; tokens equal direct encoding."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from dualvitok import DualViTok
    from dualvitok.cli import main
    from dualvitok.tokens import iter_tokens

    tiny_model.save_pretrained(tmp_path / "model")
    with tarfile.open(tmp_path / "shard.tar.gz", "w:gz") as tar:
        for i, p in enumerate(photos[:2]):
            _add(tar, f"s{i}.jpg", p.read_bytes())
    pq.write_table(pa.table({"image": [p.read_bytes() for p in photos[2:4]]}), tmp_path / "t.parquet")
    out = tmp_path / "tokens"
    assert main(["encode", str(tmp_path / "shard.tar.gz"), str(tmp_path / "t.parquet"), "--output", str(out),
                 "--model", str(tmp_path / "model"), "--size", "32", "32", "--dtype", "float32", "--num-workers", "1",
                 "--no-progress", "--default-malloc"]) == 0
    sources = {"shard.tar.gz/s0.jpg": photos[0], "shard.tar.gz/s1.jpg": photos[1], "t.parquet#0": photos[2],
               "t.parquet#1": photos[3]}
    model = DualViTok.from_pretrained(tmp_path / "model")
    records = list(iter_tokens(out))
    assert sorted(r.path for r in records) == sorted(sources)
    for r in records:
        with torch.no_grad():
            enc = model.encode(PROCESSOR(sources[r.path]))
        assert torch.equal(r.pixel_indices, enc.pixel_indices[0]) and torch.equal(r.semantic_indices,
                                                                                  enc.semantic_indices[0])
