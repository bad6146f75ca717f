"""LeRobot datasets: parquet tables plus mp4 videos, local or from the Hugging Face Hub (docs/method.md §4 source
layouts).

Paths, fps and features come from ``meta/info.json``; its ``codebase_version`` picks the layout:

``v2.0`` / ``v2.1`` (one parquet file per episode, one mp4 per episode and camera)::

    meta/info.json           data_path  "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
                             video_path "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    meta/episodes.jsonl      {"episode_index": 3, "tasks": ["pick the cube"], "length": 266}
    meta/tasks.jsonl         {"task_index": 0, "task": "pick the cube"}
    meta/episodes_stats.jsonl  (not needed here)

``v3.0`` (several episodes per parquet file and per mp4 file)::

    meta/info.json           data_path  "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
                             video_path "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    meta/episodes/chunk-000/file-000.parquet
                             one row per episode: episode_index, tasks, length, data/chunk_index,
                             data/file_index, dataset_from_index, dataset_to_index, and per video key
                             videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}
    meta/tasks.parquet       task_index, and the task string as the (pandas) index: a column ``task``
                             or ``__index_level_0__``

Data rows (both versions): the feature columns (``action``, ``observation.state`` ... as lists of
numbers; camera features of dtype ``image`` as ``{bytes, path}`` structs), ``timestamp`` (seconds from
the episode start), ``frame_index``, ``episode_index``, ``index``, ``task_index``, and optionally
``next.reward``, ``next.done``, ``next.success``. Camera features of dtype ``video`` are not columns: the
frame of row ``t`` is the one at ``from_timestamp + timestamp[t]`` in the camera's mp4 (``from_timestamp``
is 0 in v2), matched within ``tolerance_s`` and decoded with PyAV (``video_frames.py``).

Keys (embodiment ``keys: {lerobot: ...}``): each camera names its feature
(``observation.images.<cam>``), proprio lists the state feature(s) concatenated in order
(``observation.state``), action names ``action``.

Labels: success is ``True`` when any row's ``next.success`` is true (recordings often run a few steps
past the success), else from ``next.reward`` (a positive last reward), else from ``--all_success`` /
``--success_sidecar`` / ``--success_regex`` (those options, when given, win over the columns, as
they win over attributes in the other formats). The instruction is the episode's task string
(``tasks`` of the episode's metadata; an episode with several tasks uses its first row's task).

Episode ids are ``episode_<index:06d>`` (``<root name>-episode_<index:06d>`` when several datasets are
given); a sidecar, ``--val_episodes`` or a regex may also name an episode by its ``episode_index``
(``"3"`` or ``3``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ..episode import Episode, build_episode
from ..schema import sanitize_episode_id
from .base import EpisodeRef, SourceReader, natural_key
from .hub import parse_hub_source, snapshot
from .video_frames import TOLERANCE_S, VideoFrames

#: codebase_version -> layout generation
VERSIONS = {"v2.0": 2, "v2.1": 2, "v3.0": 3}
INFO = "meta/info.json"
_FIELD = re.compile(r"\{([A-Za-z_]*)(?::[^}]*)?\}")


def is_lerobot_root(path: Path) -> bool:
    """A directory holding ``meta/info.json`` (a LeRobot dataset root)."""
    return path.is_dir() and (path / INFO).is_file()


# ---------------------------------------------------------------------------------------------- sources
def hub_patterns(info: Mapping[str, Any], video_keys: Sequence[str]) -> list[str]:
    """``allow_patterns`` fetching what a conversion reads: ``meta/``, every data file, and the videos
    of ``video_keys`` only (the path templates of ``info.json`` with their fields as wildcards)."""
    patterns = ["meta/*"]
    data = info.get("data_path")
    if isinstance(data, str):
        patterns.append(_FIELD.sub("*", data))
    video = info.get("video_path")
    features = info.get("features") or {}
    for key in video_keys:
        if isinstance(video, str) and (features.get(key) or {}).get("dtype") == "video":
            patterns.append(_FIELD.sub(lambda m: key if m.group(1) == "video_key" else "*", video))
    return patterns


def resolve_source(source: str | Path | Sequence[str | Path], revision: str | None,
                   camera_keys: Sequence[str]) -> list[str]:
    """Local paths for ``source``: local paths pass through; a Hub dataset id is fetched (``meta/``
    first, then the data files and the videos of ``camera_keys``) and replaced by its snapshot folder.

    Raises:
        DataError: ``revision`` given for a local path; a Hub dataset that cannot be fetched or has no
            ``meta/info.json``.
    """
    items = [source] if isinstance(source, (str, Path)) else list(source)
    out, hub = [], False
    for item in items:
        parsed = parse_hub_source(str(item))
        if parsed is None:
            out.append(str(item))
            continue
        hub = True
        repo, rev = parsed
        if rev and revision and rev != revision:
            raise DataError(f"{item}: revision {rev!r} in the address but --revision {revision!r}")
        try:
            meta = snapshot(repo, rev or revision, ["meta/*"])
        except DataError as err:
            if str(item).startswith("hf://"):
                raise
            raise DataError(f"{err} (and there is no local folder {item})") from None
        info = _read_info(meta) if (meta / INFO).is_file() else None
        if info is None:
            raise DataError(f"hf://datasets/{repo}: no {INFO}; not a LeRobot dataset")
        # the snapshot folder is named by the commit: fetch the rest at exactly that commit
        out.append(str(snapshot(repo, meta.name, hub_patterns(info, camera_keys))))
    if revision and not hub:
        raise DataError(f"--revision {revision!r} only applies to a Hub dataset id (org/name or hf://datasets/...)")
    return out


# ---------------------------------------------------------------------------------------------- metadata
def _read_info(root: Path) -> dict[str, Any]:
    path = root / INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object")
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise DataError(f"{path}: codebase_version {version!r} is not supported (expected one of "
                        f"{', '.join(VERSIONS)})")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise DataError(f"{path}: key {key} missing")
    if not isinstance(info["features"], dict):
        raise DataError(f"{path}: key features: expected an object of feature name -> description")
    return info


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise DataError(f"{path}: line {n}: not valid JSON ({err})") from None
    return rows


def _schema_names(path: Path) -> list[str]:
    """Column names of a parquet file (reads the footer only)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return list(pq.read_schema(path).names)
    except Exception as err:
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {_first_line(err)})") from None


def _read_parquet(path: Path, columns: Sequence[str] | None = None, filters: Any = None):
    """A pyarrow Table of ``columns`` (all if None), rows kept by ``filters``.

    Raises:
        DataError: missing / unreadable file, or a missing column (one line naming both).
    """
    import pyarrow.parquet as pq

    names = _schema_names(path)
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: key {missing[0]} missing; columns: {', '.join(names[:30])}")
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None, filters=filters)
    except Exception as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {_first_line(err)})") from None


class LeRobotDataset:
    """The metadata of one LeRobot dataset root: ``info.json``, tasks and the episode table.

    Attributes:
        root: the dataset folder.
        version: 2 or 3 (layout generation).
        fps: frames per second of the data rows (``info.json``).
        features: feature name -> description (``dtype``, ``shape``, ``names`` ...).
        tasks: task_index -> task string.
        episodes: episode_index -> ``{"length", "tasks", "data": (chunk, file), "videos": {key:
            (chunk, file, from_timestamp, to_timestamp)}}`` (v3 fields only in v3).

    Raises:
        DataError: unknown ``codebase_version``, missing or malformed metadata files.
    """

    def __init__(self, root: Path, video_keys: Sequence[str]):
        self.root = Path(root)
        self.info = _read_info(self.root)
        self.version = VERSIONS[self.info["codebase_version"]]
        self.fps = float(self.info["fps"])
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        self.chunks_size = int(self.info.get("chunks_size") or 1000)
        if self.version == 2:
            self.tasks = {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(self.root / "meta/tasks.jsonl")
                          if "task_index" in r and "task" in r}
            self.episodes = {}
            for r in _read_jsonl(self.root / "meta/episodes.jsonl"):
                if "episode_index" not in r:
                    raise DataError(f"{self.root / 'meta/episodes.jsonl'}: a line has no episode_index")
                self.episodes[int(r["episode_index"])] = {"length": r.get("length"), "tasks": list(r.get("tasks") or [])}
        else:
            self.tasks = self._v3_tasks()
            self.episodes = self._v3_episodes(video_keys)

    def _v3_tasks(self) -> dict[int, str]:
        path = self.root / "meta/tasks.parquet"
        table = _read_parquet(path)
        name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if name is None or "task_index" not in table.column_names:
            raise DataError(f"{path}: expected columns task_index and task (or the pandas index "
                            f"__index_level_0__), got {', '.join(table.column_names)}")
        return {int(i): str(t) for i, t in zip(table["task_index"].to_pylist(), table[name].to_pylist())}

    def _v3_episodes(self, video_keys: Sequence[str]) -> dict[int, dict[str, Any]]:
        files = sorted((self.root / "meta/episodes").glob("**/*.parquet"), key=lambda p: natural_key(str(p)))
        if not files:
            raise DataError(f"{self.root / 'meta/episodes'}: no parquet files (expected the v3.0 episode table)")
        wanted = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index",
                  *[f"videos/{k}/{f}" for k in video_keys
                    for f in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]]
        episodes: dict[int, dict[str, Any]] = {}
        for path in files:
            names = _schema_names(path)
            required = ["episode_index", "data/chunk_index", "data/file_index"]
            for r in _read_parquet(path, [c for c in wanted if c in names or c in required]).to_pylist():
                videos = {k: (r.get(f"videos/{k}/chunk_index"), r.get(f"videos/{k}/file_index"),
                              r.get(f"videos/{k}/from_timestamp"), r.get(f"videos/{k}/to_timestamp"))
                          for k in video_keys}
                episodes[int(r["episode_index"])] = {
                    "length": r.get("length"), "tasks": list(r.get("tasks") or []),
                    "data": (int(r["data/chunk_index"]), int(r["data/file_index"])), "videos": videos, "meta": path}
        return episodes

    # ------------------------------------------------------------------ paths
    def _format(self, template: str, index: int, **fields: Any) -> Path:
        return self.root / template.format(episode_chunk=index // self.chunks_size, episode_index=index, **fields)

    def data_file(self, index: int) -> Path:
        """The parquet file holding episode ``index``'s rows."""
        if self.version == 2:
            return self._format(self.info["data_path"], index)
        chunk, file = self.episodes[index]["data"]
        return self._format(self.info["data_path"], index, chunk_index=chunk, file_index=file)

    def video_file(self, index: int, key: str) -> tuple[Path, float]:
        """``(mp4 path, from_timestamp in seconds)`` of feature ``key`` for episode ``index``.

        Raises:
            DataError: no ``video_path`` in ``info.json``, or (v3) no file / timestamp columns for ``key``.
        """
        template = self.info.get("video_path")
        if not isinstance(template, str):
            raise DataError(f"{self.root / INFO}: feature {key} is a video but video_path is missing")
        if self.version == 2:
            return self._format(template, index, video_key=key), 0.0
        chunk, file, start, _ = self.episodes[index]["videos"][key]
        if chunk is None or file is None or start is None:
            raise DataError(f"{self.episodes[index]['meta']}: episode {index}: columns videos/{key}/chunk_index, "
                            f"file_index and from_timestamp are needed")
        return self._format(template, index, video_key=key, chunk_index=int(chunk), file_index=int(file)), float(start)

    def task(self, index: int, first_task_index: int | None) -> str | None:
        """The episode's task string (see the module docstring)."""
        tasks = self.episodes[index]["tasks"]
        if len(tasks) == 1:
            return str(tasks[0])
        if first_task_index is not None and first_task_index in self.tasks:
            return self.tasks[first_task_index]
        return str(tasks[0]) if tasks else None


def _check_video_window(ds: "LeRobotDataset", index: int, key: str, timestamps: np.ndarray, tolerance_s: float,
                        where: str) -> None:
    """v3.0: the episode's video window (``videos/<key>/from_timestamp`` .. ``to_timestamp``) must hold a frame
    for every row: the last row's frame, presented for ``1 / fps`` s from ``from_timestamp + timestamp[-1]``,
    must start at least half a frame before ``to_timestamp`` (beyond it lie the next episode's frames of a
    shared mp4).

    Raises:
        DataError: a window shorter than the rows, naming the episode, key, window and row count.
    """
    if ds.version == 2 or not len(timestamps):
        return
    _, _, start, end = ds.episodes[index]["videos"][key]
    if start is None or end is None:
        return
    window = float(end) - float(start)
    if float(timestamps[-1]) + 0.5 / ds.fps > window + tolerance_s:
        raise DataError(f"{where}: key {key}: video window from_timestamp {float(start):.4g} .. to_timestamp "
                        f"{float(end):.4g} ({window:.3f} s, {ds.episodes[index]['meta']}) is shorter than the "
                        f"episode's "
                        f"{len(timestamps)} rows (last timestamp {float(timestamps[-1]):.3f} s at {ds.fps} fps): the "
                        f"last rows would read frames outside the episode")


# ---------------------------------------------------------------------------------------------- columns
def column_matrix(column: Any, where: str) -> np.ndarray:
    """A numeric parquet column as ``(T, D)`` (list / fixed-size-list columns) or ``(T,)`` (scalars).

    Raises:
        DataError: nulls, rows of different lengths, or a non-numeric column.
    """
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if arr.null_count:
        raise DataError(f"{where}: {arr.null_count} empty (null) rows")
    t = arr.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        values = arr.flatten()
        if values.null_count:
            raise DataError(f"{where}: null values inside the rows")
        if pa.types.is_fixed_size_list(t):
            width = t.list_size
        else:
            lengths = np.asarray(arr.value_lengths())
            width = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and np.any(lengths != width):
                bad = int(np.flatnonzero(lengths != width)[0])
                raise DataError(f"{where}: row {bad} has {lengths[bad]} values, row 0 has {width}")
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
                or pa.types.is_boolean(values.type)):
            raise DataError(f"{where}: expected numbers, got {values.type}")
        return values.to_numpy(zero_copy_only=False).reshape(len(arr), width)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return arr.to_numpy(zero_copy_only=False)
    raise DataError(f"{where}: expected a list of numbers per row, got {t}")


def image_column(column: Any, root: Path, where: str) -> np.ndarray:
    """Camera features stored as images in the parquet (``{bytes, path}`` structs, PNG / JPEG bytes) as a
    ``(T,)`` object array of encoded images; a row without bytes is read from ``path`` under ``root``.

    Raises:
        DataError: not a struct column with ``bytes`` / ``path``, or a row with neither.
    """
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if not pa.types.is_struct(arr.type) or arr.type.get_field_index("bytes") < 0:
        raise DataError(f"{where}: expected an image column ({{bytes, path}} per row), got {arr.type}")
    data = arr.field("bytes").to_pylist()
    paths = arr.field("path").to_pylist() if arr.type.get_field_index("path") >= 0 else [None] * len(data)
    out = np.empty(len(data), dtype=object)
    for i, (b, p) in enumerate(zip(data, paths)):
        if b is None:
            if not p or not (root / p).is_file():
                raise DataError(f"{where}: row {i} has no image bytes and no readable file ({p!r})")
            b = (root / p).read_bytes()
        out[i] = bytes(b)
    return out


# ---------------------------------------------------------------------------------------------- reader
class LeRobotReader(SourceReader):
    """Reader of LeRobot datasets v2.x / v3.0 (``--format lerobot``).

    Args:
        paths: dataset roots (folders holding ``meta/info.json``; a Hub id is resolved to its snapshot
            folder by :func:`resolve_source` before).
        embodiment, keys, labeler: as for every reader.
        tolerance_s: largest gap between a row's time and its video frame's presentation time, seconds.

    Raises:
        DataError: a path is not a LeRobot dataset root.
    """

    summary = "LeRobot dataset v2.0 / v2.1 / v3.0: parquet + mp4 decoded with PyAV; local or a Hub dataset id"
    suffixes = ("meta/info.json",)  # never a file name: only dataset roots (one source each) are sources
    directory_is_one_source = True
    source_markers = (INFO,)
    reads_hub = True
    options = ("tolerance_s",)

    @classmethod
    def locate(cls, source, revision, keys):
        """Local dataset roots for ``source``: Hub dataset ids are fetched (only the videos of the
        embodiment's cameras) by :func:`resolve_source`; local paths pass through."""
        return resolve_source(source, revision, list(keys.cameras.values()))

    def __init__(self, paths, embodiment, keys, labeler, tolerance_s: float = TOLERANCE_S):
        super().__init__(paths, embodiment, keys, labeler)
        for p in self.paths:
            if not is_lerobot_root(p):
                raise DataError(f"{p}: not a LeRobot dataset (expected a folder with {INFO})")
        if not tolerance_s > 0:
            raise DataError(f"--tolerance_s: expected a positive number of seconds, got {tolerance_s}")
        self.tolerance_s = float(tolerance_s)
        self._datasets: dict[str, LeRobotDataset] = {}

    def _dataset(self, path: str) -> LeRobotDataset:
        ds = self._datasets.get(path)
        if ds is None:
            ds = self._datasets[path] = LeRobotDataset(Path(path), list(self.keys.cameras.values()))
            self._check_features(ds)
        return ds

    def _check_features(self, ds: LeRobotDataset) -> None:
        """Every key of the embodiment is a feature of the right kind (before any episode is read)."""
        where = ds.root / INFO
        names = ", ".join(sorted(ds.features))
        for key in (*self.keys.cameras.values(), *self.keys.proprio, self.keys.action):
            if key not in ds.features:
                raise DataError(f"{where}: key {key} is not a feature of this dataset; features: {names}")
        for cam, key in self.keys.cameras.items():
            dtype = ds.features[key].get("dtype")
            if dtype not in ("video", "image"):
                raise DataError(f"{where}: key {key} (camera {cam}): expected a feature of dtype video or image, "
                                f"got {dtype!r}")

    def list_episodes(self) -> list[EpisodeRef]:
        """Episodes of every dataset in ``episode_index`` order (from ``meta/episodes``).

        Raises:
            DataError: unknown ``codebase_version``, malformed metadata, an embodiment key that is not
                a feature of the dataset.
        """
        refs = []
        many = len(self.paths) > 1
        for path in self.paths:
            ds = self._dataset(str(path))
            for i in sorted(ds.episodes):
                raw = f"episode_{i:06d}"
                eid = sanitize_episode_id(f"{path.name}-{raw}" if many else raw)
                aliases = tuple(dict.fromkeys((eid, raw, str(i), f"{path.name}-{raw}", f"{path}:{raw}")))
                refs.append(EpisodeRef(eid, str(path), raw, aliases))
        return refs

    def _open(self, ref: EpisodeRef) -> Episode:
        self.close()  # the previous episode's video containers
        ds = self._dataset(ref.path)
        index = int(ref.key.rsplit("_", 1)[1])
        where = f"{ref.path}: episode {ref.episode_id}"
        data_path = ds.data_file(index)
        image_keys = [k for k in self.keys.cameras.values() if ds.features[k].get("dtype") == "image"]
        video_keys = [k for k in self.keys.cameras.values() if ds.features[k].get("dtype") == "video"]
        names = _schema_names(data_path)
        optional = [c for c in ("timestamp", "frame_index", "task_index", "next.success", "next.reward") if c in names]
        columns = list(dict.fromkeys([self.keys.action, *self.keys.proprio, *image_keys, *optional]))
        filters = [("episode_index", "==", index)] if ds.version == 3 else None
        table = _read_parquet(data_path, columns + (["episode_index"] if filters and "episode_index" not in columns
                                                    else []), filters)
        if "frame_index" in table.column_names:
            table = table.sort_by("frame_index")
        rel = data_path.relative_to(ds.root)
        length = ds.episodes[index].get("length")
        if length is not None and table.num_rows != int(length):
            raise DataError(f"{where}: {rel} has {table.num_rows} rows for this episode, meta/episodes says "
                            f"length {length}")

        def col(key: str) -> np.ndarray:
            return column_matrix(table[key], f"{where}: key {key}")

        if "timestamp" in table.column_names:
            timestamps = np.asarray(col("timestamp"), np.float64).reshape(-1)
        elif "frame_index" in table.column_names:
            timestamps = np.asarray(col("frame_index"), np.float64).reshape(-1) / ds.fps
        else:
            timestamps = np.arange(table.num_rows) / ds.fps
        cameras: dict[str, tuple[str, Any]] = {}
        for cam, key in self.keys.cameras.items():
            if key in video_keys:
                video, start = ds.video_file(index, key)
                _check_video_window(ds, index, key, timestamps, self.tolerance_s, where)
                cameras[cam] = (key, VideoFrames(video, timestamps, f"{where}: key {key}", from_timestamp=start,
                                                 tolerance_s=self.tolerance_s, handles=self._handles))
            else:
                cameras[cam] = (key, image_column(table[key], ds.root, f"{where}: key {key}"))
        episode = build_episode(
            episode_id=ref.episode_id, source=ref.path, embodiment=self.embodiment,
            actions=(self.keys.action, col(self.keys.action)),
            proprio=[(k, col(k)) for k in self.keys.proprio],
            cameras=cameras, aliases=ref.aliases,
        )
        attrs: dict[str, Any] = {}
        first_task = int(col("task_index")[0]) if "task_index" in table.column_names and table.num_rows else None
        task = ds.task(index, first_task)
        if task:
            attrs["task"] = task
        if "next.success" in table.column_names:
            attrs["success"] = bool(np.any(col("next.success")))
        rewards = col("next.reward") if "next.reward" in table.column_names else None
        # labels after the structural checks, so an empty episode is reported as such
        return self.labeler.label(episode, ref, [attrs], rewards, None, per_episode_file=False)


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


__all__ = ["LeRobotReader", "LeRobotDataset", "resolve_source", "hub_patterns", "is_lerobot_root",
           "column_matrix", "image_column", "VERSIONS"]
