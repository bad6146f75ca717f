"""One episode -> its ``(s, a, s', V(s'))`` samples, spilled to the conversion's work directory
(docs/method.md §1, §4; member names from ``data/schema.py``).

This is the per-episode work of ``cosmos-policy convert``, run in worker processes, so it imports
neither torch nor webdataset. Each camera frame is resized and JPEG-encoded exactly once; a sample
reuses the bytes of step ``t`` and of ``t' = min(t + K, T - 1)``.

Files written for episode ``<id>`` in the work directory, each under a temporary name then renamed:

- ``<id>.spill``: the samples as tar member bytes, one length-prefixed record per step, in step
  order (``shards.write_samples``), so assembling a shard only copies bytes;
- ``<id>.npz``: ``actions (T, A)`` and ``proprio (T, P)`` float32, for the statistics;
- ``<id>.json``: the episode record, written last: its presence marks the episode finished.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes_atomic
from ..errors import DataError
from . import schema as S
from .episode import Episode
from .images import encode_frames
from .returns import action_chunk, episode_values, future_index
from .shards import write_samples
from .sources.base import EpisodeRef, SourceReader


@dataclass(frozen=True)
class EncodeSettings:
    """What the per-episode work needs besides the reader.

    Attributes:
        work_dir: where spill / npz / record files go.
        image_size: ``(H, W)`` of the stored JPEGs (the embodiment's ``image_size``).
        chunk_size: K, action chunk length.
        gamma: discount of the value curve.
        jpeg_quality: JPEG quality (95 in the reference).
        swap_rb: source frames are BGR.
        float_image_max: white of floating-point source frames (1.0, or 255.0 for 0..255 floats).
        skip_bad: record a bad episode instead of raising.
        step_stride: a sample at every ``step_stride``-th step (t = 0, s, 2s, ...); 1 = every step.
    """

    work_dir: str
    image_size: tuple[int, int]
    chunk_size: int
    gamma: float
    jpeg_quality: int = 95
    swap_rb: bool = False
    skip_bad: bool = False
    float_image_max: float = 1.0
    step_stride: int = 1


@functools.lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    empty = np.zeros(shape, dtype=np.dtype(dtype))
    buf = io.BytesIO()
    np.save(buf, empty, allow_pickle=False)
    return buf.getvalue()[: buf.tell() - empty.nbytes]


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` file content of ``array`` (the header is cached per shape and dtype: np.save's header
    formatting costs more than copying a small vector)."""
    a = np.ascontiguousarray(array)
    return _npy_header(a.shape, a.dtype.str) + a.tobytes()


def sample_steps(length: int, step_stride: int = 1) -> range:
    """The steps of an episode of ``length`` steps that become samples: ``0, s, 2s, ...`` below ``length``.

    A stride above 1 trains on a subset of each episode's steps (every episode still contributes, its
    action chunks, future frames and values still come from the full-rate episode): for long episodes
    of slowly changing frames (ALOHA: 400 steps at 50 Hz, three cameras) it divides the latent-cache
    time and size by ``s`` at little cost in diversity.
    """
    return range(0, int(length), int(step_stride))


def episode_samples(episode: Episode, jpegs: dict[str, list[bytes]], chunk_size: int, gamma: float,
                    step_stride: int = 1):
    """Yield ``(key, {member: bytes})`` for the sample steps of ``episode`` (:func:`sample_steps`; the
    shard schema of ``schema.py``).

    Args:
        episode: the episode (T >= 2).
        jpegs: camera -> T JPEG byte strings.
        chunk_size: K.
        gamma: value discount.
        step_stride: sample every ``step_stride``-th step (1 = all).
    """
    T = episode.length
    values = episode_values(T, episode.score, gamma)
    for t in sample_steps(T, step_stride):
        tf = future_index(t, chunk_size, T)
        members: dict[str, bytes] = {}
        for cam, frames in jpegs.items():
            members[S.image_member(cam)] = frames[t]
            members[S.image_member(cam, future=True)] = frames[tf]
        members[S.PROPRIO] = npy_bytes(episode.proprio[t])
        members[S.FUTURE_PROPRIO] = npy_bytes(episode.proprio[tf])
        members[S.ACTIONS] = npy_bytes(action_chunk(episode.actions, t, chunk_size))
        meta = {"episode": episode.episode_id, "step": t, "future_step": tf, "length": T,
                "success": episode.success, "score": episode.score, "value": float(values[tf]),
                "instruction": episode.instruction}
        members[S.META] = json.dumps(meta).encode()
        yield S.sample_key(episode.episode_id, t), members


def write_record(work_dir: Path, record: dict[str, Any]) -> None:
    """Write the episode record last and atomically: it marks the episode finished."""
    write_bytes_atomic(work_dir / f"{record['episode']}.json", lambda f: f.write(json.dumps(record).encode()))


def process_episode(reader: SourceReader, ref: EpisodeRef, split: str, settings: EncodeSettings) -> dict[str, Any]:
    """Read, check, encode and spill one episode; return its record.

    Returns:
        ``{"episode", "split", "source", "length", "samples", "success", "score", "instruction",
        "tar_bytes"}``, or ``{"episode", "split", "source", "bad": message}`` for a bad episode when
        ``settings.skip_bad``.

    Raises:
        DataError: bad episode (one line naming file, episode, key) unless ``skip_bad``.
    """
    work = Path(settings.work_dir)
    try:
        with reader.open(ref) as episode:
            jpegs = {cam: encode_frames(episode.images[cam], settings.image_size, settings.jpeg_quality,
                                        settings.swap_rb, settings.float_image_max)
                     for cam in reader.embodiment.camera_names}
            tar_bytes = 0

            def spill(f) -> None:
                nonlocal tar_bytes
                tar_bytes = write_samples(f, episode_samples(episode, jpegs, settings.chunk_size, settings.gamma,
                                                                   settings.step_stride))

            write_bytes_atomic(work / f"{ref.episode_id}.spill", spill)
            write_bytes_atomic(work / f"{ref.episode_id}.npz",
                            lambda f: np.savez(f, actions=episode.actions, proprio=episode.proprio))
            record = {"episode": ref.episode_id, "split": split, "source": ref.source, "length": episode.length,
                      "samples": len(sample_steps(episode.length, settings.step_stride)), "success": episode.success, "score": episode.score,
                      "instruction": episode.instruction, "tar_bytes": tar_bytes}
    except DataError as err:
        if not settings.skip_bad:
            raise
        record = {"episode": ref.episode_id, "split": split, "source": ref.source, "bad": str(err)}
    write_record(work, record)
    return record


# ---------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def exit_with_parent() -> None:
    """End this worker process as soon as the process that started it ends, even by ``kill -9`` (then
    no executor shutdown runs, and orphaned workers would keep converting with the source files open).

    A daemon thread waits on ``multiprocessing.parent_process().sentinel``, which becomes ready when the
    parent dies; nothing happens in a process that was not started by ``multiprocessing``.
    """
    import multiprocessing
    import multiprocessing.connection
    import threading

    parent = multiprocessing.parent_process()
    if parent is None or getattr(parent, "sentinel", None) is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no cleanup: the parent is gone, and its half-written files are redone on resume

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def init_worker(reader: SourceReader, settings: EncodeSettings) -> None:
    """Pool initializer: one thread per worker (parallelism comes from processes), keep the reader, and
    end with the parent (:func:`exit_with_parent`)."""
    exit_with_parent()
    os.environ["OMP_NUM_THREADS"] = "1"
    import sys

    if "torch" in sys.modules:  # only set it if something already paid for importing torch
        sys.modules["torch"].set_num_threads(1)
    _WORKER.update(reader=reader, settings=settings)


def run_job(job: tuple[EpisodeRef, str]) -> dict[str, Any]:
    """Pool task: process one ``(ref, split)`` with the worker's reader."""
    ref, split = job
    return process_episode(_WORKER["reader"], ref, split, _WORKER["settings"])


__all__ = ["EncodeSettings", "episode_samples", "sample_steps", "process_episode", "init_worker", "run_job", "npy_bytes"]
