"""Peak memory of one training forward + backward with and without ``run.activation_checkpointing``.

Each setting runs in a fresh process (so the CPU allocator's cached blocks of one do not hide the other's peak): the
tiny tokenizer at 256x256, batch 4, float32. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on the CPU the
increase of the resident set size sampled every millisecond (``_common.PeakMemory``), plus the bytes of the tensors
autograd keeps for backward (exact, allocator-independent). Usage::

    python benchmarks/bench_activation_checkpointing.py [--device cuda] [--size 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(checkpointing: bool, device: str, size: int, batch: int) -> dict:
    import torch
    from _common import PeakMemory

    from dualvitok import create_model
    from dualvitok.training.run import apply_activation_checkpointing

    torch.manual_seed(0)
    model = create_model("dualvitok_tiny").to(device).train()
    if checkpointing:
        apply_activation_checkpointing(model)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as peak, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = out.reconstruction.square().mean() + out.semantic_loss + out.pixel_loss
        loss.backward()
    result = {"activation_checkpointing": checkpointing, "saved_for_backward_mib": saved[0] / 2**20,
              "peak_rss_increase_mib": peak.peak / 2**20}
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "on", args.device, args.size, args.batch)))
        return
    rows = []
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--one", setting, "--device", args.device, "--size",
                              str(args.size), "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
