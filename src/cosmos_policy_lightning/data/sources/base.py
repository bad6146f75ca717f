"""What every source reader shares: key resolution, episode references, path expansion, the reader
interface (docs/method.md §4 source layouts)."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...embodiment import Embodiment
from ...errors import DataError
from ..episode import Episode
from .labels import Labeler


@dataclass(frozen=True)
class SourceKeys:
    """Source key of every camera, the proprio keys (concatenated in order) and the action key.

    Keys are as the embodiment YAML writes them for one format (``cameras[i].keys.<format>``,
    ``proprio.keys.<format>``, ``action.keys.<format>``); each reader documents how it resolves them.
    """

    cameras: Mapping[str, str]
    proprio: tuple[str, ...]
    action: str

    @classmethod
    def resolve(cls, embodiment: Embodiment, fmt: str, camera_keys: Mapping[str, str] | None = None,
                proprio_keys: Sequence[str] | None = None, action_key: str | None = None) -> "SourceKeys":
        """Keys for format ``fmt`` from the embodiment, each overridable.

        Raises:
            DataError: a camera / proprio / action key is neither in the YAML for ``fmt`` nor given,
                or an override names a camera the embodiment does not have.
        """
        overrides = dict(camera_keys or {})
        # A misspelt format name in the YAML shows up here: name the formats it does have keys for.
        present = sorted({f for c in embodiment.cameras for f in c.keys} | set(embodiment.proprio.keys)
                         | set(embodiment.action.keys))
        has = f" (the YAML has keys for {', '.join(present)})" if present else ""
        unknown = sorted(set(overrides) - set(embodiment.camera_names))
        if unknown:
            raise DataError(f"--camera_keys: unknown camera {unknown[0]!r}; embodiment {embodiment.name} "
                            f"has {', '.join(embodiment.camera_names)}")
        cameras = {}
        for i, cam in enumerate(embodiment.cameras):
            key = overrides.get(cam.name) or cam.keys.get(fmt)
            if not key:
                raise DataError(f"{embodiment.source}: cameras[{i}] ({cam.name}): no key for format {fmt!r}{has}; "
                                f"add cameras[{i}].keys.{fmt} to the YAML or pass --camera_keys")
            cameras[cam.name] = key
        proprio = tuple(proprio_keys) if proprio_keys else tuple(embodiment.proprio.keys.get(fmt, ()))
        if not proprio:
            raise DataError(f"{embodiment.source}: proprio: no keys for format {fmt!r}{has}; add proprio.keys.{fmt} "
                            f"to the YAML or pass --proprio_keys")
        action = action_key or embodiment.action.keys.get(fmt)
        if not action:
            raise DataError(f"{embodiment.source}: action: no key for format {fmt!r}{has}; add action.keys.{fmt} "
                            f"to the YAML or pass --action_key")
        return cls(cameras, proprio, action)

    def to_dict(self) -> dict[str, Any]:
        return {"cameras": dict(self.cameras), "proprio": list(self.proprio), "action": self.action}


@dataclass(frozen=True)
class EpisodeRef:
    """Cheap handle on one episode, listed without reading its data.

    Attributes:
        episode_id: unique, sanitised id (the shard key prefix).
        path: the file or store holding the episode.
        key: group name (robomimic ``demo_N``) or episode index (Zarr) inside ``path``; None when the
            file is the episode.
        aliases: other names users may give it (raw group name, file name, file stem, path).
    """

    episode_id: str
    path: str
    key: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source(self) -> str:
        """``<path>`` or ``<path>:<key>``, used in messages and matched by ``--success_regex``."""
        return self.path if self.key is None else f"{self.path}:{self.key}"


def natural_key(text: str) -> list[Any]:
    """Sort key putting ``demo_2`` before ``demo_10``."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(text))]


def expand_paths(sources: str | Path | Sequence[str | Path], suffixes: tuple[str, ...],
                 is_unit=None) -> list[Path]:
    """Files (or stores) named by ``sources``: paths, directories (searched recursively for names
    ending in ``suffixes``) and glob patterns. Sorted naturally, duplicates removed.

    Args:
        is_unit: optional predicate: a directory for which it is true is itself one source (a Zarr
            directory store), not searched; ``open_source`` passes the reader's
            :meth:`SourceReader.is_one_source`.

    Raises:
        DataError: a path does not exist, a pattern matches nothing, nothing was found, or a symbolic
            link loops (a link chain that never ends, or a directory link back to an ancestor).
    """
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    found: list[Path] = []
    for item in items:
        text = str(item)
        if any(ch in text for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True), key=natural_key)]
            if not matches:
                raise DataError(f"{text}: no file matches this pattern")
            found += matches
            continue
        path = Path(text)
        _refuse_link_loop(path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if path.is_dir() and not (is_unit and is_unit(path)):
            inner = _walk(path, suffixes, is_unit, set())
            if not inner:
                raise DataError(f"{path}: no {' / '.join(suffixes)} files in this directory")
            found += sorted(inner, key=lambda p: natural_key(str(p)))
        else:
            found.append(path)
    for p in found:
        _refuse_link_loop(p)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _refuse_link_loop(path: Path) -> None:
    """DataError when ``path`` is a symbolic link whose chain never ends (``a -> b -> a``)."""
    import errno
    import os

    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(f"{path}: symbolic link loop (the link chain never reaches a file)") from None


def _walk(directory: Path, suffixes: tuple[str, ...], is_unit, visited: set[tuple[int, int]]) -> list[Path]:
    """Files ending in ``suffixes`` under ``directory``; units (stores) are returned, not entered.
    ``visited`` holds the (device, inode) of the directories on the way down, so a link back to an
    ancestor is refused instead of recursing forever."""
    st = directory.stat()
    here = (st.st_dev, st.st_ino)
    if here in visited:
        raise DataError(f"{directory}: symbolic link loop (leads back to a directory above it)")
    out: list[Path] = []
    for p in sorted(directory.iterdir()):
        if p.is_dir():
            out += [p] if is_unit and is_unit(p) else _walk(p, suffixes, is_unit, visited | {here})
        elif p.name.endswith(suffixes):
            _refuse_link_loop(p)
            out.append(p)
    return out


class SourceReader:
    """Base class of the readers: list episodes cheaply, then open one at a time.

    Subclasses set the class attributes below that differ from the defaults and implement
    :meth:`list_episodes` and :meth:`_open`; the format's name is its key in ``registry.READERS``.
    A reader is picklable (open handles are dropped) so conversion workers can rebuild it in their
    process.

    Args:
        paths: files or stores (see :func:`expand_paths`).
        embodiment: the robot the data must match.
        keys: resolved source keys.
        labeler: success / score / instruction labelling.
    """

    #: What the format is, a few words for ``cosmos-policy convert --help`` (``robomimic / LIBERO HDF5``).
    summary: ClassVar[str] = ""
    #: Name endings of the source files searched for in a directory given as ``source``.
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: A store that is a directory (a Zarr directory store, a LeRobot dataset root): such a directory is
    #: one source, returned as a path instead of being searched for files (see :meth:`is_one_source`).
    directory_is_one_source: ClassVar[bool] = False
    #: Files at the root of a directory that is one source (``.zgroup``); a directory holding none of
    #: them is searched for sources below it. Empty: every directory is one source.
    source_markers: ClassVar[tuple[str, ...]] = ()
    #: ``source`` may name a Hugging Face Hub dataset (``--revision`` applies; see :meth:`locate`).
    reads_hub: ClassVar[bool] = False
    #: Keyword options of the constructor beyond the common ones, given by ``open_source`` when set
    #: (``tolerance_s``); each is recorded in a conversion's settings.
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def is_one_source(cls, path: Path) -> bool:
        """True when ``path`` is a directory that is itself one source of this format (not searched).

        Driven by :attr:`directory_is_one_source` and :attr:`source_markers`; :func:`expand_paths` asks
        it of every directory it meets.
        """
        if not cls.directory_is_one_source or not path.is_dir():
            return False
        return not cls.source_markers or any((path / m).exists() for m in cls.source_markers)

    @classmethod
    def locate(cls, source: str | Path | Sequence[str | Path], revision: str | None,
               keys: SourceKeys) -> str | Path | Sequence[str | Path]:
        """Local paths behind ``source``: ``source`` itself unless the format reads Hub datasets
        (:attr:`reads_hub`), whose reader fetches them here (``revision``: branch, tag or commit)."""
        return source

    def __init__(self, paths: Sequence[Path], embodiment: Embodiment, keys: SourceKeys, labeler: Labeler):
        self.paths = [Path(p) for p in paths]
        self.embodiment, self.keys, self.labeler = embodiment, keys, labeler
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def list_episodes(self) -> list[EpisodeRef]:
        """Every episode, in a deterministic order, without reading arrays."""
        raise NotImplementedError

    @contextmanager
    def open(self, ref: EpisodeRef) -> Iterator[Episode]:
        """The episode ``ref``, valid inside the ``with`` block (its images are lazy views).

        Raises:
            DataError: missing key, bad shapes or values (see ``build_episode``), or an unreadable file.
        """
        try:
            episode = self._open(ref)
        except DataError:
            raise
        except Exception as err:  # h5py / zarr / OS errors: one line naming the episode
            first = str(err).splitlines()[0] if str(err) else ""
            raise DataError(f"{ref.path}: episode {ref.episode_id}: cannot read ({type(err).__name__}: {first})") from None
        yield episode

    def _open(self, ref: EpisodeRef) -> Episode:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Episode]:
        """Yield the episodes one at a time (each valid until the next is requested)."""
        for ref in self.list_episodes():
            with self.open(ref) as episode:
                yield episode

    def close(self) -> None:
        """Close every open file handle."""
        for handle in self._handles.values():
            try:
                handle.close()
            except Exception:  # closing a broken file must not hide the real error
                pass
        self._handles.clear()

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lookup(container: Any, key: str, prefixes: Sequence[str], where: str) -> tuple[str, Any]:
    """Find ``key`` in an HDF5 group / Zarr group, trying each prefix in turn.

    Returns:
        ``(path found, dataset)``.

    Raises:
        DataError: naming every path tried and the keys that exist.
    """
    tried = []
    for prefix in prefixes:
        path = f"{prefix}{key}"
        tried.append(path)
        try:
            if path in container:
                return path, container[path]
        except (KeyError, ValueError):
            continue
    available = []
    for prefix in dict.fromkeys(p.rstrip("/") for p in prefixes):
        try:
            group = container[prefix] if prefix else container
            available += [f"{prefix + '/' if prefix else ''}{k}" for k in group.keys()]
        except Exception:
            continue
    hint = f"; available: {', '.join(sorted(available)[:20])}" if available else ""
    raise DataError(f"{where}: key {key} missing (looked for {', '.join(tried)}){hint}")
