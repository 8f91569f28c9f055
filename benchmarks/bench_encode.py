"""Throughput and memory of ``dualvitok encode``: DataLoader workers, torchrun processes, peak RSS vs dataset size.

    python benchmarks/bench_encode.py                               # demo model, 256x256, 200 files; RSS 200 vs 2,000
    python benchmarks/bench_encode.py --size 64 --files 200 --rss-files 200 2000 --parts workers procs rss
    python benchmarks/bench_encode.py --device cuda --workers 0 2 4 8 --batch-size 32

Every configuration runs ``dualvitok encode`` in a fresh process on the bundled photos repeated (hard links) to
``--files`` files, into a new folder. images/s is the command's own count over its encoding loop (model loading and
start-up excluded); peak RSS is ``ru_maxrss`` of the main process and, separately, the largest of its DataLoader
workers. Parts:

* ``workers``: 0, 1, 2 DataLoader workers (``--workers``), one process (``--threads`` torch threads);
* ``procs``: 1 process with 1 thread, 2 torchrun processes with 1 thread each (gloo / one device each), 1 process
  with 2 threads (no workers);
* ``rss``: peak RSS with 1 worker for 200 vs 2,000 files (``--rss-files``), on copies of the photos downscaled to
  128 px (so that the long run stays short); it must not grow with the number of files.

The results (Markdown) go to ``--output`` (default ``benchmarks/results/encode.md``) with the machine, torch version
and the load average before and after, since a busy machine changes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, table

ROOT = Path(__file__).resolve().parents[1]
CHILD_NOTE = ("*`ru_maxrss` of the largest child process: a forked child counts the pages it shares with the main "
              "process, and even without workers a short-lived child (glibc's `find_library` helper) is counted.")

CHILD = r"""
import json, resource, sys
from dualvitok.cli import main
code = main(sys.argv[1:])
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("RUSAGE " + json.dumps({"self_kb": self_kb, "children_kb": children_kb}))
sys.exit(code)
"""


def make_files(folder: Path, count: int, small: bool = False) -> Path:
    """``count`` image files in ``folder``: hard links to (or downscaled copies of) the bundled photos."""
    from PIL import Image

    from dualvitok.assets import sample_images

    folder.mkdir(parents=True, exist_ok=True)
    photos = sample_images()
    sources = photos
    if small:
        sources = []
        for p in photos:
            target = folder.parent / f"small_{p.stem}.jpg"
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((128, 128))
                im.save(target, quality=90)
            sources.append(target)
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"{i:05d}_{src.stem}.jpg"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy(src, dst)
    return folder


def run_encode(images: Path, out: Path, args: argparse.Namespace, workers: int, threads: int, procs: int = 1,
               size: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    side = str(size or args.size)
    cli = ["-q", "encode", str(images), "--output", str(out), "--model", args.model, "--size", side, side,
           "--batch-size", str(args.batch_size), "--num-workers", str(workers), "--device", args.device,
           "--dtype", args.dtype, "--no-progress"]
    if procs == 1:
        cmd = [sys.executable, "-c", CHILD, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(29600 + os.getpid() % 300), "-m", "dualvitok", *cli]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    m = re.search(r"encoded (\d+) images in ([\d.]+) s", result.stdout)
    usage = re.search(r"RUSAGE (\{.*\})", result.stdout)
    rss = json.loads(usage.group(1)) if usage else {}
    shutil.rmtree(out, ignore_errors=True)
    count, seconds = int(m.group(1)), float(m.group(2))
    return {"images": count, "seconds": seconds, "img_per_s": count / seconds, "wall": wall,
            "rss_mb": rss.get("self_kb", 0) / 1024, "worker_rss_mb": rss.get("children_kb", 0) / 1024}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--size", type=int, default=256, help="encode at SIZE x SIZE (default 256)")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the workers part (default 1)")
    parser.add_argument("--rss-files", type=int, nargs=2, default=[200, 2000])
    parser.add_argument("--rss-size", type=int, default=64, help="encode size of the RSS part (default 64)")
    parser.add_argument("--parts", nargs="+", default=["workers", "procs", "rss"], choices=["workers", "procs", "rss"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--note", default="", help="a line added to the results (e.g. 'busy machine')")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "encode.md"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    lines = ["# `dualvitok encode` throughput and memory", "",
             f"Machine: {machine()}. Load average before: {load()}.",
             f"Command: `python benchmarks/bench_encode.py {' '.join(sys.argv[1:])}`. Model `{args.model}`, "
             f"--dtype {args.dtype}, --device {args.device}, batch {args.batch_size}.", ""]
    if args.note:
        lines += [args.note, ""]
    try:
        images = make_files(tmp / "images", args.files)
        if "workers" in args.parts:
            rows, base = [], None
            for w in args.workers:
                r = run_encode(images, tmp / "out", args, w, args.threads)
                base = base or r["img_per_s"]
                rows.append([w, r["images"], f"{r['seconds']:.1f}", f"{r['img_per_s']:.2f}",
                             f"{r['img_per_s'] / base:.2f}x", f"{r['rss_mb']:.0f}", f"{r['worker_rss_mb']:.0f}"])
                print(rows[-1], flush=True)
            lines += [f"## DataLoader workers ({args.files} files at {args.size}x{args.size}, {args.threads} torch "
                      "thread(s))", "",
                      table(["workers", "images", "encode s", "images/s", "vs 0 workers", "peak RSS MB",
                             "largest child's peak RSS MB*"], rows), "", CHILD_NOTE, ""]
        if "procs" in args.parts:
            rows = []
            for label, procs, threads in (("1 process, 1 thread", 1, 1), ("2 torchrun processes, 1 thread each", 2, 1),
                                          ("1 process, 2 threads", 1, 2)):
                r = run_encode(images, tmp / "out", args, 0, threads, procs)
                # with torchrun the printed time is rank 0's loop; images are all ranks' (they run in parallel)
                rows.append([label, r["images"], f"{r['seconds']:.1f}", f"{r['img_per_s']:.2f}", f"{r['wall']:.1f}"])
                print(rows[-1], flush=True)
            lines += [f"## Processes vs threads ({args.files} files at {args.size}x{args.size}, no workers)", "",
                      table(["configuration", "images", "encode s", "images/s", "wall s (with start-up)"], rows),
                      ""]
        if "rss" in args.parts:
            rows = []
            for n in args.rss_files:
                small = make_files(tmp / f"small{n}", n, small=True)
                r = run_encode(small, tmp / "out", args, 1, 1, size=args.rss_size)
                rows.append([n, f"{r['img_per_s']:.2f}", f"{r['rss_mb']:.0f}", f"{r['worker_rss_mb']:.0f}"])
                print(rows[-1], flush=True)
            lines += [f"## Peak RSS vs number of files (photos downscaled to 128 px, encoded at "
                      f"{args.rss_size}x{args.rss_size}, 1 worker)", "",
                      table(["files", "images/s", "main peak RSS MB", "largest child's peak RSS MB*"], rows), "",
                      CHILD_NOTE, ""]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines += [f"Load average after: {load()}."]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
