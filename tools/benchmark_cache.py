"""Latent-cache build speed, idle and with a busy process beside it, for the thread settings before and
after issue 22 (item 7, "graceful under load").

    python tools/benchmark_cache.py                  # reach-v3 of samples/metaworld, tiny VAE, 1 augmented view
    python tools/benchmark_cache.py --step_stride 8 --views 0   # quicker

Each setting runs ``build_latent_cache`` in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` when torch
loads) on the same converted dataset, and times the build alone (not the imports or the VAE load):

* ``before``: torch threads = every core, no ``OMP_WAIT_POLICY`` (libgomp's default: waiting threads spin);
* ``after``: :func:`~cosmos_policy_lightning.data.latent_cache.encode_threads` (cores minus the one-minute
  load of other processes, at least 1) and ``OMP_WAIT_POLICY=PASSIVE`` (what ``cosmos-policy`` sets unless
  given);
* ``1 thread``: one torch thread, PASSIVE, and every core with PASSIVE, for reference.

"loaded" starts one pure-Python busy loop (one core's worth of load) beside the build. The machine's
load average before each run is printed: on a shared machine "idle" means "no busy loop of ours".

``--integrity`` measures instead the cost of the training path's checksum (``data.check_sha256``): the
SHA-256 rate of the dataset's shards, and the time of the first ``--batches`` training batches of a fresh
data module (online images, batch 8) with the check on and off, alternating, each in this process:

    python tools/benchmark_cache.py --integrity
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(args) -> None:
    """Build the cache once and print ``{"samples": n, "seconds": s, "threads": t}`` as JSON."""
    import torch

    from cosmos_policy_lightning.data.latent_cache import build_latent_cache, encode_threads, read_cache_manifest
    from cosmos_policy_lightning.model.module import resolve_path
    from cosmos_policy_lightning.model.sequence import PixelSequenceEncoder
    from cosmos_policy_lightning.model.vae import VideoVAE

    encoder = PixelSequenceEncoder(VideoVAE(resolve_path("assets/tiny_wan_vae")))  # cache-latents' default
    threads = args.threads or encode_threads()
    started = time.perf_counter()
    out = build_latent_cache(args.data, encoder, args.output, augment=True, augment_views=args.views, batch_size=8,
                             progress=False, threads=threads)
    seconds = time.perf_counter() - started
    samples = sum(e["samples"] for e in read_cache_manifest(out)["shards"])
    print(json.dumps({"samples": samples, "seconds": seconds, "threads": threads,
                      "torch_threads_default": torch.get_num_threads()}))


def _run(data: Path, work: Path, name: str, threads: int | None, passive: bool, loaded: bool, views: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        time.sleep(1.0 if loaded else 0.0)
        load = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--child", "--data", str(data), "--output", str(work / name),
               "--views", str(views)] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(load_before=load, samples_per_s=result["samples"] / result["seconds"])
    return result


def _integrity(data: Path, batches: int) -> None:
    """Print the SHA-256 rate over the dataset's shards and the first ``batches`` training batches' time with
    ``check_sha256`` on and off (three alternating rounds; the first round warms the page cache)."""
    import torch

    from cosmos_policy_lightning.data.datamodule import CosmosDataModule
    from cosmos_policy_lightning.data.integrity import file_sha256

    torch.set_num_threads(1)
    shards = sorted(data.glob("*.tar"))
    size = sum(p.stat().st_size for p in shards)
    started = time.perf_counter()
    for p in shards:
        file_sha256(p)
    hashing = time.perf_counter() - started
    print(f"SHA-256 of {len(shards)} shards, {size / 1e6:.1f} MB: {hashing * 1e3:.0f} ms "
          f"({size / 1e6 / hashing:.0f} MB/s)")
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for check in (True, False):
            dm = CosmosDataModule(str(data), batch_size=8, num_workers=0, shuffle_buffer=64, check_sha256=check)
            dm.setup("fit")
            started = time.perf_counter()
            for _ in zip(range(batches), dm.train_dataloader()):
                pass
            times[check].append(time.perf_counter() - started)
    on, off = min(times[True][1:]), min(times[False][1:])
    print(f"first {batches} batches of 8 (decode + augment, no model): check on {on:.2f} s, off {off:.2f} s; "
          f"difference {(on - off) * 1e3 / batches:+.1f} ms per batch, {(on - off) * 1e3:+.0f} ms in all (once per "
          f"shard and process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--views", type=int, default=1, help="augmented views per training sample")
    parser.add_argument("--step_stride", type=int, default=4)
    parser.add_argument("--integrity", action="store_true", help="measure the checksum cost on the training path")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--settings", type=int, nargs="*", default=None,
                        help="indices of the settings to run (0 before, 1 after, 2 one thread, 3 all cores PASSIVE)")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    from cosmos_policy_lightning.data.convert import convert
    from cosmos_policy_lightning.shipped import shipped_path

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        convert(str(REPO / "samples" / "metaworld" / "reach-v3.hdf5"), output=str(data),
                embodiment=str(shipped_path("embodiments/metaworld.yaml")), val_fraction=0.2,
                text_encoder="none", progress=False, step_stride=args.step_stride)
        if args.integrity:
            _integrity(data, args.batches)
            return
        settings = [("before (all cores, spinning)", cores, False), ("after (encode_threads, PASSIVE)", None, True),
                    ("1 thread, PASSIVE", 1, True), (f"{cores} threads, PASSIVE", cores, True)]
        rows = []
        for i, (label, threads, passive) in enumerate(settings):
            if args.settings and i not in args.settings:
                continue
            for loaded in (False, True):
                name = f"{len(rows)}"
                r = _run(data, work, name, threads, passive, loaded, args.views)
                rows.append((label, "loaded" if loaded else "idle", r))
                print(f"{label:<34} {'loaded' if loaded else 'idle':<7} threads {r['threads']}  "
                      f"{r['samples_per_s']:6.2f} samples/s  ({r['samples']} samples in {r['seconds']:.1f} s, "
                      f"load average before {r['load_before']:.2f})", flush=True)
    print(f"\n{cores} cores; 'loaded' = one busy-loop process beside the build; the load average includes "
          f"every other process on the machine.")


if __name__ == "__main__":
    main()
