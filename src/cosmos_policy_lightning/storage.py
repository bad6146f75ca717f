"""Where a dataset's files live: a local folder, or any URL that fsspec understands.

A converted dataset (and its latent cache) may sit on object storage, on the Hugging Face Hub or behind a
web server: ``s3://bucket/ds``, ``gs://...``, ``hf://datasets/<org>/<name>``, ``https://host/ds``,
``memory://ds``, ``file:///abs/ds``. :func:`location` turns such a string into a path object with the
``pathlib`` API (``/``, ``name``, ``open``, ``read_text``, ``is_file``, ``stat().st_size``): a plain
``pathlib.Path`` for a local path, a ``universal_pathlib`` ``UPath`` (fsspec underneath) for a URL, so the
readers have one code path for both. Credentials come from each filesystem's usual environment
(``AWS_*`` / ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``, ...), never from our options.

What reads remotely: the manifest, ``stats.json``, the text embeddings and the shards, which are streamed
(read in blocks as webdataset parses them, never downloaded whole; ``data/integrity.py``). What does not:
conversion and building a latent cache write local folders (push them afterwards:
``cosmos-policy push-dataset``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import DataError

#: ``scheme://`` with a scheme of two or more letters (so a Windows drive ``C:\\`` is not a URL).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(path: Any) -> bool:
    """Whether ``path`` (a str or path object) is a URL (``scheme://...``) rather than a local path."""
    if isinstance(path, Path):
        return False
    return bool(_URL.match(str(path)))


def location(path: str | os.PathLike) -> Path:
    """``path`` as a path object: ``pathlib.Path`` for a local path, ``upath.UPath`` for a URL.

    Args:
        path: a local path, or a URL of any fsspec protocol (the protocol's package must be installed,
            e.g. ``s3fs`` for ``s3://``; ``http(s)://`` needs ``aiohttp``, ``hf://`` ``huggingface_hub``).

    Raises:
        DataError: (one line) the URL's protocol is unknown to fsspec or its package is missing.
    """
    if not is_url(path):
        return path if isinstance(path, Path) else Path(path)
    if hasattr(path, "protocol"):  # already a UPath
        return path  # type: ignore[return-value]
    from upath import UPath

    try:
        return UPath(str(path))
    except (ValueError, ImportError) as err:
        raise DataError(f"{path}: cannot open this URL with fsspec ({err})") from None


def join(base: str | os.PathLike, *names: str) -> str:
    """``base / name / ...`` as a string, keeping a URL a URL (``pathlib`` would fold its ``//``)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base).joinpath(*names))


def file_size(path: str | os.PathLike) -> int:
    """Size in bytes (``stat`` locally; the filesystem's ``info`` for a URL, e.g. an HTTP ``HEAD``).

    Raises:
        FileNotFoundError: nothing is there.
    """
    return int(location(path).stat().st_size)


def open_binary(path: str | os.PathLike, block_size: int = 1 << 22):
    """A binary file object for sequential reading, streamed in ``block_size`` blocks for a URL.

    Over ``http(s)://`` the response is read as one stream (fsspec's ``block_size=0``): blocks would be range
    requests, which not every server answers (Python's ``http.server`` does not), and the readers here read
    from the start to the end anyway.

    Raises:
        FileNotFoundError: nothing is there.
    """
    if not is_url(path):
        return open(path, "rb")
    p = location(path)
    if str(path).split("://", 1)[0].lower() in ("http", "https"):
        block_size = 0
    return p.open("rb", block_size=block_size)


__all__ = ["file_size", "is_url", "join", "location", "open_binary"]
