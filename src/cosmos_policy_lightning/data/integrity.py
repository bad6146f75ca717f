"""Shard integrity: what the manifest promises about every shard, checked cheaply at set-up and
exactly while reading.

The converter (``data/convert.py``) and the latent cache (``data/latent_cache.py``) record, for every
shard, its sample count (``samples``), its size in bytes (``bytes``) and the SHA-256 of its bytes
(``sha256``). Readers check:

* at set-up, every shard's size against ``bytes`` (one ``stat`` per shard): a shard cut short by a
  full disk, an interrupted copy or a quota says ``truncated: expected N bytes, got M``;
* while reading, every shard's sample count against ``samples`` and every sample's members against
  the sample schema (``data/schema.py``), and a tar that ends inside a member becomes one line naming
  the shard instead of ``tarfile.ReadError`` -- this also covers shards changed after set-up and
  manifests that predate ``bytes``;
* the first time a process reads a shard (:class:`CheckedTarSamples` given the manifest's ``sha256``), its
  SHA-256, before any of its samples is yielded: a flipped byte is never trained on. The check reads the
  shard once more per process (then it is in the page cache); ``tools/benchmark_cache.py --integrity`` prints its cost
  per training step. A shard at a URL (``storage.py``) is streamed once: its SHA-256 is computed as it
  streams and compared when its last byte has been read, so a corrupt remote shard stops the run at its
  end (its samples may already be in a batch) instead of being downloaded twice;
* on request (:func:`verify_checksums`; ``cosmos-policy verify DATA_DIR``, :func:`verify_dataset`), the
  SHA-256 and sample count of every shard (reads every byte).

Every message ends with what to do (``fix``): for the converter's shards "convert the dataset again", for
a latent cache's shards "rebuild the latent cache: cosmos-policy cache-latents ..." (the pixel data is fine).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from webdataset.filters import PipelineStage

from ..errors import DataError
from ..storage import file_size, is_url, location, open_binary
from .schema import load_json

#: Read size of checksum computation.
_CHUNK = 1 << 20
#: What to do about a damaged shard of a conversion (the end of every message of this module by default).
CONVERT_AGAIN = "convert the dataset again"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed, 1 MiB at a time; a local path or a URL, ``storage.py``)."""
    h = hashlib.sha256()
    with open_binary(path) as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_shard_sizes(shards: Iterable[tuple[str | Path, int | None]], manifest: str | Path,
                      fix: str = CONVERT_AGAIN) -> None:
    """Compare each shard's size on disk with the size its manifest recorded (cheap: one ``stat`` each).

    Args:
        shards: ``(path, expected bytes)``; an expected size of None (older manifests) is not checked.
        manifest: the manifest that lists them (named in the message).
        fix: what the message tells the user to do.

    Raises:
        DataError: one line naming the shard: missing, ``truncated: expected N bytes, got M`` or
            ``changed size: expected N bytes, got M``.
    """
    for path, expected in shards:
        try:
            size = file_size(path)
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in {manifest} is missing; {fix}") from None
        if expected is None or size == int(expected):
            continue
        what = "truncated" if size < int(expected) else "changed size"
        raise DataError(f"{path}: {what}: expected {int(expected)} bytes, got {size} (as recorded in {manifest}); "
                        f"{fix}")


def verify_checksums(shards: Iterable[tuple[str | Path, str | None]], manifest: str | Path,
                     fix: str = CONVERT_AGAIN) -> int:
    """Compare each shard's SHA-256 with the manifest's ``sha256`` (reads every byte); ``fix`` ends the message.

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
                            f"(as recorded in {manifest}); the shard is corrupt, {fix}")
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
      shard cut at a sample boundary). Shards without a recorded count are not counted;
    * the shard's SHA-256 equals ``sha256[shard file name]``, the first time this instance (in each
      process: data-loader workers get copies) reads the shard, before it yields any of its samples.
      Shards without a recorded checksum are not hashed.

    Args:
        counts: shard file name -> samples recorded in the manifest (None = unknown).
        required: member names every sample must have (e.g. ``meta.json``, ``actions.npy``).
        sha256: shard file name -> hex SHA-256 recorded in the manifest (None / missing = not checked).
        manifest: the manifest, named in the messages.
        fix: what the messages tell the user to do.

    Raises (while iterating):
        DataError: one line naming the shard and what is wrong.
    """

    def __init__(self, counts: Mapping[str, int | None], required: Iterable[str] = (),
                 sha256: Mapping[str, str | None] | None = None, manifest: str | Path = "the manifest",
                 fix: str = CONVERT_AGAIN):
        self.counts = {str(k): (None if v is None else int(v)) for k, v in counts.items()}
        self.required = tuple(sorted(set(required)))
        self.sha256 = {str(k): v for k, v in (sha256 or {}).items() if v}
        self.manifest, self.fix = str(manifest), fix
        self._verified: set[str] = set()

    def _verify(self, url: str, name: str) -> None:
        """Hash the shard once per instance and process (see the class docstring)."""
        want = self.sha256.get(name)
        if want is None or url in self._verified:
            return
        try:
            verify_checksums([(url, want)], self.manifest, self.fix)
        except FileNotFoundError:
            return  # reported as a missing shard by the reader below
        self._verified.add(url)

    def _samples(self, shard: dict[str, Any]) -> Iterator[dict]:
        import webdataset as wds

        url = str(shard["url"])
        name = Path(url).name
        expected = self.counts.get(name)
        n = 0
        fix = self.fix
        hashing = None
        if is_url(url):
            # Streamed through fsspec in blocks (webdataset's own transports cover only some schemes): the
            # checksum is computed on the way and compared at the end (module docstring).
            try:
                hashing = _HashingReader(open_binary(url))
            except FileNotFoundError:
                raise DataError(f"{url}: shard is missing (listed in the manifest); {fix}") from None
            opened = [{**shard, "stream": io.BufferedReader(hashing, _CHUNK)}]
            from webdataset.tariterators import group_by_keys, tar_file_expander

            stream = group_by_keys(tar_file_expander(iter(opened), handler=wds.reraise_exception),
                                   handler=wds.reraise_exception)
        else:
            self._verify(url, name)
            stream = wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([dict(shard)]))
        try:
            for sample in stream:
                missing = [m for m in self.required if m not in sample]
                if missing:
                    raise DataError(f"{url}: sample {sample.get('__key__', n)} lacks member(s) {', '.join(missing)}: "
                                    f"truncated or corrupt shard (sample {n + 1} of "
                                    f"{expected if expected is not None else '?'}); {fix}")
                n += 1
                yield sample
        except FileNotFoundError:
            raise DataError(f"{url}: shard is missing (listed in the manifest); {fix}") from None
        except (tarfile.TarError, EOFError) as err:
            reason = err.args[0] if err.args and isinstance(err.args[0], str) else type(err).__name__
            raise DataError(f"{url}: truncated or corrupt shard: tar read error ({reason}) after {n} of "
                            f"{expected if expected is not None else '?'} samples; {fix}") from None
        if expected is not None and n != expected:
            raise DataError(f"{url}: truncated: expected {expected} samples, read {n} (as recorded in the manifest); "
                            f"{fix}")
        if hashing is not None:
            self._check_streamed(url, name, hashing)

    def _check_streamed(self, url: str, name: str, hashing: "_HashingReader") -> None:
        """A remote shard read to its end: compare the SHA-256 of the streamed bytes with the manifest's."""
        # the end-of-archive padding counts too (read from the file itself: webdataset may have closed
        # the buffered wrapper, which leaves the fsspec file open)
        for block in iter(lambda: hashing.f.read(_CHUNK), b""):
            hashing.sha256.update(block)
        hashing.f.close()
        want = self.sha256.get(name)
        got = hashing.sha256.hexdigest()
        if want is not None and got != want:
            raise DataError(f"{url}: checksum mismatch: expected sha256 {want[:16]}..., got {got[:16]}... "
                            f"(as recorded in {self.manifest}); the shard is corrupt, {self.fix}")

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        for shard in src:
            yield from self._samples(shard)


class _HashingReader(io.RawIOBase):
    """A binary file whose bytes are counted and hashed as they are read (one pass for tar + SHA-256)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
            self.bytes += n
        return n or 0


def scan_shard(path: str | Path) -> dict[str, Any]:
    """Read a tar shard once: its sample count (consecutive members sharing a key, as webdataset groups
    them), size and SHA-256.

    Returns:
        ``{"samples": int, "bytes": int, "sha256": str}``.

    Raises:
        DataError: the tar cannot be read to its end (names the shard and the samples read).
    """
    raw = _HashingReader(open_binary(path))
    stream = io.BufferedReader(raw, _CHUNK)
    samples, last = 0, None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key = Path(member.name).name.split(".", 1)[0]
                if key != last:
                    samples, last = samples + 1, key
        while stream.read(_CHUNK):  # the end-of-archive padding counts too
            pass
    except (tarfile.TarError, EOFError) as err:
        reason = err.args[0] if err.args and isinstance(err.args[0], str) else type(err).__name__
        raise DataError(f"{path}: truncated or corrupt shard: tar read error ({reason}) after {samples} samples") \
            from None
    finally:
        raw.f.close()
    return {"samples": samples, "bytes": raw.bytes, "sha256": raw.sha256.hexdigest()}


def verify_dataset(data_dir: str | Path, checksums: bool = True) -> None:
    """Check every shard of a converted dataset -- and of its latent cache (``latents/``), if there is one
    -- against what the manifests recorded: size, sample count and SHA-256 (reads every byte; set-up
    only checks sizes). Prints one line per shard that differs, then a summary.

    Args:
        data_dir: the converted dataset (``cosmos-policy convert`` output): a folder or a URL (``storage.py``).
        checksums: also read every shard for sample counts and SHA-256 (else sizes only).

    Raises:
        DataError: one line: how many shards differ, and the first difference.
    """
    data_dir = location(data_dir)
    manifests = [data_dir / "manifest.json", data_dir / "latents" / "manifest.json"]
    problems, checked = [], 0
    for manifest in manifests:
        if not manifest.is_file() and manifest.parent != data_dir:
            continue  # no latent cache
        entries = load_json(manifest).get("shards") or []  # the dataset's manifest must exist
        for entry in entries:
            path = manifest.parent / entry["name"]
            checked += 1
            fix = CONVERT_AGAIN if manifest.parent == data_dir else \
                f"rebuild the latent cache: cosmos-policy cache-latents {data_dir}"
            try:
                check_shard_sizes([(path, entry.get("bytes"))], manifest, fix)
                if not checksums:
                    continue
                found = scan_shard(path)
            except DataError as err:
                problems.append(str(err))
                continue
            for field, want in (("samples", entry.get("samples")), ("sha256", entry.get("sha256"))):
                if want is not None and found[field] != want:
                    problems.append(f"{path}: {field} differs: expected {want}, got {found[field]} "
                                    f"(as recorded in {manifest}); {fix}")
    for line in problems:
        print(f"bad shard: {line}")
    if problems:
        raise DataError(f"{data_dir}: {len(problems)} of {checked} shards differ from their manifest; first: "
                        f"{problems[0]}")
    what = "sizes, sample counts and SHA-256" if checksums else "sizes"
    print(f"{data_dir}: {checked} shards, {what} as recorded")


__all__ = ["CONVERT_AGAIN", "CheckedTarSamples", "check_shard_sizes", "file_sha256", "scan_shard", "verify_checksums",
           "verify_dataset"]
