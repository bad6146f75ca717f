"""One writer per output folder: an exclusive lock (``filelock``, an ``flock`` on ``<folder>/.cosmos-policy.lock``)
held while a conversion or a latent cache is written.

Two ``cosmos-policy convert`` runs, or the ranks of one distributed ``fit`` whose data module converts
on first use (``convert_from``), may start on the same folder at the same moment. Without the lock both
write the same shards and the same manifest. With it, the first writes; a second with the same settings
waits and then finds the finished result, and one with other settings is refused at once. The kernel
releases an ``flock`` when its process dies, even by ``kill -9``, so a crashed run never leaves a
stale lock behind; the empty lock file stays (deleting it would let a waiting process lock a file
that a third has just re-created).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

#: Name of the lock file inside the locked folder (hidden; ignored when a folder must be empty).
LOCK_NAME = ".cosmos-policy.lock"


@contextmanager
def folder_lock(folder: str | Path, what: str, before_waiting: Callable[[], None] | None = None,
                poll_s: float = 0.5) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: the output folder.
        what: what is written, for the waiting message (e.g. ``conversion``).
        before_waiting: called once when another process holds the lock, before waiting for it; raise
            from it to refuse instead of waiting (e.g. the other process writes with other settings).
        poll_s: how often a waiting process retries.

    Yields:
        the lock file's path.

    Raises:
        whatever ``before_waiting`` raises; OSError when the folder cannot be created.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if before_waiting is not None:
            before_waiting()
        print(f"{folder}: another process is writing a {what} here; waiting for it to finish", file=sys.stderr,
              flush=True)
        lock.acquire(poll_interval=poll_s)
    try:
        yield path
    finally:
        lock.release()


__all__ = ["LOCK_NAME", "folder_lock"]
