"""Tar shards in the webdataset layout: one sample = the members ``<key>.<name>`` stored consecutively.

Members are serialised by the conversion workers (:func:`write_samples`, in parallel) and a shard is
assembled by concatenating whole sample records (:func:`write_shard`), so the main process only
copies bytes. Samples of the shard's episodes are interleaved in a seeded random order (each
episode's steps stay in step order) so that a reader's shuffle buffer of a few hundred samples
already mixes many episodes.

Why not ``webdataset.TarWriter``: it goes through :mod:`tarfile`, whose header encoding costs 40-110
µs per member on this project's 2-core reference machine (and with webdataset's default float
``mtime`` every member also gets a PAX header), i.e. a third of the JPEG encoding time of a 224x224
frame for the 8 members of a 2-camera sample. Headers here are copied from a template made by
:mod:`tarfile` itself (GNU format, fixed mode/owner/mtime 0) and only name, size and checksum are
filled in; names longer than 100 bytes fall back to :mod:`tarfile` (GNU long-name records). The
files read back with ``tarfile``, GNU tar and ``webdataset.WebDataset`` (tested). A shard is written
as ``.<name>.tmp`` beside its final name, flushed, then renamed: a shard under its final name is
always complete, and re-running a conversion yields byte-identical shards.
"""

from __future__ import annotations

import os
import struct
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: webdataset ShardWriter-style naming of the shards of a split.
SHARD_PATTERN = "{split}-%06d.tar"
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar files are padded to a multiple of this
_LEN = struct.Struct("<Q")


def shard_name(split: str, index: int) -> str:
    """``train-000003.tar`` style name."""
    return SHARD_PATTERN.format(split=split) % index


def _template() -> bytes:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = 0, 0, 0o444
    info.uname = info.gname = "bigdata"  # what webdataset writes
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_HEADER = _template()
# The header split around the three fields that vary, and the byte sum of everything else, so a
# header is a concatenation and its checksum a sum over the name and size digits only.
_AFTER_NAME, _AFTER_SIZE, _AFTER_CHKSUM = _HEADER[100:124], _HEADER[136:148], _HEADER[155:512]
_BASE_SUM = sum(_AFTER_NAME) + sum(_AFTER_SIZE) + 7 * ord(" ") + sum(_AFTER_CHKSUM)  # [155] is the 8th space
_ZEROS = bytes(BLOCK)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header of a regular file ``name`` of ``size`` bytes (mtime 0, mode 0444)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        info.uname = info.gname = "bigdata"
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _BASE_SUM + sum(raw) + sum(size_field)  # the checksum field counts as 8 spaces
    return b"".join((raw, _ZEROS[: 100 - len(raw)], _AFTER_NAME, size_field, _AFTER_SIZE,
                     b"%06o\0" % checksum, _AFTER_CHKSUM))


def sample_parts(key: str, members: Mapping[str, bytes]) -> tuple[list[bytes], int]:
    """Tar members of one sample, in sorted member order (as webdataset writes them), as a list of
    byte strings to write consecutively, and their total length."""
    parts: list[bytes] = []
    total = 0
    for name in sorted(members):
        data = members[name]
        header = member_header(f"{key}.{name}", len(data))
        pad = -len(data) % BLOCK
        parts += (header, data, _ZEROS[:pad]) if pad else (header, data)
        total += len(header) + len(data) + pad
    return parts, total


def sample_record(key: str, members: Mapping[str, bytes]) -> bytes:
    """All tar members of one sample as one byte string (see :func:`sample_parts`)."""
    return b"".join(sample_parts(key, members)[0])


def write_samples(stream: BinaryIO, samples: Iterator[tuple[str, Mapping[str, bytes]]]) -> int:
    """Append ``(key, members)`` samples to a spill file as length-prefixed tar records (one write
    per sample: fewer, larger writes measured faster than one per member); returns the tar bytes."""
    total = 0
    for key, members in samples:
        parts, n = sample_parts(key, members)
        stream.write(b"".join([_LEN.pack(n), *parts]))
        total += n
    return total


def read_record(stream: BinaryIO) -> bytes:
    """Next record of a spill file."""
    head = stream.read(_LEN.size)
    if len(head) != _LEN.size:
        raise EOFError("spill file ended early")
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("spill file ended early")
    return data


def interleave_order(counts: Sequence[int], seed: int) -> np.ndarray:
    """Episode index of every sample position: a uniformly random interleaving of the episodes'
    sample sequences (``counts[i]`` samples of episode i), reproducible from ``seed``."""
    order = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(order)
    return order


def write_shard(path: Path, spills: Sequence[Path], counts: Sequence[int], seed: int, hasher=None) -> int:
    """Write the samples of ``spills`` (one file per episode, ``counts`` records each) into the tar
    ``path``, interleaved; return its size in bytes.

    Args:
        hasher: optional ``hashlib`` object updated with every byte written (the manifest's ``sha256``,
            computed without reading the shard again).

    Memory: one sample record at a time.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    files = [open(p, "rb") for p in spills]
    try:
        with open(tmp, "wb") as stream:
            size = 0
            for i in interleave_order(counts, seed):
                rec = read_record(files[i])
                stream.write(rec)
                if hasher is not None:
                    hasher.update(rec)
                size += len(rec)
            size += 2 * BLOCK  # end-of-archive marker, then pad to a whole tar record like tarfile
            tail = b"\0" * (2 * BLOCK + (-size % RECORD))
            stream.write(tail)
            if hasher is not None:
                hasher.update(tail)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for f in files:
            f.close()
    return path.stat().st_size
