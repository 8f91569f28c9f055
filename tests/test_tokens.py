"""Token folders read back: JSON-lines repair, TokenDataset (map-style and iterable), image-block ids, decode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dualvitok import DualViTok, ImageProcessor
from dualvitok.cli import main
from dualvitok.commands.decode import output_names
from dualvitok.tokens import (
    IterableTokenDataset,
    ShardWriter,
    TokenDataset,
    iter_tokens,
    model_fingerprint,
    read_jsonl,
    repair_jsonl,
)


@pytest.fixture()
def folder(tmp_path):
    """11 random records over 4 shards of 3, two grid sizes, written by ShardWriter (no model needed)."""
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp_path / "tok", shard_size=3, metadata={"semantic_codebook_size": "256"})
    truth = {}
    for i in range(11):
        side = 2 if i % 3 else 4
        sem = torch.randint(0, 256, (side // 2, side // 2), generator=g)
        pix = torch.randint(0, 512, (side, side), generator=g)
        writer.add(f"img{i:02d}.jpg", sem, pix, side * 16, side * 16, (100 + i, 50))
        truth[f"img{i:02d}.jpg"] = (sem, pix)
    writer.flush()
    (tmp_path / "tok" / "meta.json").write_text(json.dumps({"semantic_codebook_size": 256,
                                                            "pixel_codebook_size": 512}))
    return tmp_path / "tok", truth


def test_jsonl_torn_last_line_is_ignored_and_cut_a_bad_middle_line_is_an_error(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}] and "incomplete last line 3" in caplog.text
    assert repair_jsonl(path) == len('{"a": 3, "b"') and path.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert repair_jsonl(path) == 0
    path.write_text('{"a": 1}\n{"a": 2}')  # complete JSON without its newline: readable, but cut before appending
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert repair_jsonl(path) > 0 and read_jsonl(path) == [{"a": 1}]
    path.write_text('{"a": 1}\n[1, 2]\n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not a valid record"):
        read_jsonl(path)
    with pytest.raises(ValueError, match="line 2"):
        repair_jsonl(path)


def test_map_style_dataset_equals_the_written_grids(folder):
    path, truth = folder
    ds = TokenDataset(path, open_shards=2)
    assert len(ds) == 11 and len(list(path.glob("tokens-*.safetensors"))) == 4
    for i in [0, 10, 3, 7, 1, -1]:  # random access across shards, with a small handle cache
        sample = ds[i]
        sem, pix = truth[sample["path"]]
        assert torch.equal(sample["semantic_indices"], sem) and torch.equal(sample["pixel_indices"], pix)
        assert sample["semantic_indices"].dtype == torch.int64
    assert ds.record(4).source_size == (104, 50)
    with pytest.raises(IndexError):
        ds[11]
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(s["path"] for s in loader) == sorted(truth)
    assert [r.path for r in iter_tokens(path)] == [ds[i]["path"] for i in range(len(ds))]


def test_iterable_dataset_reads_each_record_once_per_epoch(folder):
    path, truth = folder
    ds = TokenDataset(path).iterable()
    assert isinstance(ds, IterableTokenDataset) and len(ds) == 11
    for workers in (0, 2):
        paths = [s["path"] for s in DataLoader(ds, batch_size=None, num_workers=workers)]
        assert sorted(paths) == sorted(truth), workers
    parts = []
    for rank in (0, 1):  # torchrun's environment, as DataLoader workers of each rank see it
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", str(rank))
            mp.setenv("WORLD_SIZE", "2")
            parts.append([s["path"] for s in DataLoader(ds, batch_size=None, num_workers=2)])
    assert sorted(parts[0] + parts[1]) == sorted(truth) and not set(parts[0]) & set(parts[1])
    shuffled = IterableTokenDataset(path, shuffle=True, seed=1)
    first = [s["path"] for s in shuffled]
    shuffled.set_epoch(1)
    second = [s["path"] for s in shuffled]
    assert sorted(first) == sorted(second) == sorted(truth) and first != second
    for s in shuffled:
        assert torch.equal(s["pixel_indices"], truth[s["path"]][1])


def test_image_block_ids_are_the_unified_models(folder):
    pytest.importorskip("transformers")
    from dualvitok.unified import VisionVocabulary, build_image_block

    path, truth = folder
    vocab = VisionVocabulary(1000, 256, 512)
    ds = TokenDataset(path, output="image_block", vocabulary=vocab)
    sample = ds[3]
    sem, pix = truth[sample["path"]]
    assert torch.equal(sample["input_ids"], build_image_block(vocab, sem, pix))
    assert next(iter(ds.iterable()))["input_ids"].ndim == 1
    with pytest.raises(ValueError, match="needs the unified model's vocabulary"):
        TokenDataset(path, output="image_block")
    with pytest.raises(ValueError, match="pixel_codebook_size=1024 but the tokens were encoded with 512"):
        TokenDataset(path, output="image_block", vocabulary=VisionVocabulary(1000, 256, 1024))


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dualvitok encode"):
        TokenDataset(tmp_path)


def test_model_fingerprint_follows_the_weights(tiny_model):
    import copy

    other = copy.deepcopy(tiny_model)
    assert model_fingerprint(other) == model_fingerprint(tiny_model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(other) != model_fingerprint(tiny_model)


def test_output_names_stay_inside_and_do_not_collide():
    names = output_names(["a/photo.jpg", "a/photo.png", "b/x.jpg", "../../etc/passwd", "/abs/y.jpg",
                          "file.parquet#12", "shard.tar/000.jpg", "caf\\xe9.jpg"])
    assert names == ["a/photo.jpg.png", "a/photo.png.png", "b/x.png", "__/__/etc/passwd.png", "abs/y.png",
                     "file.parquet_12.png", "shard.tar/000.png", "caf_xe9.png"]


def test_decode_writes_the_models_reconstructions(tiny_model, tmp_path, sample_image_paths, capsys, caplog):
    tiny_model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for p in sample_image_paths[:2]:
        shutil.copy(p, images / p.name)
    shutil.copy(sample_image_paths[2], images / "sub" / "third.jpg")
    tokens, out = tmp_path / "tokens", tmp_path / "decoded"
    assert main(["encode", str(images), "--output", str(tokens), "--model", str(tmp_path / "model"), "--size", "32",
                 "48", "--no-progress", "--default-malloc"]) == 0
    args = ["decode", str(tokens), "--output", str(out), "--dtype", "float32", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0  # the model comes from meta.json
    model = DualViTok.from_pretrained(tmp_path / "model")
    for r in iter_tokens(tokens):
        name = r.path.rsplit(".", 1)[0] + ".png"
        with torch.no_grad():
            expected = model.decode_indices(r.semantic_indices[None], r.pixel_indices[None])
        want = np.asarray(ImageProcessor().postprocess(expected)[0])
        got = np.asarray(Image.open(out / name))
        assert got.shape == (32, 48, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (out / "sub" / "third.png").is_file()
    capsys.readouterr()
    assert main(args) == 1 and "--resume" in capsys.readouterr().err
    (out / "sub" / "third.png").unlink()
    assert main([*args, "--resume"]) == 0 and "decoded 1 images" in capsys.readouterr().out
    caplog.clear()
    assert main([*args, "--overwrite", "--model", "dualvitok_tiny", "--limit", "1"]) == 0
    assert "encoded with another model" in caplog.text
