"""Write small real LeRobot datasets (codebase_version v2.1 and v3.0) the way LeRobot itself lays them
out: parquet tables written with pyarrow, one mp4 per camera encoded with PyAV, the metadata files of
each version, and a Hugging Face cache snapshot of a dataset for offline Hub tests.

Arrays come from ``factories.episode_arrays`` (same seeds, same values as the robomimic / Zarr
writers), so a test can convert the same episodes from both formats and compare. Feature names:
``observation.state`` (= ``proprio_of``: joint_pos then gripper, 4 values), ``action`` (3 values),
``observation.images.wrist`` / ``observation.images.front`` (40x48 RGB).

Also a command that exports robomimic HDF5 files (the bundled Meta-World sample) as a LeRobot v3.0
dataset: ``python -m tests.lerobot_factory samples/metaworld samples/lerobot_metaworld``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .factories import SOURCE_HW, EpisodeSpec, episode_arrays, proprio_of

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder otherwise (1 = errors only)

V21_DATA = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_TASK = "put the cube in the bowl"
#: codec name in info.json per PyAV encoder
CODEC_NAMES = {"libsvtav1": "av1", "libx264": "h264", "libx265": "hevc"}


@dataclass
class LeRobotEpisode:
    """One episode's columns. ``images``: feature -> ``(T, H, W, 3)`` uint8; ``reward`` / ``success``
    per row or None (column not written)."""

    action: np.ndarray
    state: np.ndarray
    images: dict[str, np.ndarray]
    task: str
    reward: np.ndarray | None = None
    success: np.ndarray | None = None


def from_spec(spec: EpisodeSpec, labels: str = "success", hw: tuple[int, int] = SOURCE_HW) -> LeRobotEpisode:
    """The factory arrays of ``spec`` as LeRobot columns.

    Args:
        labels: ``success`` (``next.success`` and ``next.reward``), ``reward`` (``next.reward`` only)
            or ``none``.
        hw: image size (``episode_arrays``).
    """
    a = episode_arrays(spec, hw)
    reward = np.asarray(a["rewards"], np.float32)
    return LeRobotEpisode(
        action=a["actions"], state=proprio_of(a),
        images={"observation.images.wrist": a["wrist"], "observation.images.front": a["front"]},
        task=spec.instruction or DEFAULT_TASK,
        reward=reward if labels in ("success", "reward") else None,
        success=(reward > 0) if labels == "success" else None,
    )


# ------------------------------------------------------------------------------------------ encoding
def encode_video(path: Path, frames: Sequence[np.ndarray], fps: int, codec: str = "libsvtav1", gop: int = 4,
                 quality: int = 20) -> None:
    """Encode RGB frames as one mp4 video stream, frame ``i`` presented at ``i / fps`` seconds.

    Args:
        codec: a PyAV encoder: libsvtav1 (AV1, LeRobot's default), libx264 (H.264) or libx265 (HEVC).
            The libx265 of PyAV 18's wheel corrupts the heap (the process aborts, often at a later
            allocation) on frames 48 pixels wide; give it widths of 64 or more.
        gop: keyframe interval in frames (LeRobot uses 2).
        quality: CRF (lower is better; LeRobot uses 30).
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    options = {"libsvtav1": {"g": str(gop), "crf": str(quality), "preset": "12"},
               "libx264": {"g": str(gop), "crf": str(quality), "preset": "veryfast"},
               "libx265": {"crf": str(quality), "preset": "ultrafast",
                           "x265-params": f"log-level=error:keyint={gop}:min-keyint={gop}"}}[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def png_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _vector_type(width: int, fixed: bool) -> pa.DataType:
    return pa.list_(pa.float32(), width) if fixed else pa.list_(pa.float32())


def _rows(episodes: list[LeRobotEpisode], indices: list[int], first_index: int, fps: int, image_keys: Sequence[str],
          task_index: dict[str, int], fixed: bool, timestamp_shift: dict[int, float]) -> pa.Table:
    """The data rows of ``episodes`` (global episode indices ``indices``) as one table."""
    cols: dict[str, list] = {k: [] for k in ("observation.state", "action", *image_keys, "timestamp", "frame_index",
                                             "episode_index", "index", "task_index", "next.done")}
    with_reward = episodes[0].reward is not None
    with_success = episodes[0].success is not None
    if with_reward:
        cols["next.reward"] = []
    if with_success:
        cols["next.success"] = []
    index = first_index
    for ep, e in zip(episodes, indices):
        T = len(ep.action)
        cols["observation.state"] += list(ep.state)
        cols["action"] += list(ep.action)
        for key in image_keys:
            cols[key] += [{"bytes": png_bytes(f), "path": f"frame_{t:06d}.png"} for t, f in enumerate(ep.images[key])]
        cols["timestamp"] += list((np.arange(T) / fps + timestamp_shift.get(e, 0.0)).astype(np.float32))
        cols["frame_index"] += list(range(T))
        cols["episode_index"] += [e] * T
        cols["index"] += list(range(index, index + T))
        cols["task_index"] += [task_index[ep.task]] * T
        cols["next.done"] += [t == T - 1 for t in range(T)]
        if with_reward:
            cols["next.reward"] += list(ep.reward)
        if with_success:
            cols["next.success"] += list(ep.success)
        index += T
    state_dim = max((len(ep.state[0]) for ep in episodes if len(ep.state)), default=1)
    action_dim = max((len(ep.action[0]) for ep in episodes if len(ep.action)), default=1)
    types = {"observation.state": _vector_type(state_dim, fixed), "action": _vector_type(action_dim, fixed),
             "timestamp": pa.float32(), "frame_index": pa.int64(), "episode_index": pa.int64(), "index": pa.int64(),
             "task_index": pa.int64(), "next.done": pa.bool_(), "next.reward": pa.float32(), "next.success": pa.bool_()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {}
    for name, values in cols.items():
        if name in image_keys:
            arrays[name] = pa.array(values, image_type)
        elif name in ("observation.state", "action"):
            arrays[name] = pa.array([np.asarray(v, np.float32).tolist() for v in values], types[name])
        else:
            arrays[name] = pa.array(values, types[name])
    return pa.table(arrays)


def _features(episodes: list[LeRobotEpisode], fps: int, video_keys: Sequence[str], image_keys: Sequence[str],
              codec: str) -> dict[str, Any]:
    ep = episodes[0]
    feats: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": [ep.state.shape[1]],
                              "names": [f"state_{i}" for i in range(ep.state.shape[1])]},
        "action": {"dtype": "float32", "shape": [ep.action.shape[1]],
                   "names": [f"action_{i}" for i in range(ep.action.shape[1])]},
    }
    for key in (*video_keys, *image_keys):
        h, w = ep.images[key].shape[1:3]
        feats[key] = {"dtype": "video" if key in video_keys else "image", "shape": [h, w, 3],
                      "names": ["height", "width", "channels"]}
        if key in video_keys:
            feats[key]["info"] = {"video.height": h, "video.width": w, "video.codec": CODEC_NAMES[codec],
                                  "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                  "video.channels": 3, "has_audio": False}
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64"), ("next.done", "bool")):
        feats[name] = {"dtype": dtype, "shape": [1], "names": None}
    if ep.reward is not None:
        feats["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    if ep.success is not None:
        feats["next.success"] = {"dtype": "bool", "shape": [1], "names": None}
    return feats


def _stats(ep: LeRobotEpisode) -> dict[str, Any]:
    out = {}
    for name, arr in (("observation.state", ep.state), ("action", ep.action)):
        a = np.asarray(arr, np.float64)
        out[name] = {"min": a.min(0).tolist(), "max": a.max(0).tolist(), "mean": a.mean(0).tolist(),
                     "std": a.std(0).tolist(), "count": [len(a)]}
    return out


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# ------------------------------------------------------------------------------------------ datasets
def write_lerobot(root: Path, episodes: list[LeRobotEpisode], *, version: str = "v3.0", fps: int = 10,
                  codec: str = "libsvtav1", image_keys: Sequence[str] = (), episodes_per_file: int = 3,
                  gop: int = 4, quality: int = 20, task_column: str = "task",
                  timestamp_shift: dict[int, float] | None = None, codebase_version: str | None = None,
                  robot_type: str = "toy") -> Path:
    """Write a LeRobot dataset in ``root``.

    Args:
        version: ``v2.1`` (one parquet / mp4 per episode, jsonl metadata, list columns) or ``v3.0``
            (``episodes_per_file`` episodes per parquet and per mp4 file, parquet metadata, fixed-size
            list columns).
        codec: PyAV encoder of every video (see :func:`encode_video`).
        image_keys: camera features stored as PNG images inside the parquet instead of as video.
        task_column: v3.0: name of the task string column of ``meta/tasks.parquet`` (``task``, or
            ``__index_level_0__`` as pandas writes an unnamed index).
        timestamp_shift: episode index -> seconds added to its ``timestamp`` column (to test tolerance).
        codebase_version: written instead of ``version`` in ``info.json`` (to test refusal).

    Returns:
        ``root``.
    """
    root = Path(root)
    shift = dict(timestamp_shift or {})
    video_keys = [k for k in episodes[0].images if k not in image_keys]
    tasks = list(dict.fromkeys(ep.task for ep in episodes))
    task_index = {t: i for i, t in enumerate(tasks)}
    lengths = [len(ep.action) for ep in episodes]
    info: dict[str, Any] = {
        "codebase_version": codebase_version or version, "robot_type": robot_type,
        "total_episodes": len(episodes), "total_frames": int(sum(lengths)), "total_tasks": len(tasks),
        "chunks_size": 1000, "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
        "features": _features(episodes, fps, video_keys, image_keys, codec),
    }
    if version == "v2.1":
        info.update(total_videos=len(episodes) * len(video_keys), total_chunks=1, data_path=V21_DATA,
                    video_path=V21_VIDEO if video_keys else None)
        first = 0
        for e, ep in enumerate(episodes):
            table = _rows([ep], [e], first, fps, image_keys, task_index, fixed=False, timestamp_shift=shift)
            _write_table(root / V21_DATA.format(episode_chunk=0, episode_index=e), table)
            for key in video_keys:
                encode_video(root / V21_VIDEO.format(episode_chunk=0, video_key=key, episode_index=e),
                             ep.images[key], fps, codec, gop, quality)
            first += len(ep.action)
        _write_jsonl(root / "meta/episodes.jsonl", [{"episode_index": e, "tasks": [ep.task], "length": len(ep.action)}
                                                    for e, ep in enumerate(episodes)])
        _write_jsonl(root / "meta/tasks.jsonl", [{"task_index": i, "task": t} for i, t in enumerate(tasks)])
        _write_jsonl(root / "meta/episodes_stats.jsonl", [{"episode_index": e, "stats": _stats(ep)}
                                                          for e, ep in enumerate(episodes)])
    elif version == "v3.0":
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=200, data_path=V30_DATA,
                    video_path=V30_VIDEO if video_keys else None)
        meta_rows: list[dict[str, Any]] = []
        first = 0
        for f, start in enumerate(range(0, len(episodes), episodes_per_file)):
            group = list(range(start, min(start + episodes_per_file, len(episodes))))
            eps = [episodes[e] for e in group]
            table = _rows(eps, group, first, fps, image_keys, task_index, fixed=True, timestamp_shift=shift)
            _write_table(root / V30_DATA.format(chunk_index=0, file_index=f), table)
            for key in video_keys:  # one stream: the episodes' frames back to back
                encode_video(root / V30_VIDEO.format(video_key=key, chunk_index=0, file_index=f),
                             [fr for ep in eps for fr in ep.images[key]], fps, codec, gop, quality)
            offset = 0
            for e, ep in zip(group, eps):
                T = len(ep.action)
                row: dict[str, Any] = {"episode_index": e, "tasks": [ep.task], "length": T,
                                       "data/chunk_index": 0, "data/file_index": f,
                                       "dataset_from_index": first, "dataset_to_index": first + T}
                for key in video_keys:
                    row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": f,
                                f"videos/{key}/from_timestamp": offset / fps,
                                f"videos/{key}/to_timestamp": (offset + T) / fps})
                row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
                for name, st in _stats(ep).items():
                    row.update({f"stats/{name}/{k}": v for k, v in st.items()})
                meta_rows.append(row)
                offset += T
                first += T
        _write_table(root / V30_EPISODES.format(chunk_index=0, file_index=0), pa.Table.from_pylist(meta_rows))
        pandas_meta = {"index_columns": [task_column], "column_indexes": [], "columns": [
            {"name": task_column, "field_name": task_column, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None}]}
        tasks_table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                                task_column: pa.array(tasks, pa.string())})
        tasks_table = tasks_table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
        _write_table(root / "meta/tasks.parquet", tasks_table)
    else:
        raise ValueError(version)
    _write_json(root / "meta/info.json", info)
    return root


def write_lerobot_specs(root: Path, specs: list[EpisodeSpec], labels: str = "success",
                        hw: tuple[int, int] = SOURCE_HW, **kwargs: Any) -> Path:
    """:func:`write_lerobot` of the factory episodes ``specs`` (see :func:`from_spec`)."""
    return write_lerobot(root, [from_spec(s, labels, hw) for s in specs], **kwargs)


def episode_id(index: int) -> str:
    """The converter's id of LeRobot episode ``index``."""
    return f"episode_{index:06d}"


# ------------------------------------------------------------------------------------------ Hub cache
def write_hub_cache(cache_dir: Path, repo_id: str, dataset: Path, commit: str = "0" * 39 + "1",
                    branch: str = "main") -> Path:
    """Put ``dataset`` into a Hugging Face cache as huggingface_hub lays out a downloaded dataset repo:
    ``datasets--<org>--<name>/blobs/<sha256>``, ``snapshots/<commit>/<path>`` (relative symlinks to the
    blobs) and ``refs/<branch>`` holding the commit. Returns the snapshot folder."""
    repo_dir = Path(cache_dir) / ("datasets--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    for path in sorted(p for p in Path(dataset).rglob("*") if p.is_file()):
        rel = path.relative_to(dataset)
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = repo_dir / "refs" / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snap


# ------------------------------------------------------------------------------------------ export
def export_robomimic(sources: Sequence[Path], output: Path, *, camera_keys: dict[str, str],
                     state_keys: Sequence[str], action_key: str = "actions", fps: int = 80,
                     codec: str = "libsvtav1", episodes_per_file: int = 1000, quality: int = 30,
                     gop: int = 2) -> Path:
    """Export robomimic HDF5 files as one LeRobot v3.0 dataset (all episodes, files in order).

    Each demo becomes an episode: ``action`` = ``actions``, ``observation.state`` = the ``obs/<key>`` of
    ``state_keys`` concatenated, ``observation.images.<cam>`` = ``obs/<camera_keys[cam]>`` as video
    (LeRobot's defaults: AV1, CRF 30, keyframe every 2 frames), ``next.reward`` = ``rewards``,
    ``next.success`` = ``rewards > 0``, the task = the demo's ``task_description`` attribute.
    """
    import h5py

    episodes = []
    for src in sources:
        with h5py.File(src, "r") as f:
            demos = sorted(f["data"].keys(), key=lambda d: int(d.split("_")[-1]))
            for demo in demos:
                g = f["data"][demo]
                state = np.concatenate([np.asarray(g["obs"][k][()], np.float32).reshape(len(g[action_key]), -1)
                                        for k in state_keys], axis=1)
                reward = np.asarray(g["rewards"][()], np.float32)
                task = g.attrs.get("task_description")
                task = task.decode() if isinstance(task, bytes) else str(task)
                episodes.append(LeRobotEpisode(
                    action=np.asarray(g[action_key][()], np.float32), state=state,
                    images={f"observation.images.{cam}": g["obs"][key][()] for cam, key in camera_keys.items()},
                    task=task, reward=reward, success=reward > 0))
    return write_lerobot(output, episodes, version="v3.0", fps=fps, codec=codec, episodes_per_file=episodes_per_file,
                         gop=gop, quality=quality, robot_type="sawyer")


if __name__ == "__main__":
    import sys

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    files = sorted(src.glob("*.hdf5"))
    export_robomimic(files, out, camera_keys={"wrist": "gripperPOV_rgb", "corner": "corner_rgb"},
                     state_keys=["hand_pos", "gripper_opening"])
    print(f"{out}: {sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.2f} MB")
