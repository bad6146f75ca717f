"""Writing files so that nothing is ever left half-written: write a temporary file beside the target,
then ``os.replace`` it into place (atomic on POSIX). Readers see the old file or the new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (with any library: h5py, PIL, matplotlib);
    on normal exit it replaces ``path``, on an exception it is removed. Parent directories are created;
    the file gets the usual ``0644``-minus-umask permissions (``mkstemp`` alone would leave ``0600``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Atomically write ``path`` through ``write(binary_file)`` (e.g. ``lambda f: np.save(f, x)``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    payload = json.dumps(data, indent=2).encode()
    write_bytes_atomic(path, lambda f: f.write(payload))


def write_path_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Atomically write ``path`` through ``write(temporary_path)``, for libraries that open the file
    themselves (``h5py.File(tmp, "w")``, ``image.save(tmp, format=...)``, ``fig.savefig(tmp, ...)``)."""
    with atomic_path(path) as tmp:
        write(tmp)


#: Name prefix of the empty file :func:`ensure_writable_dir` creates and removes at once (ignored by
#: checks that want an empty folder).
WRITE_PROBE_PREFIX = ".write-probe-"


def ensure_writable_dir(path: str | Path, what: str = "output") -> Path:
    """Create the directory ``path`` (and its parents) and prove that a file can be written in it now,
    before hours of work whose results would have nowhere to go.

    Args:
        path: the directory.
        what: how the message names it (e.g. ``--output``).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        CosmosPolicyError: one line: ``path`` is a file, cannot be created, or is read-only.
    """
    from .errors import CosmosPolicyError, os_error_line

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CosmosPolicyError(f"{path}: {what} is a file, expected a directory (choose another {what})")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=WRITE_PROBE_PREFIX)
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    except OSError as err:
        raise CosmosPolicyError(f"{path}: {what} directory is not writable ({os_error_line(err)})") from None
    return path
