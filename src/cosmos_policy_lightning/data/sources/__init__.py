"""Source readers: one module per input layout (docs/method.md §4), each yielding :class:`Episode` objects
one at a time.

======================  =======================================================================
``--format``            layout
======================  =======================================================================
``robomimic``           robomimic / LIBERO HDF5, ``data/demo_N/{actions, rewards, dones, obs/<key>}``
``episode_hdf5``        one HDF5 file per episode (ALOHA, the reference's rollout files)
``zarr``                Diffusion Policy replay buffer (``data/<key>``, ``meta/episode_ends``)
``lerobot``             LeRobot dataset v2.x / v3.0 (parquet + mp4, ``meta/info.json``), local or a
                        Hugging Face Hub dataset id
======================  =======================================================================

Adding a layout: subclass :class:`SourceReader` in a new module and add it to ``READERS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ...embodiment import Embodiment
from ...errors import DataError
from .base import EpisodeRef, SourceKeys, SourceReader, expand_paths
from .episode_hdf5 import EpisodeHDF5Reader
from .labels import LabelOptions, Labeler
from .lerobot import LeRobotReader, is_lerobot_root, resolve_source
from .robomimic import RobomimicReader
from .zarr_replay import ZarrReplayReader, is_zarr_dir

READERS: dict[str, type[SourceReader]] = {
    "robomimic": RobomimicReader,
    "episode_hdf5": EpisodeHDF5Reader,
    "zarr": ZarrReplayReader,
    "lerobot": LeRobotReader,
}


def open_source(fmt: str, source: str | Path | Sequence[str | Path], embodiment: Embodiment,
                labels: LabelOptions | None = None, camera_keys: Mapping[str, str] | None = None,
                proprio_keys: Sequence[str] | None = None, action_key: str | None = None,
                revision: str | None = None, tolerance_s: float | None = None) -> SourceReader:
    """Build the reader of ``fmt`` over ``source`` (a path, a directory, a glob or a list of them).

    ``revision`` (a Hub dataset's branch, tag or commit) and ``tolerance_s`` (video timestamp
    matching) apply to ``lerobot`` only, whose ``source`` may also be a Hub dataset id.

    Raises:
        DataError: unknown format, missing paths, keys missing for this format.
    """
    if fmt not in READERS:
        raise DataError(f"--format: expected one of {', '.join(READERS)}, got {fmt!r}")
    cls = READERS[fmt]
    keys = SourceKeys.resolve(embodiment, fmt, camera_keys, proprio_keys, action_key)
    options = {}
    if revision and fmt != "lerobot":
        raise DataError(f"--revision applies to --format lerobot (a Hub dataset), not to {fmt}")
    if fmt == "lerobot":
        source = resolve_source(source, revision, list(keys.cameras.values()))
        options = {"tolerance_s": tolerance_s} if tolerance_s is not None else {}
    is_unit = {"zarr": is_zarr_dir, "lerobot": is_lerobot_root}.get(fmt)
    paths = expand_paths(source, cls.suffixes, is_unit=is_unit)
    return cls(paths, embodiment, keys, Labeler(labels or LabelOptions()), **options)


__all__ = ["READERS", "open_source", "SourceReader", "SourceKeys", "EpisodeRef", "LabelOptions", "Labeler",
           "RobomimicReader", "EpisodeHDF5Reader", "ZarrReplayReader", "LeRobotReader", "expand_paths"]
