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
