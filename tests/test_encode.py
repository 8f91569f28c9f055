"""``dualvitok encode``: tokens equal direct encoding; checked resume; kill -9 safety; one writer; bad input."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dualvitok import DualViTok, ImageProcessor, create_model
from dualvitok.cli import main
from dualvitok.tokens import SKIPPED_NAME, index_files, iter_tokens, read_index, shard_metadata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup(tiny_model, tmp_path, sample_image_paths):
    """A saved tiny model, a folder of 5 photos (one in a subfolder) and a broken JPEG, and the base arguments."""
    tiny_model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for p in sample_image_paths[:4]:
        shutil.copy(p, images / p.name)
    shutil.copy(sample_image_paths[4], images / "sub" / sample_image_paths[4].name)
    (images / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "tokens"
    args = ["encode", str(images), "--output", str(out), "--model", str(tmp_path / "model"), "--size", "32", "32",
            "--batch-size", "2", "--shard-size", "2", "--no-progress", "--dtype", "bfloat16",
            "--default-malloc"]  # keep the test process's allocator settings
    return tmp_path, images, out, args


def _direct(model_dir: Path, images: Path, size=(32, 32)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model = DualViTok.from_pretrained(model_dir)
    processor = ImageProcessor(size=size)
    result = {}
    for p in sorted(images.rglob("*.jpg")):
        if p.name == "broken.jpg" or not p.is_file():
            continue
        with torch.no_grad():
            enc = model.encode(processor(p))
        result[p.relative_to(images).as_posix()] = (enc.semantic_indices[0], enc.pixel_indices[0])
    return result


def _check_folder(out: Path, expected: dict) -> None:
    """Every expected key exactly once, tokens equal, every shard loads and is referenced, no temp files."""
    records = read_index(out)
    keys = [r["path"] for r in records]
    assert sorted(keys) == sorted(expected), "each input exactly once in the index"
    for r in iter_tokens(out):
        semantic, pixel = expected[r.path]
        assert torch.equal(r.semantic_indices, semantic) and torch.equal(r.pixel_indices, pixel)
    shards = sorted(p.name for p in out.glob("tokens-*.safetensors"))
    assert shards == sorted({r["shard"] for r in records}), "no orphan shard"
    for name in shards:
        load_file(out / name)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "no leftover temp file"


def test_encode_folder_matches_direct_encoding_and_resumes(setup, sample_image_paths, capsys):
    tmp_path, images, out, args = setup
    (images / "folder.jpg").mkdir()  # named like an image: counted and listed, not silently ignored
    assert main([*args, "--dtype", "float32"]) == 0
    assert "skipped 2 unreadable: folder.jpg, broken.jpg" in capsys.readouterr().out
    skipped = [json.loads(line) for line in (out / SKIPPED_NAME).read_text().splitlines()]
    assert [s["path"] for s in skipped] == ["folder.jpg", "broken.jpg"]
    assert "a directory" in skipped[0]["reason"] and "cannot identify image" in skipped[1]["reason"]
    expected = _direct(tmp_path / "model", images)
    _check_folder(out, expected)
    header = shard_metadata(sorted(out.glob("tokens-*.safetensors"))[0])
    meta = json.loads((out / "meta.json").read_text())
    assert header["model_sha256"] == meta["model_sha256"] and header["count"] == 2
    assert meta["model"] == str((tmp_path / "model").resolve()) == header["model"]  # decode may run elsewhere
    assert header["pixel_codebook_size"] == 512 and header["pixel_grids"] == [[2, 2]]
    assert header["sources"] == [r["path"] for r in read_index(out)[:2]]
    # a second run adds only new images, with --resume
    shutil.copy(sample_image_paths[5], images / sample_image_paths[5].name)
    assert main([*args, "--dtype", "float32", "--resume"]) == 0
    _check_folder(out, _direct(tmp_path / "model", images))


def test_resume_refuses_other_settings_and_overwrite_starts_over(setup, monkeypatch, capsys):
    tmp_path, images, out, args = setup
    assert main([*args, "--limit", "3"]) == 0  # broken.jpg and two photos
    capsys.readouterr()
    assert main(args) == 1  # neither --resume nor --overwrite
    assert "--resume to continue it" in capsys.readouterr().err
    other = tmp_path / "other"
    torch.manual_seed(1)
    create_model("dualvitok_tiny").save_pretrained(other)
    cases = [(["--model", str(other)], "model_sha256 was"), (["--size", "64", "64"], "size_policy was"),
             (["--dtype", "float32"], "dtype was 'bfloat16', now 'float32'"),
             (["--max-pixels", "4096"], "size_policy was")]
    for extra, message in cases:
        assert main([*args, "--resume", *extra]) == 1
        assert message in capsys.readouterr().err
    import dualvitok.version

    monkeypatch.setattr(dualvitok.version, "__version__", "99.0")
    assert main([*args, "--resume"]) == 1 and "dualvitok_version was" in capsys.readouterr().err
    monkeypatch.undo()
    assert len(read_index(out)) == 2
    assert main([*args, "--overwrite", "--dtype", "float32", "--size", "64", "64"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["size_policy"]["size"] == [64, 64]
    _check_folder(out, _direct(tmp_path / "model", images, (64, 64)))


def test_second_writer_into_one_output_is_refused(setup, capsys):
    from dualvitok._utils.locking import output_lock

    _, _, out, args = setup
    with output_lock(out, "encode"):
        assert main(args) == 1
    assert "another dualvitok encode" in capsys.readouterr().err
    assert not list(out.glob("tokens-*")) and not (out / "meta.json").exists()


def test_interrupted_run_leftovers_are_cleaned_and_torn_index_line_ignored(setup, caplog):
    tmp_path, images, out, args = setup
    assert main([*args, "--dtype", "float32"]) == 0
    index = out / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]) + lines[-1][:25])  # torn last line: a record cut by a power loss
    (out / ".tokens-r000-00009.safetensors.abc.tmp").write_bytes(b"x" * 100)  # a shard write killed midway
    shutil.copy(out / "tokens-r000-00000.safetensors", out / "tokens-r000-00007.safetensors")  # orphan shard
    assert len(read_index(out)) == 4 and "incomplete last line" in caplog.text
    assert len(list(iter_tokens(out))) == 4
    assert main([*args, "--dtype", "float32", "--resume"]) == 0
    _check_folder(out, _direct(tmp_path / "model", images))
    # a damaged middle line is an error, never skipped
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(lines[0] + "{garbage\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match="line 2 is not a valid record"):
        read_index(out)
    with pytest.raises(ValueError, match="line 2"):
        list(iter_tokens(out))
    assert main([*args, "--resume"]) == 1


def _child(args: list[str]) -> None:
    torch.set_num_threads(1)
    os._exit(main(args))


def test_kill_at_random_moments_then_resume_gives_each_image_once(setup):
    """kill -9 the encoder at random moments, many times; resume; the folder is complete and consistent."""
    tmp_path, images, out, args = setup
    for i in range(6):  # more images -> more shard writes to interrupt
        shutil.copy(images / "sub" / next((images / "sub").iterdir()).name, images / f"copy{i}.jpg")
    args = [*args, "--dtype", "float32", "--shard-size", "1", "--batch-size", "1", "--resume"]
    ctx = multiprocessing.get_context("fork")
    start = time.perf_counter()
    full = ctx.Process(target=_child, args=([*args[:3], str(tmp_path / "ref"), *args[4:]],))
    full.start()
    full.join(120)
    duration = time.perf_counter() - start
    assert full.exitcode == 0
    expected = _direct(tmp_path / "model", images)
    rng = random.Random(0)
    kills = 0
    for _ in range(24):  # until 6 kills: a resumed run that had little left may finish before its kill moment
        p = ctx.Process(target=_child, args=(args,))
        p.start()
        time.sleep(rng.uniform(0.05, duration))
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.join(60)
        for shard in out.glob("tokens-*.safetensors"):  # a shard on disk is always complete
            load_file(shard)
        if p.exitcode == 0:  # it finished: the folder is complete; start over to interrupt more writes
            _check_folder(out, expected)
            shutil.rmtree(out)
        if kills == 6:
            break
    assert kills == 6
    p = ctx.Process(target=_child, args=(args,))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    _check_folder(out, expected)


def test_workers_and_fast_path(setup):
    """Two DataLoader workers write the same tokens as none; the fast path writes the optimized model's tokens."""
    tmp_path, images, out, args = setup
    assert main([*args, "--num-workers", "2"]) == 0
    fast = DualViTok.from_pretrained(tmp_path / "model").optimize_for_inference()
    reference = DualViTok.from_pretrained(tmp_path / "model")
    processor = ImageProcessor(size=(32, 32))
    records = list(iter_tokens(out))
    assert len(records) == 5
    equal = total = 0
    for r in records:
        x = processor(images / r.path)
        with torch.inference_mode():
            enc, enc32 = fast.encode(x), reference.encode(x)
        assert torch.equal(r.semantic_indices, enc.semantic_indices[0])
        assert torch.equal(r.pixel_indices, enc.pixel_indices[0])
        equal += int((r.pixel_indices == enc32.pixel_indices[0]).sum())
        total += r.pixel_indices.numel()
    assert equal / total >= 0.9  # "guarded" (default): near ties may flip against float32
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fast_path"] is True and meta["indices"] == "guarded"


def test_exact_indices_option(setup, capsys):
    """--indices exact: the pixel tokens equal the float32 path's; resuming with another mode is refused by name."""
    tmp_path, images, out, args = setup
    assert main([*args, "--indices", "exact", "--limit", "2"]) == 0
    reference = DualViTok.from_pretrained(tmp_path / "model")
    processor = ImageProcessor(size=(32, 32))
    for r in iter_tokens(out):
        with torch.inference_mode():
            assert torch.equal(r.pixel_indices, reference.encode(processor(images / r.path)).pixel_indices[0])
    assert json.loads((out / "meta.json").read_text())["indices"] == "exact"
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    assert "indices was 'exact', now 'guarded'" in capsys.readouterr().err


def test_non_utf8_file_names_are_escaped_in_json(setup):
    tmp_path, images, out, args = setup
    name = os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(next(images.glob("*.jpg")), images / name)
    assert main(args) == 0
    keys = {r["path"] for r in read_index(out)}
    assert "caf\\xe9.jpg" in keys  # readable by any JSON parser
    json.loads((out / "meta.json").read_text(encoding="utf-8"))
    (out / "index.jsonl").read_text(encoding="utf-8")
    assert main([*args, "--resume"]) == 0 and len(read_index(out)) == 6  # the escaped key is recognised as done


@pytest.mark.parametrize("extra,message", [
    (["--limit", "-1"], "must be a positive integer"), (["--limit", "0"], "must be a positive integer"),
    (["--max-pixels", "0"], "must be at least 1024"), (["--size", "-16", "-16"], "positive multiples of 16"),
    (["--size", "17", "16"], "positive multiples of 16"), (["--batch-size", "0"], "must be a positive integer"),
    (["--shard-size", "0"], "must be a positive integer"), (["--num-workers", "-1"], "must be 0 or more"),
    (["--dtype", "fp8"], "invalid choice"), (["--resume", "--overwrite"], "not allowed with"),
])
def test_cli_edges_are_clear_errors(setup, capsys, extra, message):
    _, _, out, args = setup
    with pytest.raises(SystemExit) as e:
        main([*args, *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    code = main(["encode", str(tmp_path / "nope"), "--output", str(tmp_path / "t"), "--model", "dualvitok_tiny"])
    assert code == 1 and "input not found" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_an_image_the_model_refuses_is_skipped_not_fatal(setup, monkeypatch, capsys):
    """A batch the model rejects (ValueError) is retried image by image; only the refused image is skipped."""
    tmp_path, images, out, args = setup
    original = DualViTok.encode

    def picky(self, x):
        if (x.std(dim=(1, 2, 3)) < 0.01).any():  # a flat image
            raise ValueError("refused")
        return original(self, x)

    white = images / "white.jpg"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    monkeypatch.setattr(DualViTok, "encode", picky)
    assert main([*args, "--dtype", "float32"]) == 0
    assert "white.jpg" in capsys.readouterr().out
    keys = {r["path"] for r in read_index(out)}
    assert "white.jpg" not in keys and len(keys) == 5


def test_encode_keeps_freed_memory_unless_told_not_to(setup, monkeypatch):
    import dualvitok.devices

    tmp_path, images, _, _ = setup
    calls = []
    monkeypatch.setattr(dualvitok.devices, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    base = ["encode", str(images), "--model", str(tmp_path / "model"), "--size", "32", "32", "--limit", "1"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 0 and calls == [1]  # float32 at this size: direct
    assert main([*base, "--output", str(tmp_path / "b"), "--default-malloc"]) == 0 and calls == [1]
    # bf16: through the fast path's CPU plan, which records it
    plans = []
    prepare = DualViTok.optimize_for_inference
    monkeypatch.setattr(DualViTok, "optimize_for_inference",
                        lambda self, *a, **k: plans.append(prepare(self, *a, **k).inference_plan) or self)
    assert main([*base, "--output", str(tmp_path / "c"), "--dtype", "bfloat16"]) == 0 and calls == [1, 1]
    assert main([*base, "--output", str(tmp_path / "d"), "--dtype", "bfloat16", "--default-malloc"]) == 0
    assert calls == [1, 1] and [p.keep_freed_memory for p in plans] == [True, False]


def test_two_torchrun_processes_write_one_index(setup):
    """2 gloo ranks: disjoint parts in their own shards and index files, read back as one index, as 1 process."""
    tmp_path, images, out, args = setup
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29500 + os.getpid() % 1000), "-m", "dualvitok", *args, "--dtype", "float32", "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout and "skipped 1 unreadable: broken.jpg" in result.stdout
    assert [p.name for p in index_files(out)] == ["index.jsonl", "index.rank001.jsonl"]
    shards = {p.name[:11] for p in out.glob("tokens-*.safetensors")}
    assert shards == {"tokens-r000", "tokens-r001"}
    _check_folder(out, _direct(tmp_path / "model", images))


def test_two_torchrun_processes_agree_on_the_fast_path(setup):
    """2 gloo ranks on the fast path: only rank 0 measures bf16 (both ranks then plan with its number), and the
    kernel-choice collectives complete on both."""
    tmp_path, images, out, args = setup
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29500 + (os.getpid() + 7) % 1000), "-m", "dualvitok", "--log-level", "info", *args, "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    plans = [line for line in log.splitlines() if "optimize_for_inference (cpu plan" in line]
    assert len(plans) == 2, log[-3000:]
    assert log.count("probe: measured in full") <= 1  # rank 1 never measures
    # on a CPU without bf16 instructions nothing is measured and this checks only that the collectives complete;
    # what each rank sends is tested CPU-independently in tests/test_inference.py
    if "matrix products" in plans[0]:  # the rule used a measurement: rank 0's, on both ranks
        speedups = [line.split("matrix products ")[1].split("x float32")[0] for line in plans]
        assert speedups[0] == speedups[1] and log.count("probe: measured in full") == 1
    assert "on 2 process(es)" in result.stdout


def test_disk_full_names_the_file_and_resume_completes(setup, monkeypatch, capsys):
    """ENOSPC while writing the second shard: a clear error naming it; the first shard stays; a resume completes."""
    import errno

    import dualvitok.tokens

    tmp_path, images, out, args = setup
    original, calls = dualvitok.tokens.save_file, []

    def full_after_one(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(dualvitok.tokens, "save_file", full_after_one)
    assert main([*args, "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and "tokens-r000-00001.safetensors" in err
    assert len(read_index(out)) == 2 and not [p for p in out.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    assert main([*args, "--dtype", "float32", "--resume"]) == 0
    _check_folder(out, _direct(tmp_path / "model", images))


def test_deprecated_fp32_flag_means_dtype_float32(setup, caplog):
    _, _, out, args = setup
    assert main([*args, "--fp32", "--limit", "2"]) == 0
    assert json.loads((out / "meta.json").read_text())["dtype"] == "float32" and "use --dtype float32" in caplog.text


@pytest.mark.parametrize("size, expected", [(["--size", "32", "32"], "float32"), (["--size", "128", "128"], "bfloat16"),
                                            (["--max-pixels", "4096"], "float32")])
def test_default_dtype_is_float32_where_the_fast_path_is_not_faster(setup, caplog, size, expected):
    """Without --dtype: tiny images with a narrow model get float32 (and it says so); larger ones the fast path."""
    tmp_path, images, out, args = setup
    base = [a for a in args if a not in ("--dtype", "bfloat16")]
    base = base[:base.index("--size")] + base[base.index("--size") + 3:]
    with caplog.at_level(logging.INFO, logger="dualvitok.commands.encode"):
        assert main([*base, *size, "--limit", "1"]) == 0
    assert json.loads((out / "meta.json").read_text())["dtype"] == expected
    assert ("encode faster in float32" in caplog.text) == (expected == "float32")
