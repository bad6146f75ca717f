"""robomimic / LIBERO HDF5: one file holds many demonstrations (docs/method.md §4).

Layout::

    data/                          attrs: problem_info (LIBERO, JSON with language_instruction), env_args
      demo_0/                      attrs: optional success, success_score, task_description
        actions   (T, action_dim)
        rewards   (T,)             optional: success if the last reward is positive
        dones     (T,)             optional
        obs/<key> (T, ...)         cameras (T, H, W, 3) uint8, proprio (T, d) or (T,)

Key resolution: a camera or proprio key ``k`` is looked up as ``obs/k``, then ``k`` inside the demo
group; the action key as ``k``, then ``obs/k``. Several files (a LIBERO suite is one file per task) can
be given; ids are then ``<file stem>-<demo>``.
"""

from __future__ import annotations


import h5py

from ...errors import DataError
from ..schema import sanitize_episode_id
from ..episode import Episode, build_episode
from .base import EpisodeRef, SourceReader, lookup, natural_key


class RobomimicReader(SourceReader):
    """Reader of robomimic / LIBERO HDF5 files (``--format robomimic``)."""

    summary = "robomimic / LIBERO HDF5, data/demo_N/..."
    suffixes = (".hdf5", ".h5")

    def _file(self, path: str) -> h5py.File:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = h5py.File(path, "r")
            except OSError as err:
                raise DataError(f"{path}: not a readable HDF5 file ({str(err).splitlines()[0]})") from None
            self._handles[path] = handle
        return handle

    def list_episodes(self) -> list[EpisodeRef]:
        """``data/<demo>`` groups of every file, files in order, demos in natural order.

        Raises:
            DataError: unreadable file or no ``data`` group.
        """
        refs = []
        many = len(self.paths) > 1
        for path in self.paths:
            f = self._file(str(path))
            if "data" not in f or not isinstance(f["data"], h5py.Group):
                raise DataError(f"{path}: no 'data' group (expected the robomimic layout data/demo_N/...)")
            demos = sorted((k for k in f["data"].keys() if isinstance(f["data"][k], h5py.Group)), key=natural_key)
            for demo in demos:
                eid = sanitize_episode_id(f"{path.stem}-{demo}" if many else demo)
                aliases = (eid, demo, f"{path.name}:{demo}", f"{path.stem}-{demo}", f"{path}:{demo}")
                refs.append(EpisodeRef(eid, str(path), demo, aliases))
        self.close()  # workers reopen; never fork with open HDF5 handles
        return refs

    def _open(self, ref: EpisodeRef) -> Episode:
        f = self._file(ref.path)
        group = f["data"][ref.key]
        where = f"{ref.path}: episode {ref.episode_id}"
        in_obs, in_demo = ("obs/", ""), ("", "obs/")
        actions = lookup(group, self.keys.action, in_demo, where)
        proprio = [lookup(group, k, in_obs, where) for k in self.keys.proprio]
        cameras = {cam: lookup(group, k, in_obs, where) for cam, k in self.keys.cameras.items()}
        rewards = group["rewards"][()] if "rewards" in group else None
        dones = group["dones"][()] if "dones" in group else None
        attrs = [group.attrs, f["data"].attrs, f.attrs]
        episode = build_episode(
            episode_id=ref.episode_id, source=ref.path, embodiment=self.embodiment,
            actions=(f"data/{ref.key}/{actions[0]}", actions[1][()]),
            proprio=[(f"data/{ref.key}/{k}", d[()]) for k, d in proprio],
            cameras={cam: (f"data/{ref.key}/{k}", d) for cam, (k, d) in cameras.items()},
            aliases=ref.aliases,
        )
        # labels after the structural checks, so an empty episode is reported as such
        return self.labeler.label(episode, ref, attrs, rewards, dones, per_episode_file=False)
