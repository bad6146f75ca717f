"""Assemble one tar shard from the spilled samples of a group of episodes (webdataset format).

Samples of the group's episodes are interleaved in a seeded random order (each episode's own steps
stay in step order), so that a reader's shuffle buffer of a few hundred samples already mixes many
episodes. The shard is written as ``.<name>.tmp`` beside its final name, flushed to disk, then
renamed: a shard under its final name is always complete. Members get a fixed mtime so re-running a
conversion yields byte-identical shards.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: webdataset ShardWriter-style naming of the shards of a split.
SHARD_PATTERN = "{split}-%06d.tar"


def shard_name(split: str, index: int) -> str:
    """``train-000003.tar`` style name."""
    return SHARD_PATTERN.format(split=split) % index


def interleave_order(counts: Sequence[int], seed: int) -> np.ndarray:
    """Episode index of every sample position: a uniformly random interleaving of the episodes'
    sample sequences (``counts[i]`` samples of episode i), reproducible from ``seed``."""
    order = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(order)
    return order


def write_shard(path: Path, spills: Sequence[Path], counts: Sequence[int], seed: int) -> int:
    """Write the samples of ``spills`` (one file per episode, ``counts`` samples each) into the tar
    ``path``, interleaved; return its size in bytes.

    Memory: one sample per open spill file at a time.
    """
    from webdataset import TarWriter  # imported here: it imports torch, which workers avoid

    tmp = path.with_name(f".{path.name}.tmp")
    files = [open(p, "rb") for p in spills]
    try:
        with open(tmp, "wb") as stream:
            writer = TarWriter(stream, mtime=0.0)
            for i in interleave_order(counts, seed):
                key, members = pickle.load(files[i])
                writer.write({"__key__": key, **members})
            writer.close()
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
