"""Shard integrity: what the manifest promises about every shard, checked cheaply at set-up and
exactly while reading.

The converter (``data/convert.py``) and the latent cache (``data/latent_cache.py``) record, for every
shard, its sample count (``samples``), its size in bytes (``bytes``) and the SHA-256 of its bytes
(``sha256``). Readers check:

* at set-up, every shard's size against ``bytes`` (one ``stat`` per shard): a shard cut short by a
  full disk, an interrupted copy or a quota says ``truncated: expected N bytes, got M``;
* while reading, every shard's sample count against ``samples`` and every sample's members against
  the sample schema (``data/sample.py``), and a tar that ends inside a member becomes one line naming
  the shard instead of ``tarfile.ReadError`` -- this also covers shards changed after set-up and
  manifests that predate ``bytes``;
* on request (:func:`verify_checksums`), the SHA-256 of every shard (reads every byte).
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from webdataset.filters import PipelineStage

from ..errors import DataError

#: Read size of checksum computation.
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed, 1 MiB at a time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_shard_sizes(shards: Iterable[tuple[str | Path, int | None]], manifest: str | Path) -> None:
    """Compare each shard's size on disk with the size its manifest recorded (cheap: one ``stat`` each).

    Args:
        shards: ``(path, expected bytes)``; an expected size of None (older manifests) is not checked.
        manifest: the manifest that lists them (named in the message).

    Raises:
        DataError: one line naming the shard: missing, ``truncated: expected N bytes, got M`` or
            ``changed size: expected N bytes, got M``.
    """
    for path, expected in shards:
        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in {manifest} is missing") from None
        if expected is None or size == int(expected):
            continue
        what = "truncated" if size < int(expected) else "changed size"
        raise DataError(f"{path}: {what}: expected {int(expected)} bytes, got {size} (as recorded in {manifest}); "
                        f"convert the dataset again")


def verify_checksums(shards: Iterable[tuple[str | Path, str | None]], manifest: str | Path) -> int:
    """Compare each shard's SHA-256 with the manifest's ``sha256`` (reads every byte).

    Returns:
        the number of shards whose checksum was compared (entries without one are skipped).

    Raises:
        DataError: one line naming the first shard whose bytes differ.
    """
    n = 0
    for path, expected in shards:
        if not expected:
            continue
        got = file_sha256(path)
        if got != expected:
            raise DataError(f"{path}: checksum mismatch: expected sha256 {expected[:16]}..., got {got[:16]}... "
                            f"(as recorded in {manifest}); the shard is corrupt, convert the dataset again")
        n += 1
    return n


class CheckedTarSamples(PipelineStage):
    """``webdataset.tarfile_to_samples`` for shards whose content the manifest describes.

    Input: shard descriptors (``{"url": path}``, from a shard list). Output: raw samples, as
    webdataset yields them. Per shard it checks that

    * the tar reads to its end (a truncated member becomes a :class:`DataError` naming the shard and
      the number of samples read, not ``tarfile.ReadError``);
    * every sample holds ``required`` members (a shard cut between two members of a sample);
    * the number of samples equals ``counts[shard file name]`` when the shard was read to its end (a
      shard cut at a sample boundary). Shards without a recorded count are not counted.

    Args:
        counts: shard file name -> samples recorded in the manifest (None = unknown).
        required: member names every sample must have (e.g. ``meta.json``, ``actions.npy``).

    Raises (while iterating):
        DataError: one line naming the shard and what is wrong.
    """

    def __init__(self, counts: Mapping[str, int | None], required: Iterable[str] = ()):
        self.counts = {str(k): (None if v is None else int(v)) for k, v in counts.items()}
        self.required = tuple(sorted(set(required)))

    def _samples(self, shard: dict[str, Any]) -> Iterator[dict]:
        import webdataset as wds

        url = str(shard["url"])
        name = Path(url).name
        expected = self.counts.get(name)
        n = 0
        stream = wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([dict(shard)]))
        try:
            for sample in stream:
                missing = [m for m in self.required if m not in sample]
                if missing:
                    raise DataError(f"{url}: sample {sample.get('__key__', n)} lacks member(s) {', '.join(missing)}: "
                                    f"truncated or corrupt shard (sample {n + 1} of "
                                    f"{expected if expected is not None else '?'}); convert the dataset again")
                n += 1
                yield sample
        except FileNotFoundError:
            raise DataError(f"{url}: shard is missing (listed in the manifest); convert the dataset again") from None
        except (tarfile.TarError, EOFError) as err:
            reason = err.args[0] if err.args and isinstance(err.args[0], str) else type(err).__name__
            raise DataError(f"{url}: truncated or corrupt shard: tar read error ({reason}) after {n} of "
                            f"{expected if expected is not None else '?'} samples; convert the dataset again") from None
        if expected is not None and n != expected:
            raise DataError(f"{url}: truncated: expected {expected} samples, read {n} (as recorded in the manifest); "
                            f"convert the dataset again")

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        for shard in src:
            yield from self._samples(shard)


__all__ = ["CheckedTarSamples", "check_shard_sizes", "file_sha256", "verify_checksums"]
