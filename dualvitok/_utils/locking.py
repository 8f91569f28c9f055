"""One writer per output folder: an exclusive, non-blocking ``flock`` on a lock file inside it.

The lock is released by the kernel when the process ends, however it ends (``kill -9`` included), so a stale lock
never blocks a resume. Under ``torchrun`` each rank locks its own name (``.lock.rank{N}``), so the ranks of one job
share a folder while a second job into the same folder is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX; on Windows the lock is a no-op (documented)
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]


class OutputLockedError(RuntimeError):
    """Another process is writing into the same output folder."""


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "run", rank: int | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the duration of the block.

    Args:
        folder: the output folder (created if missing).
        what: the command, for the message (``"encode"``, ``"train"``, ``"evaluate"``).
        rank: the torchrun rank; each rank takes its own lock (default: ``RANK`` from the environment, else 0).

    Raises:
        OutputLockedError: another process holds the lock; the message names its pid and what to do.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    path = folder / f".lock.rank{rank}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise OutputLockedError(
                    f"another dualvitok {what} (pid {holder}) is writing into {folder}; wait for it to finish, "
                    f"or choose another --output (two writers into one folder would mix their files)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
