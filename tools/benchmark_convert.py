"""Throughput and memory of ``cosmos-policy convert`` against the bare limit, measured in one run.

Two cases (``--case``): ``robomimic`` (below) and ``lerobot`` (at the end of this docstring).

Writes a LIBERO-like robomimic HDF5 file with h5py (two cameras, proprio 2 + 7, actions 7), then
measures, each in its own subprocess so peak RSS is its own:

- the bare limit: read every camera array of every episode with h5py and JPEG-encode every frame
  (PIL, quality 95) -- no other work, one process;
- the converter, ``--workers`` 1 and 2 (by default): frames/s, peak RSS of the main process and of
  the largest worker, and the ratio to the bare limit per worker.

Peak RSS is the process's VmHWM (``/proc/<pid>/status``), not ``ru_maxrss``: on Linux the latter keeps
the parent's peak across fork + exec, so a subprocess would report the generator's memory.

Frames = steps x cameras, each read and encoded once. Images are generated at the embodiment's
image size (224x224) so neither side resizes. Python start-up and imports are outside the timed
region (torch, which the statistics module imports, costs seconds on a loaded machine); the
start-up of the worker pool, statistics and the manifest are inside it.

``--case lerobot`` writes the same kind of frames as a LeRobot v3.0 dataset (``tests/fixtures/lerobot_factory.py``:
every episode in one parquet file and one AV1 mp4 per camera, SVT-AV1 at LeRobot's defaults, CRF 30 and
a keyframe every 2 frames) and measures, each in its own subprocess:

- bare PyAV decode: every frame of the same mp4 files decoded to RGB arrays, sequentially, one decoder
  thread (as the converter's workers use) -- the decode limit;
- bare PyAV decode + JPEG: the same plus PIL JPEG quality 95 of every frame -- the work the converter
  must do at the least;
- the converter (``--format lerobot``), ``--workers`` 1 and 2: frames/s, peak RSS.

Usage::

    OMP_NUM_THREADS=1 python tools/benchmark_convert.py                 # 16 episodes x 120 steps
    OMP_NUM_THREADS=1 python tools/benchmark_convert.py --episodes 4 --steps 50 --workers 1 2 4
    OMP_NUM_THREADS=1 python tools/benchmark_convert.py --case lerobot --episodes 8 --steps 100
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import textwrap
from pathlib import Path
from typing import Any, Literal

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EMBODIMENT = REPO / "embodiments" / "libero.yaml"
CAMERA_KEYS = ("eye_in_hand_rgb", "agentview_rgb")


def camera_frames(rng: np.random.Generator, size: int, steps: int, episode: int, camera: int) -> np.ndarray:
    """``(steps, size, size, 3)`` uint8: a smooth scene with pixel noise and a moving red square."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([(xx * (1 + camera) + yy) % 256, (yy * 2 + 40 * camera) % 256, (xx + 2 * yy) % 256], -1)
    frames = np.empty((steps, size, size, 3), np.uint8)
    for t in range(steps):
        img = base + rng.normal(0, 6, size=base.shape)
        x0 = (7 * t + 13 * episode) % (size - 40)
        img[40:80, x0:x0 + 40] = (200, 30, 30)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def write_dataset(path: Path, episodes: int, steps: int, size: int, seed: int = 0) -> int:
    """A robomimic file with LIBERO's keys; images are smooth scenes with noise and a moving square
    so JPEG sizes and encode times resemble camera frames. Returns raw image bytes of one episode."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "put the bowl on the plate"})
        for e in range(episodes):
            g = data.create_group(f"demo_{e}")
            g["actions"] = rng.normal(size=(steps, 7)).astype(np.float32)
            # LIBERO's robot_states: gripper_qpos (2), eef_pos (3), eef_quat (4) (embodiments/libero.yaml)
            g["robot_states"] = np.concatenate([rng.uniform(0, 0.04, size=(steps, 2)), rng.normal(size=(steps, 7))],
                                               axis=1).astype(np.float32)
            rewards = np.zeros(steps, np.float32)
            rewards[-1] = float(e % 4 != 0)
            g["rewards"] = rewards
            for c, key in enumerate(CAMERA_KEYS):
                g.create_dataset(f"obs/{key}", data=camera_frames(rng, size, steps, e, c))
    return steps * size * size * 3 * len(CAMERA_KEYS)


BARE = textwrap.dedent("""
    import io, json, resource, sys, time
    import h5py
    from PIL import Image
    path = sys.argv[1]
    keys = sys.argv[2].split(",")
    frames = 0
    start, cpu = time.perf_counter(), time.process_time()
    with h5py.File(path, "r") as f:
        for demo in f["data"]:
            for key in keys:
                for frame in f["data"][demo]["obs"][key][()]:
                    Image.fromarray(frame).save(io.BytesIO(), format="JPEG", quality=95)
                    frames += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"frames": frames, "seconds": seconds, "cpu_seconds": cpu,
                      "rss_main_kb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}))
""")

CONVERT = textwrap.dedent("""
    import json, resource, sys, time
    import cosmos_policy_lightning.normalization  # imports torch (statistics): start-up, not conversion work
    from cosmos_policy_lightning.data.convert import convert
    src, out, emb, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {"format": "robomimic"}
    def cpu():  # this process and its (finished) worker processes, user + system
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    start, cpu0 = time.perf_counter(), cpu()
    manifest = convert(src, output=out, embodiment=emb, workers=workers, val_fraction=0.1, text_encoder="none",
                       progress=False, **options)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
    samples = manifest["counts"]["train"]["samples"] + manifest["counts"]["validation"]["samples"]
    print(json.dumps({"samples": samples, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "shards": len(manifest["shards"]),
                      "rss_main_kb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}))
""")


def _peak_kb(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in kB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _run(code: str, *args: str) -> dict:
    """Run a measurement in a subprocess; add the peak RSS of its largest child (pool worker), polled
    from /proc every 20 ms (a worker's VmHWM is exact up to its last 20 ms)."""
    import psutil  # a dependency of accelerate, itself a dependency of this package

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for child in parent.children(recursive=True):
                # only once the spawned interpreter runs: between fork and exec a child still maps (and
                # reports) the parent's memory
                if "spawn_main" in " ".join(child.cmdline()):
                    peaks[child.pid] = max(peaks.get(child.pid, 0), _peak_kb(child.pid))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"benchmark step failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_worker_kb"] = max(peaks.values(), default=0)
    return result


def benchmark(episodes: int = 16, steps: int = 120, workers: list[int] | None = None, size: int = 224,
              work_dir: str | None = None, case: Literal["robomimic", "lerobot"] = "robomimic") -> dict:
    """Generate a dataset, measure the bare limit and the converter; print and return the figures.

    Args:
        episodes: episodes in the generated file.
        steps: steps per episode.
        workers: converter worker counts to measure (default 1 and 2).
        size: image side in pixels (LIBERO's embodiment expects 224).
        work_dir: where to write the dataset and outputs (default: a temporary directory, removed).
        case: robomimic (HDF5 arrays) or lerobot (LeRobot v3.0, AV1 video; see the module docstring).
    """
    workers = workers or [1, 2]
    if case == "lerobot":
        return benchmark_lerobot(episodes, steps, workers, size, work_dir)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        src = tmp / "bench.hdf5"
        episode_bytes = write_dataset(src, episodes, steps, size)
        frames = episodes * steps * len(CAMERA_KEYS)
        print(f"dataset: {episodes} episodes x {steps} steps x {len(CAMERA_KEYS)} cameras at {size}x{size} = "
              f"{frames} frames; raw images {episode_bytes / 1e6:.0f} MB per episode, "
              f"{src.stat().st_size / 1e6:.0f} MB file", flush=True)
        bare = _run(BARE, src, ",".join(CAMERA_KEYS))
        bare_fps = bare["frames"] / bare["seconds"]
        bare_cpu_fps = bare["frames"] / bare["cpu_seconds"]
        print(f"bare limit (h5py read + PIL JPEG q95, 1 process): {bare_fps:7.0f} frames/s "
              f"({bare_cpu_fps:.0f} frames per CPU-second), peak RSS {bare['rss_main_kb'] / 1024:.0f} MB", flush=True)
        results = {"frames": frames, "bare_fps": bare_fps, "bare_frames_per_cpu_s": bare_cpu_fps,
                   "bare_rss_mb": bare["rss_main_kb"] / 1024, "runs": []}
        base_fps = None
        for w in workers:
            r = _run(CONVERT, src, tmp / f"out{w}", EMBODIMENT, w)
            assert r["samples"] == episodes * steps
            fps = frames / r["seconds"]
            base_fps = base_fps or fps
            ratio = fps / (w * bare_fps)
            cpu_ratio = (frames / r["cpu_seconds"]) / bare_cpu_fps
            worker_rss = f"{r['rss_worker_kb'] / 1024:.0f} MB" if w > 1 else "- (in-process)"
            print(f"converter --workers {w}: {fps:7.0f} frames/s = {ratio:.2f} x bare limit per worker, "
                  f"{fps / base_fps:.2f} x --workers {workers[0]}; CPU efficiency {cpu_ratio:.2f} x bare "
                  f"(frames per CPU-second, all processes); peak RSS main {r['rss_main_kb'] / 1024:.0f} MB, "
                  f"largest worker {worker_rss}; {r['shards']} shards", flush=True)
            results["runs"].append({"workers": w, "fps": fps, "ratio_per_worker": ratio, "cpu_efficiency": cpu_ratio,
                                    "rss_main_mb": r["rss_main_kb"] / 1024, "rss_worker_mb": r["rss_worker_kb"] / 1024})
        print(f"cores available: {os.cpu_count()}, load average before the last run: "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        return results


# ---------------------------------------------------------------------------------------------- LeRobot
LEROBOT_CAMERAS = {"wrist": "observation.images.wrist", "agentview": "observation.images.agentview"}
LEROBOT_OPTIONS = {"format": "lerobot", "camera_keys": LEROBOT_CAMERAS, "proprio_keys": ["observation.state"],
                   "action_key": "action"}

BARE_DECODE = textwrap.dedent("""
    import io, json, resource, sys, time
    import av
    from PIL import Image
    jpeg = sys.argv[1] == "jpeg"
    frames = 0
    start, cpu = time.perf_counter(), time.process_time()
    for path in sys.argv[2:]:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                rgb = frame.to_ndarray(format="rgb24")
                if jpeg:
                    Image.fromarray(rgb).save(io.BytesIO(), format="JPEG", quality=95)
                frames += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"frames": frames, "seconds": seconds, "cpu_seconds": cpu,
                      "rss_main_kb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}))
""")


def write_lerobot_dataset(root: Path, episodes: int, steps: int, size: int, seed: int = 0) -> int:
    """A LeRobot v3.0 dataset of the same kind of frames as :func:`write_dataset` (proprio 9, actions
    7), written by ``tests/fixtures/lerobot_factory.py``. Returns raw image bytes of one episode."""
    sys.path.insert(0, str(REPO))
    from tests.lerobot_factory import LeRobotEpisode, write_lerobot

    rng = np.random.default_rng(seed)
    eps = []
    for e in range(episodes):
        reward = np.zeros(steps, np.float32)
        reward[-1] = float(e % 4 != 0)
        eps.append(LeRobotEpisode(
            action=rng.normal(size=(steps, 7)).astype(np.float32),
            state=rng.normal(size=(steps, 9)).astype(np.float32),
            images={key: camera_frames(rng, size, steps, e, c) for c, key in enumerate(LEROBOT_CAMERAS.values())},
            task="put the bowl on the plate", reward=reward, success=reward > 0))
    write_lerobot(root, eps, version="v3.0", fps=20, codec="libsvtav1", episodes_per_file=episodes, gop=2,
                  quality=30, robot_type="panda")
    return steps * size * size * 3 * len(LEROBOT_CAMERAS)


def benchmark_lerobot(episodes: int, steps: int, workers: list[int], size: int, work_dir: str | None) -> dict:
    """The ``lerobot`` case of :func:`benchmark`."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        src = tmp / "bench_lerobot"
        episode_bytes = write_lerobot_dataset(src, episodes, steps, size)
        videos = sorted(str(p) for p in (src / "videos").rglob("*.mp4"))
        frames = episodes * steps * len(LEROBOT_CAMERAS)
        video_mb = sum(Path(v).stat().st_size for v in videos) / 1e6
        print(f"dataset: LeRobot v3.0, {episodes} episodes x {steps} steps x {len(LEROBOT_CAMERAS)} cameras at "
              f"{size}x{size} = {frames} frames in {len(videos)} AV1 files ({video_mb:.1f} MB; raw images "
              f"{episode_bytes / 1e6:.0f} MB per episode)", flush=True)
        results: dict[str, Any] = {"frames": frames, "runs": []}
        for name, mode in (("bare PyAV decode", "decode"), ("bare PyAV decode + PIL JPEG q95", "jpeg")):
            bare = _run(BARE_DECODE, mode, *videos)
            assert bare["frames"] == frames, bare
            fps, cpu_fps = frames / bare["seconds"], frames / bare["cpu_seconds"]
            results[f"bare_{mode}"] = {"fps": fps, "frames_per_cpu_s": cpu_fps, "rss_mb": bare["rss_main_kb"] / 1024}
            print(f"{name} (1 process, 1 decoder thread): {fps:7.0f} frames/s ({cpu_fps:.0f} frames per "
                  f"CPU-second), peak RSS {bare['rss_main_kb'] / 1024:.0f} MB", flush=True)
        decode, limit = results["bare_decode"], results["bare_jpeg"]
        for w in workers:
            r = _run(CONVERT, src, tmp / f"out{w}", EMBODIMENT, w, json.dumps(LEROBOT_OPTIONS))
            assert r["samples"] == episodes * steps
            fps = frames / r["seconds"]
            cpu_fps = frames / r["cpu_seconds"]
            worker_rss = f"{r['rss_worker_kb'] / 1024:.0f} MB" if w > 1 else "- (in-process)"
            print(f"converter --format lerobot --workers {w}: {fps:7.0f} frames/s = {fps / (w * decode['fps']):.2f} x "
                  f"bare decode and {fps / (w * limit['fps']):.2f} x bare decode + JPEG per worker; CPU efficiency "
                  f"{cpu_fps / limit['frames_per_cpu_s']:.2f} x bare decode + JPEG (frames per CPU-second); peak "
                  f"RSS main {r['rss_main_kb'] / 1024:.0f} MB, largest worker {worker_rss}", flush=True)
            results["runs"].append({"workers": w, "fps": fps, "vs_decode": fps / (w * decode["fps"]),
                                    "vs_decode_jpeg": fps / (w * limit["fps"]),
                                    "cpu_efficiency": cpu_fps / limit["frames_per_cpu_s"],
                                    "rss_main_mb": r["rss_main_kb"] / 1024, "rss_worker_mb": r["rss_worker_kb"] / 1024})
        print(f"cores available: {os.cpu_count()}, load average before the last run: "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(benchmark)
