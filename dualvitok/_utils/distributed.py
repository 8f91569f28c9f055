"""Joining torchrun's process group, and the collectives evaluation and training share (gloo on CPU, nccl on CUDA).

The process that calls :func:`init_distributed` first owns the group (``DistInfo.initialized_here``) and is the one
that tears it down with :func:`shutdown_distributed`; everything else only reads the group.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """``rank``, ``world_size``, ``local_rank`` of this process (0, 1, 0 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device | str) -> DistInfo:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun), if any.

    An already initialised group is reused (and not owned). CUDA processes are pinned to ``cuda:LOCAL_RANK``.
    """
    device_type = torch.device(device).type
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} but RANK is not set; start distributed runs with torchrun")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=world)
    logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world, backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if ``info`` says this code created it."""
    if info.initialized_here and is_distributed():
        dist.destroy_process_group()


def reduce_device() -> torch.device:
    """The device collectives run on: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (dtype kept, result on the CPU); identity without a process group."""
    if not is_distributed():
        return t
    out = t.to(reduce_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over processes (returned unchanged when not distributed)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_gather_json(obj) -> list:
    """Gather a JSON-serialisable object from every process (as UTF-8 bytes, no pickle), in rank order."""
    if not is_distributed():
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    device = reduce_device()
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(s.item())].cpu().tolist()).decode()) for c, s in zip(chunks, sizes, strict=True)]


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if is_distributed():
        dist.barrier()
