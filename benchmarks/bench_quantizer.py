"""Nearest-code search: dualvitok's tiled search against ``torch.cdist`` + ``argmin``, speed and memory.

    python benchmarks/bench_quantizer.py            # codebooks up to 98,304, batches 256..4,096
    python benchmarks/bench_quantizer.py --quick

Both run in float32 on the same inputs in one process; the ratio column is cdist time / dualvitok time.
Peak memory is the largest RSS increase sampled every millisecond during one call.
"""

from __future__ import annotations

import argparse
import gc

import torch
from _common import PeakMemory, best_time, machine, table

from dualvitok.quantizers import DEFAULT_MEMORY_BUDGET, nearest_code, prepare_codebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-mib", type=float, default=DEFAULT_MEMORY_BUDGET / 2**20)
    args = parser.parse_args()
    budget = int(args.budget_mib * 2**20)
    sizes = [32768, 98304] if args.quick else [4096, 32768, 98304]
    batches = [1024] if args.quick else [256, 1024, 4096]
    torch.manual_seed(0)
    rows = []
    for k in sizes:
        codebook = torch.randn(k, 32) * 32**-0.5
        prepared = prepare_codebook(codebook)
        for n in batches:
            x = torch.randn(n, 32) * 32**-0.5
            expected = torch.cdist(x, codebook).argmin(1)
            got = nearest_code(x, codebook, budget, prepared).indices
            agree = (got == expected).float().mean().item()
            t_ref = best_time(lambda x=x, codebook=codebook: torch.cdist(x, codebook).argmin(1))
            t_ours = best_time(
                lambda x=x, codebook=codebook, prepared=prepared: nearest_code(x, codebook, budget, prepared)
            )
            gc.collect()
            with PeakMemory() as m_ref:
                torch.cdist(x, codebook).argmin(1)
            gc.collect()
            with PeakMemory() as m_ours:
                nearest_code(x, codebook, budget, prepared)
            rows.append([f"{n:,}", f"{k:,}", f"{n / t_ref:,.0f}", f"{n / t_ours:,.0f}", f"{t_ref / t_ours:.2f}x",
                         f"{m_ref.peak / 2**20:.1f}", f"{m_ours.peak / 2**20:.1f}", f"{agree:.4f}"])
            print(rows[-1], flush=True)
    print(f"\nMachine: {machine()}; budget {budget / 2**20:.0f} MiB\n")
    print(table(["vectors", "codes", "cdist+argmin vec/s", "dualvitok vec/s", "speed-up", "cdist peak MiB",
                 "dualvitok peak MiB", "indices equal"], rows))


if __name__ == "__main__":
    main()
