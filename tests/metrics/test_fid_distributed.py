"""Streaming FID statistics and JSON gathering merged across 2 gloo processes equal the single-set numpy values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    from dualvitok.metrics import GaussianStatistics
    from dualvitok.evaluation.distributed import all_gather_json, all_reduce_sum

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parts = [np.random.default_rng(r).standard_normal((7 + 5 * r, 6)) + r for r in range(2)]
    stats = GaussianStatistics(6)
    stats.update(torch.from_numpy(parts[rank]))
    stats.all_gather()
    everything = np.concatenate(parts)
    ok = (stats.count == len(everything) and np.allclose(stats.mu, everything.mean(0), rtol=1e-12)
          and np.allclose(stats.sigma, np.cov(everything, rowvar=False), rtol=1e-10))
    gathered = all_gather_json({"rank": rank, "files": ["x" * (rank + 1)]})
    ok = ok and gathered == [{"rank": 0, "files": ["x"]}, {"rank": 1, "files": ["xx"]}]
    ok = ok and int(all_reduce_sum(torch.tensor([rank + 1], dtype=torch.int64))[0]) == 3
    with open(sys.argv[1] + f".{rank}", "w") as f:
        f.write("ok" if ok else "mismatch")
    dist.destroy_process_group()
''')


def test_statistics_gathered_over_two_processes(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.0").read_text() == "ok" and (tmp_path / "out.1").read_text() == "ok"
