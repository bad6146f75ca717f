"""Episode: one demonstration or rollout, as every source reader yields it (docs/method.md §4).

An :class:`Episode` holds the low-dimensional arrays in memory (they are small) and the camera images
as lazy :class:`FrameSource` views on the open file, so a reader costs the memory of one episode's
actions and proprio plus the block of frames being encoded -- never the whole dataset.

:func:`build_episode` is the single place where source data is checked against the embodiment;
every failure is a one-line :class:`~cosmos_policy_lightning.errors.DataError` naming the file, the
episode and the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..embodiment import Embodiment
from ..errors import DataError

#: First two bytes of every JPEG file (start-of-image marker).
JPEG_MAGIC = b"\xff\xd8"


class FrameSource:
    """The ``T`` frames of one camera, read lazily in blocks.

    Two storage kinds are recognised from the dataset's shape and dtype (no data is read except the
    first row of a padded byte array):

    - ``array``: ``(T, H, W, 3)`` pixels, uint8 in [0, 255] or float in [0, 1];
    - ``encoded``: ``T`` encoded images (JPEG/PNG): a 1-D dataset of byte strings (HDF5 vlen / ``S``
      dtype / object arrays) or a ``(T, N)`` uint8 array of zero-padded JPEG bytes (ALOHA's
      ``compress`` layout).

    Args:
        data: h5py Dataset, zarr Array, numpy array or list of bytes (anything with ``shape``/``len``
            and slicing).
        where: ``"<file>: episode <id>: key <key>"`` prefix for error messages.
        start, stop: optional row range inside ``data`` (Zarr replay buffers concatenate episodes).

    Raises:
        DataError: wrong rank, wrong channel count, or an undecodable dtype.
    """

    def __init__(self, data: Any, where: str, start: int = 0, stop: int | None = None):
        self.data, self.where = data, where
        shape = tuple(data.shape) if hasattr(data, "shape") else (len(data),)
        dtype = np.dtype(getattr(data, "dtype", object))
        self.start = start
        self.stop = shape[0] if stop is None else stop
        if len(shape) == 4:
            if shape[-1] != 3:
                raise DataError(f"{where}: expected RGB images (T, H, W, 3), got shape {shape}")
            if dtype != np.uint8 and dtype.kind != "f":
                raise DataError(f"{where}: expected uint8 or float images, got dtype {dtype}")
            self.kind = "array"
        elif len(shape) == 1 and dtype.kind in "OSV":
            self.kind = "encoded"
        elif len(shape) == 2 and dtype == np.uint8 and self._first_row_is_jpeg():
            self.kind = "encoded"
        else:
            raise DataError(f"{where}: images of the wrong rank: expected (T, H, W, 3) pixels or T encoded "
                            f"images, got shape {shape} dtype {dtype}")

    def _first_row_is_jpeg(self) -> bool:
        if self.stop <= self.start:
            return False
        head = np.asarray(self.data[self.start, :2])
        return head.tobytes() == JPEG_MAGIC

    def __len__(self) -> int:
        return self.stop - self.start

    def blocks(self, target: int) -> list[tuple[int, int]]:
        """Episode-relative ``(start, stop)`` ranges covering all frames, about ``target`` frames each,
        with boundaries on multiples of the storage chunk length along time (when it is at most
        256 frames), so that each chunk is read -- and for Jpeg2k Zarr chunks decoded -- once."""
        chunks = getattr(self.data, "chunks", None)
        c = int(chunks[0]) if chunks and isinstance(chunks, tuple) and chunks[0] else 1
        size = c * -(-target // c) if c <= 256 else target
        out, pos = [], self.start
        while pos < self.stop:
            end = min(self.stop, (pos // size + 1) * size)
            out.append((pos - self.start, end - self.start))
            pos = end
        return out

    def read(self, start: int, stop: int) -> list[Any]:
        """Frames ``start..stop-1`` (episode-relative): a list of ``(H, W, 3)`` arrays (``array``
        kind) or of ``bytes`` (``encoded`` kind)."""
        block = self.data[self.start + start: self.start + stop]
        if self.kind == "array":
            return list(np.asarray(block))
        return [_as_bytes(item) for item in block]


def _as_bytes(item: Any) -> bytes:
    """One encoded image from whatever the container returned (bytes, np.bytes_, np.void, uint8 row)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray):
        return item.tobytes()
    if isinstance(item, np.void):
        return item.tobytes()
    return bytes(item)


@dataclass
class Episode:
    """One episode, checked against an embodiment (build it with :func:`build_episode`).

    Attributes:
        episode_id: unique id within the dataset, safe as a shard key (no dots, slashes, spaces).
        source: where it came from (``<file>`` or ``<file>:<group>``), for messages.
        actions: ``(T, action_dim)`` float32, robot units.
        proprio: ``(T, proprio_dim)`` float32, robot units (several source keys concatenated in order).
        images: camera name (embodiment order) -> ``FrameSource`` of T frames.
        success: whether the episode succeeded (failures are kept; they feed world model and value).
        score: reward ``R`` in [0, 1] used for the value curve (docs/method.md §4).
        instruction: task text.
        aliases: other names a sidecar, ``--val_episodes`` or a regex may use for this episode.
    """

    episode_id: str
    source: str
    actions: np.ndarray
    proprio: np.ndarray
    images: dict[str, FrameSource]
    success: bool = True
    score: float = 1.0
    instruction: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def length(self) -> int:
        """Number of steps T."""
        return int(self.actions.shape[0])


def _steps(array: np.ndarray, where: str) -> np.ndarray:
    """A per-step vector array as float32 ``(T, D)``; ``(T,)`` counts as one value per step."""
    a = np.asarray(array)
    if a.dtype.kind not in "fiub":
        raise DataError(f"{where}: expected numbers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise DataError(f"{where}: expected a (T, D) array, got shape {a.shape}")
    return a.astype(np.float32, copy=False)


def build_episode(
    *,
    episode_id: str,
    source: str,
    embodiment: Embodiment,
    actions: tuple[str, Any],
    proprio: Sequence[tuple[str, Any]],
    cameras: Mapping[str, tuple[str, Any]],
    camera_range: tuple[int, int] | None = None,
    success: bool = True,
    score: float = 1.0,
    instruction: str = "",
    aliases: Sequence[str] = (),
) -> Episode:
    """Check source arrays against the embodiment and assemble an :class:`Episode`.

    Args:
        episode_id: the episode's id.
        source: file (and group) for messages.
        embodiment: the robot the data must match.
        actions: ``(key, array (T, action_dim))``.
        proprio: ``[(key, array (T, d_i)), ...]`` concatenated along the last axis; ``sum d_i`` must
            equal ``proprio.dim``. A ``(T,)`` array counts as ``d_i = 1``.
        cameras: camera name -> ``(key, image dataset)`` for every camera of the embodiment.
        camera_range: ``(start, stop)`` rows of the image datasets (concatenated stores), else all.
        success, score, instruction, aliases: labels (see :class:`Episode`).

    Raises:
        DataError: missing camera, wrong dims, fewer than 2 steps, NaN/inf in actions or proprio,
            images of the wrong rank, or mismatched lengths between keys. One line:
            ``<source>: episode <id>: key <key>: <problem>``.
    """
    def where(key: str) -> str:
        return f"{source}: episode {episode_id}: key {key}"

    a_key, a_data = actions
    act = _steps(a_data, where(a_key))
    length = act.shape[0]
    if length < 2:
        raise DataError(f"{where(a_key)}: episode has {length} step(s); at least 2 are needed "
                        f"(a sample pairs step t with a future step)")
    if act.shape[1] != embodiment.action.dim:
        raise DataError(f"{where(a_key)}: expected action dim {embodiment.action.dim} "
                        f"(embodiment {embodiment.name}), got {act.shape[1]}")

    parts = []
    for p_key, p_data in proprio:
        part = _steps(p_data, where(p_key))
        if part.shape[0] != length:
            raise DataError(f"{where(p_key)}: {part.shape[0]} steps, but {a_key} has {length}")
        parts.append(part)
    if not parts:
        raise DataError(f"{source}: episode {episode_id}: no proprio keys given")
    prop = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if prop.shape[1] != embodiment.proprio.dim:
        keys = "+".join(k for k, _ in proprio)
        dims = "+".join(str(p.shape[1]) for p in parts)
        raise DataError(f"{where(keys)}: proprio dims {dims} = {prop.shape[1]}, expected "
                        f"proprio dim {embodiment.proprio.dim} (embodiment {embodiment.name})")

    for name, arr, key in (("actions", act, a_key), ("proprio", prop, "+".join(k for k, _ in proprio))):
        bad = ~np.isfinite(arr)
        if bad.any():
            t, d = np.argwhere(bad)[0]
            raise DataError(f"{where(key)}: {name} contain NaN or inf (first at step {t}, dim {d})")

    images: dict[str, FrameSource] = {}
    for cam in embodiment.camera_names:
        if cam not in cameras:
            raise DataError(f"{source}: episode {episode_id}: no image key for camera {cam!r}")
        c_key, c_data = cameras[cam]
        start, stop = camera_range if camera_range is not None else (0, None)
        frames = FrameSource(c_data, where(c_key), start, stop)
        if len(frames) != length:
            raise DataError(f"{where(c_key)}: {len(frames)} frames, but {a_key} has {length} steps")
        images[cam] = frames

    if not (0.0 <= score <= 1.0) or not np.isfinite(score):
        raise DataError(f"{source}: episode {episode_id}: success score must be in [0, 1], got {score}")
    return Episode(episode_id, source, act, prop.astype(np.float32, copy=False), images, bool(success),
                   float(score), instruction, tuple(aliases))
