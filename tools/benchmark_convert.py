"""Throughput and memory of ``cosmos-policy convert`` against the bare limit, measured in one run.

Writes a LIBERO-like robomimic HDF5 file with h5py (two cameras, proprio 2 + 7, actions 7), then
measures, each in its own subprocess so peak RSS is its own:

- the bare limit: read every camera array of every episode with h5py and JPEG-encode every frame
  (PIL, quality 95) -- no other work, one process;
- the converter, ``--workers`` 1 and 2 (by default): frames/s, peak RSS of the main process and of
  the largest worker, and the ratio to the bare limit per worker.

Frames = steps x cameras, each read and encoded once. Images are generated at the embodiment's
image size (224x224) so neither side resizes. Python start-up and imports are outside the timed
region (torch, which the statistics module imports, costs seconds on a loaded machine); the
start-up of the worker pool, statistics and the manifest are inside it.

Usage::

    OMP_NUM_THREADS=1 python tools/benchmark_convert.py                 # 16 episodes x 120 steps
    OMP_NUM_THREADS=1 python tools/benchmark_convert.py --episodes 4 --steps 50 --workers 1 2 4
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EMBODIMENT = REPO / "embodiments" / "libero.yaml"
CAMERA_KEYS = ("eye_in_hand_rgb", "agentview_rgb")


def write_dataset(path: Path, episodes: int, steps: int, size: int, seed: int = 0) -> int:
    """A robomimic file with LIBERO's keys; images are smooth scenes with noise and a moving square
    so JPEG sizes and encode times resemble camera frames. Returns raw image bytes of one episode."""
    import h5py

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "put the bowl on the plate"})
        for e in range(episodes):
            g = data.create_group(f"demo_{e}")
            g["actions"] = rng.normal(size=(steps, 7)).astype(np.float32)
            g["obs/gripper_states"] = rng.uniform(0, 0.04, size=(steps, 2)).astype(np.float32)
            g["obs/joint_states"] = rng.normal(size=(steps, 7)).astype(np.float32)
            rewards = np.zeros(steps, np.float32)
            rewards[-1] = float(e % 4 != 0)
            g["rewards"] = rewards
            for c, key in enumerate(CAMERA_KEYS):
                base = np.stack([(xx * (1 + c) + yy) % 256, (yy * 2 + 40 * c) % 256, (xx + 2 * yy) % 256], -1)
                frames = np.empty((steps, size, size, 3), np.uint8)
                for t in range(steps):
                    img = base + rng.normal(0, 6, size=base.shape)
                    x0 = (7 * t + 13 * e) % (size - 40)
                    img[40:80, x0:x0 + 40] = (200, 30, 30)
                    frames[t] = np.clip(img, 0, 255).astype(np.uint8)
                g.create_dataset(f"obs/{key}", data=frames)
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
                      "rss_main_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

CONVERT = textwrap.dedent("""
    import json, resource, sys, time
    import cosmos_policy_lightning.normalization  # imports torch (statistics): start-up, not conversion work
    from cosmos_policy_lightning.data.convert import convert
    src, out, emb, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def cpu():  # this process and its (finished) worker processes, user + system
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    start, cpu0 = time.perf_counter(), cpu()
    manifest = convert(src, output=out, embodiment=emb, format="robomimic", workers=workers, val_fraction=0.1,
                       text_encoder="none", progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
    samples = manifest["counts"]["train"]["samples"] + manifest["counts"]["validation"]["samples"]
    print(json.dumps({"samples": samples, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "shards": len(manifest["shards"]),
                      "rss_main_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
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
              work_dir: str | None = None) -> dict:
    """Generate a dataset, measure the bare limit and the converter; print and return the figures.

    Args:
        episodes: episodes in the generated file.
        steps: steps per episode.
        workers: converter worker counts to measure (default 1 and 2).
        size: image side in pixels (LIBERO's embodiment expects 224).
        work_dir: where to write the dataset and outputs (default: a temporary directory, removed).
    """
    workers = workers or [1, 2]
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


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(benchmark)
