"""The one list of source formats: ``--format`` name -> reader class (docs/method.md §4 source layouts).

Everything that names formats derives from :data:`READERS`: the check of ``cosmos-policy convert
--format`` (and of ``format`` in a data module's ``convert_from``), the format list of
``cosmos-policy convert --help`` and :func:`~cosmos_policy_lightning.data.sources.open_source`.
How a reader finds its sources (file suffixes, directories that are one source, Hub datasets, extra
options) is declared on its class (:class:`~cosmos_policy_lightning.data.sources.base.SourceReader`),
so adding a format is: its reader module, one line below, and ``keys: {<format>: ...}`` entries in the
embodiment YAMLs that use it (CONTRIBUTING.md "Adding a source format").
"""

from __future__ import annotations

from ...errors import DataError
from .base import SourceReader
from .episode_hdf5 import EpisodeHDF5Reader
from .lerobot import LeRobotReader
from .robomimic import RobomimicReader
from .zarr_replay import ZarrReplayReader

#: ``--format`` name -> reader class, one line per format (the order of ``--help`` and of error messages).
READERS: dict[str, type[SourceReader]] = {
    "robomimic": RobomimicReader,
    "episode_hdf5": EpisodeHDF5Reader,
    "zarr": ZarrReplayReader,
    "lerobot": LeRobotReader,
}


def format_names() -> tuple[str, ...]:
    """The registered format names, in registry order (``robomimic`` first)."""
    return tuple(READERS)


def reader_class(fmt: str) -> type[SourceReader]:
    """The reader class registered as ``fmt``.

    Raises:
        DataError: ``fmt`` is not registered; one line listing the registered names.
    """
    cls = READERS.get(fmt) if isinstance(fmt, str) else None
    if cls is None:
        raise DataError(f"--format: expected one of {', '.join(READERS)}, got {fmt!r}")
    return cls


def describe_formats() -> str:
    """``name (summary), name (summary), ...`` of every registered format, for ``--help`` texts."""
    return ", ".join(f"{name} ({cls.summary})" if cls.summary else name for name, cls in READERS.items())


__all__ = ["READERS", "format_names", "reader_class", "describe_formats"]
