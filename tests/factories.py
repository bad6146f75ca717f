"""Write small real source datasets in every layout ``cosmos-policy convert`` reads (docs/method.md §4).

Every writer takes a list of :class:`EpisodeSpec` and writes real files with h5py / zarr; the arrays
come from :func:`episode_arrays`, deterministic per seed, so tests can recompute what the shards
must contain. The test embodiment (:func:`write_embodiment`) has two cameras (32x32 model input,
sources 40x48 so every frame is resized), proprio 4 (3 joints + 1 gripper value), action 3, K = 4.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml
from PIL import Image

CAMERAS = ("wrist", "front")
SOURCE_HW = (40, 48)
ACTION_DIM = 3
PROPRIO_DIM = 4
K = 4
GAMMA = 0.9

#: source keys of every layout, as the test embodiment's YAML declares them
KEYS = {
    "robomimic": {"cameras": {"wrist": "wrist_rgb", "front": "front_rgb"}, "proprio": ["joint_pos", "gripper"],
                  "action": "actions"},
    "episode_hdf5": {"cameras": {"wrist": "observations/images/wrist", "front": "observations/images/front"},
                     "proprio": ["observations/qpos"], "action": "action"},
    "zarr": {"cameras": {"wrist": "wrist_img", "front": "front_img"}, "proprio": ["state"], "action": "action"},
    "lerobot": {"cameras": {"wrist": "observation.images.wrist", "front": "observation.images.front"},
                "proprio": ["observation.state"], "action": "action"},
}


def write_embodiment(directory: Path, image_size: tuple[int, int] = (32, 32), chunk_size: int = K,
                     gamma: float = GAMMA, name: str = "toy") -> Path:
    """Write the test embodiment YAML (keys for every format of ``KEYS``) and return its path."""
    data = {
        "name": name, "control_hz": 10, "image_size": list(image_size),
        "cameras": [{"name": cam, "role": "primary" if cam == "front" else "wrist",
                     "keys": {fmt: KEYS[fmt]["cameras"][cam] for fmt in KEYS}} for cam in CAMERAS],
        "proprio": {"dim": PROPRIO_DIM, "keys": {fmt: KEYS[fmt]["proprio"] for fmt in KEYS}},
        "action": {"dim": ACTION_DIM, "chunk_size": chunk_size, "keys": {fmt: KEYS[fmt]["action"] for fmt in KEYS}},
        "value": {"gamma": gamma},
    }
    path = Path(directory) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class EpisodeSpec:
    """One episode to write. ``score`` None means "not stored"; ``instruction`` None likewise."""

    length: int
    seed: int
    success: bool = True
    score: float | None = None
    instruction: str | None = None
    #: overrides of the generated arrays, e.g. {"actions": array with a NaN}
    override: dict[str, Any] = field(default_factory=dict)


def episode_arrays(spec: EpisodeSpec, hw: tuple[int, int] = SOURCE_HW) -> dict[str, np.ndarray]:
    """Deterministic arrays of one episode.

    Returns:
        ``actions (T, 3)``: ``actions[t] = (seed * 1000 + t, -t, seed)`` (recognisable steps);
        ``joint_pos (T, 3)``, ``gripper (T,)`` (proprio = their concatenation, 4 values);
        ``wrist`` / ``front``: ``(T, H, W, 3)`` uint8 smooth images that change with t;
        ``rewards``, ``dones`` ``(T,)``: 1 at the last step of a success.
    """
    T, s = spec.length, spec.seed
    rng = np.random.default_rng(s)
    t = np.arange(T, dtype=np.float32)
    out: dict[str, np.ndarray] = {
        "actions": np.stack([s * 1000 + t, -t, np.full(T, s, np.float32)], axis=1).astype(np.float32),
        "joint_pos": (rng.normal(size=(T, 3)) + s).astype(np.float32),
        "gripper": rng.uniform(0, 0.04, size=T).astype(np.float32),
    }
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    for c, cam in enumerate(CAMERAS):
        frames = np.empty((T, h, w, 3), np.uint8)
        for i in range(T):
            frames[i, ..., 0] = (xx * 5 + i * 20 + s * 7) % 256
            frames[i, ..., 1] = (yy * 6 + c * 80) % 256
            frames[i, ..., 2] = ((xx + yy) * 3 + i * 9) % 256
        out[cam] = frames
    rewards = np.zeros(T, np.float32)
    if T:
        rewards[-1] = 1.0 if spec.success else 0.0
    out["rewards"], out["dones"] = rewards, rewards.astype(np.uint8)
    out.update(spec.override)
    return out


def proprio_of(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The proprio the converter must produce: joint_pos then gripper, ``(T, 4)`` float32."""
    return np.concatenate([arrays["joint_pos"], np.asarray(arrays["gripper"]).reshape(len(arrays["gripper"]), -1)],
                          axis=1).astype(np.float32)


def jpeg_bytes(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- robomimic / LIBERO
def write_robomimic(path: Path, episodes: list[EpisodeSpec], problem_instruction: str | None = None,
                    success_attrs: bool = False, drop: tuple[str, ...] = ()) -> Path:
    """One robomimic file: ``data/demo_<i>/{actions, rewards, dones, obs/...}``.

    Args:
        problem_instruction: written as LIBERO's ``data.attrs["problem_info"]`` JSON.
        success_attrs: also write ``success`` / ``success_score`` attributes on each demo group.
        drop: dataset names (e.g. ``"obs/front_rgb"``) not written, to test missing keys.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if problem_instruction:
            data.attrs["problem_info"] = json.dumps({"language_instruction": problem_instruction})
        for i, spec in enumerate(episodes):
            a = episode_arrays(spec)
            g = data.create_group(f"demo_{i}")
            items = {"actions": a["actions"], "rewards": a["rewards"], "dones": a["dones"],
                     "obs/joint_pos": a["joint_pos"], "obs/gripper": a["gripper"],
                     "obs/wrist_rgb": a["wrist"], "obs/front_rgb": a["front"]}
            for name, arr in items.items():
                if name not in drop:
                    chunked = arr.ndim > 1 and len(arr) > 0
                    g.create_dataset(name, data=arr, chunks=(min(8, len(arr)), *arr.shape[1:]) if chunked else None)
            g.attrs["num_samples"] = spec.length
            _label_attrs(g.attrs, spec, success_attrs)
    return path


def _label_attrs(attrs, spec: EpisodeSpec, success: bool) -> None:
    """Write ``success`` / ``success_score`` (when ``success``) and ``task_description`` attributes."""
    if success:
        attrs["success"] = spec.success
        if spec.score is not None:
            attrs["success_score"] = spec.score
    if spec.instruction:
        attrs["task_description"] = spec.instruction


# ---------------------------------------------------------------- per-episode HDF5 (ALOHA, rollouts)
def write_episode_hdf5(path: Path, spec: EpisodeSpec, images: str = "array", rollout_attrs: bool = False) -> Path:
    """One ALOHA-layout episode file.

    Args:
        images: ``array`` (T, H, W, 3) uint8, ``jpeg`` (T JPEG byte strings, vlen uint8) or ``padded``
            ((T, N) zero-padded JPEG bytes with root attr ``compress`` as ALOHA's recorder writes).
        rollout_attrs: write the rollout root attributes ``success``, ``success_score`` (if the spec
            has one) and ``task_description`` (if the spec has one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = episode_arrays(spec)
    with h5py.File(path, "w") as f:
        f.create_dataset("observations/qpos", data=proprio_of(a))
        f.create_dataset("action", data=a["actions"])
        for cam in CAMERAS:
            key = f"observations/images/{cam}"
            frames = a[cam]
            if images == "array":
                f.create_dataset(key, data=frames, chunks=(1, *frames.shape[1:]))
            else:
                encoded = [jpeg_bytes(fr) for fr in frames]
                if images == "jpeg":
                    ds = f.create_dataset(key, shape=(len(encoded),), dtype=h5py.vlen_dtype(np.uint8))
                    for i, b in enumerate(encoded):
                        ds[i] = np.frombuffer(b, np.uint8)
                elif images == "padded":
                    width = max(len(b) for b in encoded) + 17
                    padded = np.zeros((len(encoded), width), np.uint8)
                    for i, b in enumerate(encoded):
                        padded[i, :len(b)] = np.frombuffer(b, np.uint8)
                    f.create_dataset(key, data=padded)
                    f.attrs["compress"] = True
                else:
                    raise ValueError(images)
        if rollout_attrs:
            _label_attrs(f.attrs, spec, True)
    return path


def write_episode_dir(directory: Path, episodes: list[EpisodeSpec], images: str = "array",
                      rollout_attrs: bool = False) -> Path:
    """``episode_<i>.hdf5`` for every spec in ``directory``."""
    directory = Path(directory)
    for i, spec in enumerate(episodes):
        write_episode_hdf5(directory / f"episode_{i}.hdf5", spec, images, rollout_attrs)
    return directory


# ---------------------------------------------------------------- Diffusion Policy Zarr
def write_zarr(path: Path, episodes: list[EpisodeSpec], zarr_format: int = 2, jpeg2k: bool = False,
               success_meta: bool = False, image_chunk: int = 1) -> Path:
    """A replay buffer ``data/{wrist_img, front_img, state, action}`` + ``meta/episode_ends``.

    Args:
        path: ``*.zarr`` (directory store) or ``*.zarr.zip`` (zip store).
        zarr_format: 2 or 3.
        jpeg2k: compress image chunks (one frame per chunk) with imagecodecs' Jpeg2k, lossless
            (``reversible``), as Diffusion Policy does.
        success_meta: write per-episode ``meta/success`` and ``meta/success_score``.
        image_chunk: frames per image chunk (chunks then straddle episode boundaries).
    """
    import zarr

    from cosmos_policy_lightning.data.sources.zarr_codecs import register_image_codecs, v3_image_codec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [episode_arrays(s) for s in episodes]
    cat = {
        "action": np.concatenate([a["actions"] for a in arrays]),
        "state": np.concatenate([proprio_of(a) for a in arrays]),
        "wrist_img": np.concatenate([a["wrist"] for a in arrays]),
        "front_img": np.concatenate([a["front"] for a in arrays]),
    }
    ends = np.cumsum([s.length for s in episodes]).astype(np.int64)
    store = zarr.storage.ZipStore(path, mode="w") if path.name.endswith(".zip") else str(path)
    root = zarr.open_group(store, mode="w", zarr_format=zarr_format)
    for name, arr in cat.items():
        kwargs: dict[str, Any] = {}
        if arr.ndim == 4:
            kwargs["chunks"] = (image_chunk, *arr.shape[1:])
            if jpeg2k:
                register_image_codecs()
                if zarr_format == 2:
                    import imagecodecs.numcodecs as icn

                    kwargs["compressors"] = icn.Jpeg2k(level=0, reversible=True)
                else:
                    kwargs["serializer"] = v3_image_codec("jpeg2k", level=0, reversible=True)
                    kwargs["compressors"] = None
        z = root.create_array(f"data/{name}", shape=arr.shape, dtype=arr.dtype, **kwargs)
        z[:] = arr
    e = root.create_array("meta/episode_ends", shape=ends.shape, dtype=ends.dtype)
    e[:] = ends
    if success_meta:
        s = root.create_array("meta/success", shape=(len(episodes),), dtype=bool)
        s[:] = np.array([sp.success for sp in episodes])
        sc = root.create_array("meta/success_score", shape=(len(episodes),), dtype=np.float32)
        sc[:] = np.array([sp.score if sp.score is not None else float(sp.success) for sp in episodes], np.float32)
    if not isinstance(store, str):
        store.close()
    return path


# ---------------------------------------------------------------- reading a conversion back
def read_split(output: Path, split: str) -> list[dict[str, Any]]:
    """Every sample of ``split`` in shard order, read with webdataset (members as raw bytes)."""
    import webdataset as wds

    shards = sorted(str(p) for p in Path(output).glob(f"{split}-*.tar"))
    if not shards:
        return []
    return list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode one raw sample: images to arrays, .npy to arrays, meta.json to a dict."""
    out: dict[str, Any] = {"__key__": sample["__key__"], "__url__": sample.get("__url__")}
    for name, value in sample.items():
        if name.endswith(".jpg"):
            out[name] = np.asarray(Image.open(io.BytesIO(value)))
        elif name.endswith(".npy"):
            out[name] = np.load(io.BytesIO(value), allow_pickle=False)
        elif name.endswith(".json"):
            out[name] = json.loads(value)
    return out
