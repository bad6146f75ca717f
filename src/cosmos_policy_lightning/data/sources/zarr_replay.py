"""Diffusion Policy Zarr replay buffers (docs/method.md §4).

Layout (Zarr format 2 or 3, a directory store or a ``.zarr.zip``)::

    data/<key>          (N, ...) every episode's steps concatenated: images (N, H, W, 3) uint8
                        (often Jpeg2k-compressed chunks), state (N, d), action (N, action_dim)
    meta/episode_ends   (E,) int: episode i covers rows ends[i-1] .. ends[i]-1
    meta/success        (E,) optional per-episode success (also success_score)
    data/reward         (N,) optional per-step reward

Keys may be written with or without the ``data/`` prefix. Episode ids are ``episode_<i:06d>``
(``<store stem>-episode_<i:06d>`` when several stores are given).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ...errors import DataError
from ..episode import Episode, build_episode
from ..schema import sanitize_episode_id
from .base import EpisodeRef, SourceReader, lookup
from .zarr_codecs import register_image_codecs


class ZarrReplayReader(SourceReader):
    """Reader of Diffusion Policy replay buffers (``--format zarr``)."""

    summary = "Diffusion Policy replay buffer, directory or .zarr.zip, Zarr format 2 or 3"
    suffixes = (".zarr", ".zip")
    directory_is_one_source = True  # a directory store ...
    source_markers = (".zgroup", "zarr.json")  # ... has one of these at its root (Zarr format 2 / 3)

    def _group(self, path: str) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            import zarr

            register_image_codecs()
            try:
                if path.endswith(".zip"):
                    store = zarr.storage.ZipStore(path, mode="r")
                    group = zarr.open_group(store, mode="r")
                else:
                    store, group = None, zarr.open_group(path, mode="r")
            except Exception as err:
                first = str(err).splitlines()[0] if str(err) else ""
                raise DataError(f"{path}: unreadable Zarr store ({type(err).__name__}: {first})") from None
            handle = _Open(group, store)
            self._handles[path] = handle
        return handle.group

    def _ends(self, path: str) -> np.ndarray:
        group = self._group(path)
        _, ends = lookup(group, "meta/episode_ends", ("",), f"{path}")
        try:
            ends = np.asarray(ends[:], dtype=np.int64).reshape(-1)
        except Exception as err:
            raise DataError(f"{path}: key meta/episode_ends: unreadable ({type(err).__name__}: {err})") from None
        if len(ends) and (np.any(np.diff(ends) < 0) or ends[0] < 0):
            raise DataError(f"{path}: key meta/episode_ends: expected non-decreasing row indices, got {ends[:8]}...")
        return ends

    def list_episodes(self) -> list[EpisodeRef]:
        """Episodes of every store from ``meta/episode_ends``.

        Raises:
            DataError: unreadable store, missing or malformed ``meta/episode_ends``.
        """
        refs = []
        many = len(self.paths) > 1
        for path in self.paths:
            ends = self._ends(str(path))
            self._warn_unended_rows(str(path), ends)
            stem = path.name.split(".")[0]
            for i in range(len(ends)):
                raw = f"episode_{i:06d}"
                eid = sanitize_episode_id(f"{stem}-{raw}" if many else raw)
                refs.append(EpisodeRef(eid, str(path), str(i), (eid, raw, str(i), f"{stem}-{raw}")))
        self.close()
        return refs

    def _warn_unended_rows(self, path: str, ends: np.ndarray) -> int:
        """Warn when the action array has rows after the last ``meta/episode_ends`` entry (an episode
        recorded without its end, e.g. a collection that was interrupted): they belong to no episode
        and are not converted. Returns their count."""
        group = self._group(path)
        try:
            key, actions = lookup(group, self.keys.action, ("data/", ""), path)
        except DataError:
            return 0  # reported per episode, with the keys that exist
        last = int(ends[-1]) if len(ends) else 0
        extra = int(actions.shape[0]) - last
        if extra > 0:
            warnings.warn(f"{path}: {extra} row(s) of {key} after the last meta/episode_ends entry ({last}) "
                          f"belong to no episode and are not converted (an unfinished episode?)", stacklevel=3)
        return max(extra, 0)

    def _open(self, ref: EpisodeRef) -> Episode:
        group = self._group(ref.path)
        ends = self._handles[ref.path].ends if self._handles[ref.path].ends is not None else self._ends(ref.path)
        self._handles[ref.path].ends = ends
        i = int(ref.key)
        start, stop = (int(ends[i - 1]) if i else 0), int(ends[i])
        where = f"{ref.path}: episode {ref.episode_id}"
        prefixes = ("data/", "")
        a_key, a_arr = lookup(group, self.keys.action, prefixes, where)
        proprio = [lookup(group, k, prefixes, where) for k in self.keys.proprio]
        cameras = {cam: lookup(group, k, prefixes, where) for cam, k in self.keys.cameras.items()}
        for key, arr in [(a_key, a_arr), *proprio, *cameras.values()]:
            if arr.shape[0] < stop:
                raise DataError(f"{where}: key {key}: {arr.shape[0]} rows, but meta/episode_ends needs {stop}")
        rewards = group["data/reward"][start:stop] if "data/reward" in group else None
        attrs: list[Any] = [self._episode_attrs(group, i), group.attrs]
        episode = build_episode(
            episode_id=ref.episode_id, source=ref.path, embodiment=self.embodiment,
            actions=(a_key, a_arr[start:stop]),
            proprio=[(k, arr[start:stop]) for k, arr in proprio],
            cameras=cameras, camera_range=(start, stop),
            aliases=ref.aliases,
        )
        # labels after the structural checks, so an empty episode is reported as such
        return self.labeler.label(episode, ref, attrs, rewards, None, per_episode_file=False)

    @staticmethod
    def _episode_attrs(group: Any, i: int) -> dict[str, Any]:
        """Per-episode labels stored as ``meta/<name>`` arrays of one entry per episode."""
        out = {}
        for name in ("success", "success_score", "task_description"):
            if f"meta/{name}" in group:
                out[name] = group[f"meta/{name}"][i]
        return out


class _Open:
    """An open Zarr group, the store to close (zip) and the cached episode ends."""

    def __init__(self, group: Any, store: Any):
        self.group, self.store, self.ends = group, store, None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
