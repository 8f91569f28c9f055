"""Threads for the native kernels: a kernel call works on a range of rows, and a caller splits its rows over PyTorch's
intra-op thread count with :func:`split` and runs the calls with :func:`run` (ctypes releases the GIL, so the pool's
threads run in parallel; the last call runs on the calling thread)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}  # thread count -> pool, never shut down while the process lives


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's pool threads (and maybe a held lock): start afresh there."""
    global _lock, _pools
    _lock, _pools = threading.Lock(), {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def threads() -> tuple[ThreadPoolExecutor, int]:
    """A pool for PyTorch's intra-op thread count of the calling thread, and that count; one pool per count, kept, so
    a pool is never shut down under another caller."""
    count = max(1, torch.get_num_threads())
    with _lock:
        if count not in _pools:
            _pools[count] = ThreadPoolExecutor(max(1, count - 1), thread_name_prefix="dualvitok-native")
        return _pools[count], count


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` as ``parts`` consecutive ranges of near-equal length."""
    return [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]


def run(pool: ThreadPoolExecutor, calls: list[Callable[[], None]]) -> None:
    """Run the calls on the pool's threads, the last one on this thread; always wait for all of them before
    returning or raising (they write and read the caller's tensors, which must outlive them)."""
    futures = [pool.submit(call) for call in calls[:-1]]
    try:
        calls[-1]()
    finally:
        wait(futures)
    for future in futures:
        future.result()  # re-raise a worker's error
