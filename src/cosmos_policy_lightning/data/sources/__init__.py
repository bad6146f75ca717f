"""Source readers: one module per input layout (docs/method.md §4), each yielding :class:`Episode` objects
one at a time.

The formats are registered in :data:`registry.READERS` (``--format`` name -> reader class), the one
list every ``--format`` check and help text derives from; each reader module's docstring describes its
layout (docs/convert.md shows a command for each). Adding a layout: subclass :class:`SourceReader` in a new
module and add one line to ``READERS`` (CONTRIBUTING.md "Adding a source format").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ...embodiment import Embodiment
from ...errors import DataError
from .base import EpisodeRef, SourceKeys, SourceReader, expand_paths
from .episode_hdf5 import EpisodeHDF5Reader
from .labels import LabelOptions, Labeler
from .lerobot import LeRobotReader
from .registry import READERS, describe_formats, format_names, reader_class
from .robomimic import RobomimicReader
from .zarr_replay import ZarrReplayReader


def open_source(fmt: str, source: str | Path | Sequence[str | Path], embodiment: Embodiment,
                labels: LabelOptions | None = None, camera_keys: Mapping[str, str] | None = None,
                proprio_keys: Sequence[str] | None = None, action_key: str | None = None,
                revision: str | None = None, tolerance_s: float | None = None) -> SourceReader:
    """Build the reader of ``fmt`` over ``source`` (a path, a directory, a glob or a list of them).

    Everything format-specific comes from the reader class: a directory is one source when its
    :meth:`~SourceReader.is_one_source` says so (Zarr stores, LeRobot roots) and searched for files ending
    in its ``suffixes`` otherwise; ``revision`` (a Hub dataset's branch, tag or commit) applies to
    formats that read Hub datasets (``reads_hub``: lerobot, whose ``source`` may be a Hub dataset id);
    ``tolerance_s`` (video timestamp matching) goes to readers listing it in ``options``.

    Raises:
        DataError: unknown format, missing paths, keys missing for this format.
    """
    cls = reader_class(fmt)
    keys = SourceKeys.resolve(embodiment, fmt, camera_keys, proprio_keys, action_key)
    if revision and not cls.reads_hub:
        hub = " / ".join(name for name, c in READERS.items() if c.reads_hub)
        raise DataError(f"--revision applies to --format {hub} (a Hub dataset), not to {fmt}")
    source = cls.locate(source, revision, keys)
    given = {"tolerance_s": tolerance_s}
    options = {name: given[name] for name in cls.options if given.get(name) is not None}
    paths = expand_paths(source, cls.suffixes, is_unit=cls.is_one_source)
    return cls(paths, embodiment, keys, Labeler(labels or LabelOptions()), **options)


__all__ = ["READERS", "format_names", "reader_class", "describe_formats", "open_source", "SourceReader",
           "SourceKeys", "EpisodeRef", "LabelOptions", "Labeler", "RobomimicReader", "EpisodeHDF5Reader",
           "ZarrReplayReader", "LeRobotReader", "expand_paths"]
