"""Source readers: one module per input layout (SPEC §4), each yielding :class:`Episode` objects
one at a time.

======================  =======================================================================
``--format``            layout
======================  =======================================================================
``robomimic``           robomimic / LIBERO HDF5, ``data/demo_N/{actions, rewards, dones, obs/<key>}``
``episode_hdf5``        one HDF5 file per episode (ALOHA, the reference's rollout files)
``zarr``                Diffusion Policy replay buffer (``data/<key>``, ``meta/episode_ends``)
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
from .robomimic import RobomimicReader
from .zarr_replay import ZarrReplayReader, is_zarr_dir

READERS: dict[str, type[SourceReader]] = {
    "robomimic": RobomimicReader,
    "episode_hdf5": EpisodeHDF5Reader,
    "zarr": ZarrReplayReader,
}


def open_source(fmt: str, source: str | Path | Sequence[str | Path], embodiment: Embodiment,
                labels: LabelOptions | None = None, camera_keys: Mapping[str, str] | None = None,
                proprio_keys: Sequence[str] | None = None, action_key: str | None = None) -> SourceReader:
    """Build the reader of ``fmt`` over ``source`` (a path, a directory, a glob or a list of them).

    Raises:
        DataError: unknown format, missing paths, keys missing for this format.
    """
    if fmt not in READERS:
        raise DataError(f"--format: expected one of {', '.join(READERS)}, got {fmt!r}")
    cls = READERS[fmt]
    keys = SourceKeys.resolve(embodiment, fmt, camera_keys, proprio_keys, action_key)
    paths = expand_paths(source, cls.suffixes, is_unit=is_zarr_dir if fmt == "zarr" else None)
    return cls(paths, embodiment, keys, Labeler(labels or LabelOptions()))


__all__ = ["READERS", "open_source", "SourceReader", "SourceKeys", "EpisodeRef", "LabelOptions", "Labeler",
           "RobomimicReader", "EpisodeHDF5Reader", "ZarrReplayReader", "expand_paths"]
