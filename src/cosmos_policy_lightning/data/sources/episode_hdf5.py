"""Per-episode HDF5 files: ALOHA recordings and the reference's rollout files (docs/method.md §4).

ALOHA layout (one file per episode)::

    /observations/qpos            (T, 14)
    /observations/images/<cam>    (T, 480, 640, 3) uint8 -- or T JPEG byte strings (vlen / S dtype),
                                  or (T, N) uint8 zero-padded JPEG bytes (``compress`` recordings)
    /action                       (T, 14)

Rollout layout: the same arrays plus root attributes ``success`` (bool), optional ``success_score``
(float in [0, 1]) and ``task_description`` (str). Optional per-step ``reward``/``rewards`` and
``done``/``dones`` datasets label success when no attribute does.

Keys are paths from the file root (``observations/images/cam_high``). The source is a file, a
directory (searched recursively for ``.hdf5`` / ``.h5``) or a glob; the episode id is the file stem,
or the path relative to the common parent when stems collide.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from ...errors import DataError
from ..episode import Episode, build_episode
from ..schema import sanitize_episode_id
from .base import EpisodeRef, SourceReader, lookup


class EpisodeHDF5Reader(SourceReader):
    """Reader of one-episode-per-file HDF5 (``--format episode_hdf5``)."""

    summary = "one HDF5 file per episode: ALOHA, rollout files with success attributes"
    suffixes = (".hdf5", ".h5")

    def list_episodes(self) -> list[EpisodeRef]:
        """One episode per file, ids from file stems (unique)."""
        stems = [p.stem for p in self.paths]
        collide = len(set(stems)) != len(stems)
        root = Path(os.path.commonpath([str(p.parent) for p in self.paths])) if self.paths else Path(".")
        refs = []
        for path in self.paths:
            raw = str(path.relative_to(root).with_suffix("")) if collide else path.stem
            eid = sanitize_episode_id(raw)
            refs.append(EpisodeRef(eid, str(path), None, (eid, path.stem, path.name, raw, str(path))))
        ids = [r.episode_id for r in refs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"episode id {dup!r} is produced by two files; rename them")
        return refs

    def _open(self, ref: EpisodeRef) -> Episode:
        self.close()  # one file per episode: keep only the current one open
        try:
            f = h5py.File(ref.path, "r")
        except OSError as err:
            raise DataError(f"{ref.path}: not a readable HDF5 file ({str(err).splitlines()[0]})") from None
        self._handles[ref.path] = f
        where = f"{ref.path}: episode {ref.episode_id}"
        root = ("",)
        actions = lookup(f, self.keys.action, root, where)
        proprio = [lookup(f, k, root, where) for k in self.keys.proprio]
        cameras = {cam: lookup(f, k, ("", "observations/images/"), where) for cam, k in self.keys.cameras.items()}
        rewards = next((f[k][()] for k in ("reward", "rewards") if k in f and isinstance(f[k], h5py.Dataset)), None)
        dones = next((f[k][()] for k in ("done", "dones") if k in f and isinstance(f[k], h5py.Dataset)), None)
        attrs = [f.attrs]
        episode = build_episode(
            episode_id=ref.episode_id, source=ref.path, embodiment=self.embodiment,
            actions=(actions[0], actions[1][()]),
            proprio=[(k, d[()]) for k, d in proprio],
            cameras={cam: (k, d) for cam, (k, d) in cameras.items()},
            aliases=ref.aliases,
        )
        # labels after the structural checks, so an empty episode is reported as such
        return self.labeler.label(episode, ref, attrs, rewards, dones, per_episode_file=True)
