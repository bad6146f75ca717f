"""Latent cache: the frozen VAE's encoding of every sample, computed once (``cosmos-policy cache-latents``).

The Wan VAE never trains, yet online training re-encodes the same pixel sequences at every step; on a
CPU that is ~90 % of a step of the tiny model. The cache encodes each sample's pixel sequence once --
exactly what :meth:`CosmosPolicyModule.encode_batch` encodes: the layout's whole pixel sequence in one
VAE call, posterior mean, the VAE's per-channel normalisation (``model/sequence.py``,
``model/vae.py``) -- and training reads the stored latents instead.

Augmentation is kept by storing several *views* per training sample: view 0 is the test-time view
(the centre crop of the paper's §IV-A augmentation when the data module augments, the raw images when
it does not) and views ``1..augment_views`` are random augmentations, one parameter set per view drawn
from ``(seed, sample key, view)``. The data module draws one view per sample and step. Held-out
samples store only view 0, which is what online validation / test encode.

Layout of a cache directory (default ``<dataset>/latents``)::

    manifest.json              fingerprint, status, latent frames kept, shard list with sample counts
    train-000000.tar ...       one latent shard per pixel shard (same name), same sample keys
    validation-000000.tar ...

A latent sample holds ``latents.npy`` -- ``(V, 16, F, h, w)`` in ``dtype``, the F latent frames that
injection does not overwrite (the blank frame and the camera slots; proprio / action / value frames are
written from the vectors at batch time, so the statistics can change without re-encoding) -- and the
pixel sample's ``proprio.npy``, ``future_proprio.npy``, ``actions.npy`` and ``meta.json`` unchanged.

The fingerprint records the VAE (a hash of its weights and configuration), the layout, the image
size, the augmentation settings, the pixel dataset's statistics fingerprint and the *content* of what it
encodes (:func:`dataset_content`: every pixel shard's name, sample count and SHA-256 as the dataset's
manifest records them, and the SHA-256 of ``stats.json``); the data module refuses a cache whose
fingerprint differs from what it is asked for -- so a cache left from before ``convert --overwrite``, or
built beside a conversion of other data, is never read -- and the preparation stage
(``training/prepare.py``) refuses one made with another VAE than the model's
(:func:`check_cache_matches_model`).

The cache is derived data of its dataset: the build holds the dataset folder's lock (``locking.py``)
and then the cache folder's, in that order, so ``convert`` and ``cache-latents`` on one dataset never
run at the same time; ``convert --overwrite`` deletes ``<dataset>/latents``. A build with other options
than a running one is refused at once. A build finding a finished cache checks every latent shard's
size and SHA-256 and re-encodes the damaged ones; training checks them as it reads
(``data/integrity.py``) and names the ``cache-latents`` command to run (:func:`rebuild_hint`).

This module only reads and writes caches: the encoder comes in as an argument (the model's
``model/sequence.py`` ``PixelSequenceEncoder``), so the data package never imports the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, write_json_atomic
from ..embodiment import Embodiment
from ..errors import CosmosPolicyError, DataError
from ..layout import SequenceLayout
from ..locking import folder_lock
from ..storage import is_url, join, location
from . import schema as S
from .augment import REFERENCE_AUGMENT, apply_uint8, center_crop_params, sample_params
from .dataset_info import read_dataset_info
from .schema import load_json
from .integrity import CheckedTarSamples, check_shard_sizes
from .shards import BLOCK, RECORD, sample_record
from .stages import decode_images

#: Member of a latent sample holding the stored views.
LATENTS = "latents.npy"
#: Members copied unchanged from the pixel sample.
PASSTHROUGH = (S.PROPRIO, S.FUTURE_PROPRIO, S.ACTIONS, S.META)
CACHE_VERSION = 2  # 2: the fingerprint holds the dataset content (dataset_content)
DTYPES = {"float16": np.float16, "float32": np.float32}


def kept_frames(layout: SequenceLayout) -> list[int]:
    """Latent indices whose content comes from the VAE (not overwritten by vector injection): the blank
    frame and every camera slot, current and future."""
    vector_slots = {layout.index(n) for n in ("proprio", "future_proprio", "action", "value")}
    return [i for i in range(layout.num_latent_frames) if i not in vector_slots]


def dataset_content(info) -> str:
    """Hash of the content a cache encodes: per pixel shard (both splits, manifest order) its name, sample
    count and SHA-256 as the dataset's manifest records them (the size where an older manifest has no
    checksum), and the SHA-256 of the dataset's ``stats.json`` bytes.

    Args:
        info: the dataset's :class:`~cosmos_policy_lightning.data.dataset_info.DatasetInfo`.

    Returns:
        16 hex characters of a SHA-256.
    """
    from .integrity import file_sha256

    shards = [[Path(p).name, n, d or b] for split in S.SPLITS
              for p, n, b, d in zip(info.splits[split].shards, info.splits[split].samples,
                                    info.splits[split].bytes or (None,) * len(info.splits[split].shards),
                                    info.splits[split].sha256 or (None,) * len(info.splits[split].shards))]
    stats = file_sha256(info.data_dir / S.STATS)
    return hashlib.sha256(json.dumps([shards, stats]).encode()).hexdigest()[:16]


def rebuild_hint(data_dir: str | Path, cache_dir: str | Path | None = None, vae: Any = None) -> str:
    """What to run to rebuild a damaged cache (the pixel data is fine), for the end of a message."""
    cmd = f"cosmos-policy cache-latents {data_dir}"
    if cache_dir is not None and str(cache_dir).rstrip("/") != join(str(data_dir), "latents"):
        cmd += f" --output {cache_dir}"
    if isinstance(vae, (str, Path)):
        cmd += f" --vae {vae}"
    return f"rebuild the latent cache: {cmd}"


def cache_fingerprint(*, layout: SequenceLayout, image_size: tuple[int, int], vae_hash: str, augment: bool,
                      augment_views: int, seed: int, dtype: str, stats_fingerprint: str,
                      content: str | None = None) -> dict[str, Any]:
    """Everything the stored latents depend on, as a JSON-able dict (compared key by key, in its JSON
    form: tuples become lists). ``content`` is :func:`dataset_content` of the pixel dataset."""
    return json.loads(json.dumps({
        "version": CACHE_VERSION,
        "vae": vae_hash,
        "layout": layout.to_dict(),
        "image_size": [int(x) for x in image_size],
        "augment": bool(augment),
        "augmentation": asdict(REFERENCE_AUGMENT) if augment else None,
        "augment_views": int(augment_views) if augment else 0,
        "seed": int(seed),
        "dtype": dtype,
        "stats_fingerprint": stats_fingerprint,
        "content": content,
    }))


def fingerprint_difference(have: dict, want: dict) -> str | None:
    """Name the first differing fingerprint entry as ``key (cache X, expected Y)``, or None if equal."""
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            a, b = have.get(key), want.get(key)
            if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
                return f"{key} differs"
            return f"{key} (cache {a!r}, expected {b!r})"
    return None


def read_cache_manifest(cache_dir: str | Path) -> dict | None:
    """The cache's ``manifest.json``, or None when the directory holds no cache yet.

    Raises:
        DataError: the manifest exists but is not valid JSON.
    """
    path = location(cache_dir) / S.MANIFEST
    return load_json(path) if path.is_file() else None


def refuse_other_fingerprint(manifest: dict, want: dict, cache_dir: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Raise DataError (one line) when the cache's fingerprint differs from ``want`` outside ``ignore``."""
    have = {k: v for k, v in (manifest.get("fingerprint") or {}).items() if k not in ignore}
    diff = fingerprint_difference(have, {k: v for k, v in want.items() if k not in ignore})
    if diff is not None:
        if have.get("version") == want.get("version") and have.get("content") != want.get("content"):
            raise DataError(f"{join(cache_dir, S.MANIFEST)}: the latent cache is stale: it encodes other shards or "
                            f"statistics than the dataset now holds (converted again?); delete {cache_dir} and "
                            f"rebuild it (cosmos-policy cache-latents, or fit with latent_cache: true)")
        raise DataError(f"{join(cache_dir, S.MANIFEST)}: a latent cache with another fingerprint is there: {diff}; "
                        f"delete {cache_dir} or choose another cache directory")


def check_cache_matches_model(cache_manifest: dict, cache_dir: str | Path, vae_hash: str,
                              layout: SequenceLayout) -> None:
    """Refuse to train or test a model on latents of another VAE or layout.

    Raises:
        DataError: one line naming the cache and what differs.
    """
    fp = cache_manifest.get("fingerprint") or {}
    where = join(cache_dir, S.MANIFEST)
    if fp.get("vae") != vae_hash:
        raise DataError(f"{where}: latents were encoded by VAE {fp.get('vae')!r}, but the model's VAE is "
                        f"{vae_hash!r}; rebuild the cache (cosmos-policy cache-latents) with the model's VAE")
    if fp.get("layout") != layout.to_dict():
        raise DataError(f"{where}: latents were encoded for another sequence layout than the model's "
                        f"({layout.embodiment!r}); rebuild the cache")


class _ViewEncoder:
    """Decode pixel samples, make their views and encode them with the VAE in batches."""

    def __init__(self, embodiment: Embodiment, layout: SequenceLayout, encoder, augment: bool, views: int,
                 seed: int):
        self.cameras, self.size = embodiment.camera_names, tuple(embodiment.image_size)
        self.layout, self.encoder = layout, encoder
        self.augment, self.views, self.seed = augment, views, seed
        self.frames = torch.tensor(kept_frames(layout))

    def pixels(self, sample: dict, key: str, train: bool) -> list[torch.Tensor]:
        """uint8 ``(2N, H, W, 3)`` per view of one raw sample (current cameras then future cameras)."""
        raw = decode_images(sample, self.cameras, self.size)
        first = apply_uint8(raw, center_crop_params(self.size)) if self.augment else raw
        out = [first]
        if train and self.augment:
            digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little")
            for v in range(1, self.views + 1):
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, digest, v])
                out.append(apply_uint8(raw, sample_params(rng, self.size, REFERENCE_AUGMENT)))
        return out

    @torch.no_grad()
    def encode(self, pixel_views: list[torch.Tensor]) -> np.ndarray:
        """Encode ``M`` views (each ``(2N, H, W, 3)`` uint8) in one VAE call -> float32 ``(M, 16, F, h, w)``."""
        stack = torch.stack(pixel_views)                    # (M, 2N, H, W, 3)
        n = len(self.cameras)
        latents = self.encoder(self.layout, stack[:, :n], stack[:, n:])
        return latents[:, :, self.frames].numpy()


def _write_tar(path: Path, records: list[bytes]) -> tuple[int, str]:
    """Write whole sample records into the tar ``path`` atomically; returns its size in bytes and the
    SHA-256 of its bytes (recorded in the cache manifest, ``data/integrity.py``)."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        size = 0
        for rec in records:
            stream.write(rec)
            digest.update(rec)
            size += len(rec)
        size += 2 * BLOCK
        tail = b"\0" * (2 * BLOCK + (-size % RECORD))
        stream.write(tail)
        digest.update(tail)
        stream.flush()
        os.fsync(stream.fileno())
    return path.stat().st_size, digest.hexdigest()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def build_latent_cache(data_dir: str | Path, encoder, output: str | Path | None = None, augment: bool = True,
                       augment_views: int = 4, seed: int = 0, dtype: str = "float16", batch_size: int = 16,
                       embodiment: str | Path | None = None, progress: bool = True,
                       threads: int | None = None) -> Path:
    """Encode every sample of a converted dataset once; see the module docstring for the format.

    Resumable: a latent shard is written under a temporary name and renamed when complete, and a re-run
    skips the shards already listed in the cache manifest (with their recorded size). One writer at a
    time (``locking.py``): other processes (the ranks of a distributed run) wait, then reuse the cache.
    Pixel shards are read with the integrity checks of ``data/integrity.py``; latent shards record
    their sample count, size and SHA-256.

    Args:
        data_dir: converted (pixel) dataset directory, or its URL (its shards are streamed; ``storage.py``).
        encoder: ``encoder(layout, images, future_images) -> (B, 16, T, h, w)`` latents of uint8
            ``(B, N, H, W, 3)`` images, with a ``fingerprint`` attribute naming its VAE (the model's
            ``model/sequence.py`` ``PixelSequenceEncoder(vae)``).
        output: cache directory; default ``<data_dir>/latents``.
        augment: whether the data module augments (view 0 is then the test-time centre crop).
        augment_views: random augmented views per training sample (0 = only the test-time view).
        seed: base seed of the augmentation parameters.
        dtype: ``float16`` (half the disk, |error| ~1e-3 of latents of unit scale) or ``float32`` (exact).
        batch_size: samples per VAE call (each brings its views).
        embodiment: embodiment YAML (default: the manifest's).
        progress: show a progress bar.
        threads: torch threads while encoding (default: :func:`encode_threads`; restored afterwards).

    Returns:
        the cache directory.

    Raises:
        DataError: the dataset is missing or incomplete, or ``output`` holds a cache with another
            fingerprint (one line naming what differs), or another process builds it with other options
            (refused at once).
    """
    remote = is_url(data_dir)
    if not remote and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: dataset directory not found")
    if is_url(output) or (output is None and remote):
        raise DataError(f"{output or join(data_dir, 'latents')}: a latent cache is built into a local folder; "
                        f"set data.latent_dir (cache-latents --output) to one, or build the cache where the "
                        f"dataset was converted and push it with it (cosmos-policy push-dataset)")
    out = Path(output) if output is not None else Path(data_dir) / "latents"

    def refuse_other_options() -> None:
        # Another process holds the lock: refuse at once when it builds this cache with other options (its
        # manifest, written right after it took the lock, says so); wait when it converts or builds the same.
        try:
            info = read_dataset_info(data_dir, embodiment)
            manifest = read_cache_manifest(out)
        except CosmosPolicyError:
            return  # a conversion is running: wait for it
        if manifest is None or manifest.get("status") == "complete":
            return
        want = _fingerprint(info, encoder.fingerprint, augment, augment_views, seed, dtype)
        diff = fingerprint_difference(manifest.get("fingerprint") or {}, want)
        if diff is not None:
            raise DataError(f"{out}: another process is building a latent cache here with other options ({diff}); "
                            f"wait for it or choose another --output")

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads or encode_threads()))
    try:
        # One lock order: the dataset's folder, then the cache's (the same folder lock convert takes). A
        # read-only dataset (its cache elsewhere) cannot be converted into, so it needs no lock.
        data_lock = folder_lock(data_dir, "conversion or latent cache", refuse_other_options) \
            if not remote and os.access(data_dir, os.W_OK) else contextlib.nullcontext()
        with data_lock, folder_lock(out, "latent cache", refuse_other_options):
            return _build_latent_cache(data_dir, encoder, out, augment, augment_views, seed, dtype, batch_size,
                                       embodiment, progress)
    finally:
        torch.set_num_threads(previous)


def encode_threads() -> int:
    """Torch threads of a cache build: the cores this process may use minus the load other processes put
    on them (``os.getloadavg``'s one-minute figure, rounded), at least 1.

    Measured with ``tools/benchmark_cache.py`` on a 2-core machine shared with other jobs (docs/datamodule.md):
    two *spinning* OpenMP threads ran at 0.3-0.6 samples/s, one thread at 2.1-4.6; two sleeping threads
    (``OMP_WAIT_POLICY=PASSIVE``, which the ``cosmos-policy`` command sets unless given) matched one thread
    at moderate load but fell to half of it beside a busy loop when the machine was loaded to 5-6. So
    PASSIVE, and no more threads than free cores. The load average also counts this process's own recent
    work, so the choice is conservative (an otherwise idle 2-core machine may get 1 thread); pass
    ``threads`` to choose.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = int(round(os.getloadavg()[0]))
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def _fingerprint(info, vae_hash: str, augment: bool, augment_views: int, seed: int, dtype: str) -> dict[str, Any]:
    layout = SequenceLayout.from_embodiment(info.embodiment)
    return cache_fingerprint(layout=layout, image_size=info.embodiment.image_size, vae_hash=vae_hash, augment=augment,
                             augment_views=augment_views, seed=seed, dtype=dtype,
                             stats_fingerprint=info.stats.fingerprint, content=dataset_content(info))


def _intact(path: Path, entry: dict) -> bool:
    """Whether a finished latent shard still has its recorded size and SHA-256 (reads it)."""
    from .integrity import file_sha256

    try:
        if path.stat().st_size != entry.get("bytes", path.stat().st_size):
            return False
    except FileNotFoundError:
        return False
    return entry.get("sha256") is None or file_sha256(path) == entry["sha256"]


def _build_latent_cache(data_dir: str | Path, encoder, output: str | Path | None = None, augment: bool = True,
                       augment_views: int = 4, seed: int = 0, dtype: str = "float16", batch_size: int = 16,
                       embodiment: str | Path | None = None, progress: bool = True) -> Path:
    """:func:`build_latent_cache` with the folder lock held."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise DataError(f"cache-latents: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(augment_views, bool) or not isinstance(augment_views, int) or augment_views < 0:
        raise DataError(f"cache-latents: augment_views must be an integer >= 0, got {augment_views!r}")
    info = read_dataset_info(data_dir, embodiment)
    layout = SequenceLayout.from_embodiment(info.embodiment)
    out = Path(output) if output is not None else info.data_dir / "latents"
    want = _fingerprint(info, encoder.fingerprint, augment, augment_views, seed, dtype)
    manifest = read_cache_manifest(out)
    if manifest is not None:
        refuse_other_fingerprint(manifest, want, out)
    # Finished shards (of a complete or an interrupted build) are kept only while intact; a damaged one
    # (truncated, flipped bytes, deleted) is encoded again.
    done = {}
    for e in (manifest or {}).get("shards", []):
        if _intact(out / e["name"], e):
            done[e["name"]] = e
        else:
            print(f"{out / e['name']}: latent shard damaged (size or SHA-256 differs from {out / S.MANIFEST}); "
                  f"encoding it again", file=sys.stderr, flush=True)
    if manifest is not None and manifest.get("status") == "complete" and len(done) == len(manifest["shards"]):
        return out
    jobs = [(split, location(p)) for split in S.SPLITS for p in info.splits[split].shards]
    counts = {Path(p).name: n for split in S.SPLITS for p, n in zip(info.splits[split].shards,
                                                                     info.splits[split].samples)}
    check_shard_sizes([(p, b) for split in S.SPLITS for p, b in zip(info.splits[split].shards,
                                                                    info.splits[split].bytes)],
                      info.data_dir / S.MANIFEST)
    digests = {Path(p).name: d for split in S.SPLITS for p, d in zip(info.splits[split].shards,
                                                                     info.splits[split].sha256)}
    total = sum(n or 0 for split in S.SPLITS for n in info.splits[split].samples)
    views = _ViewEncoder(info.embodiment, layout, encoder, augment, augment_views, seed)
    np_dtype = DTYPES[dtype]

    def save(status: str) -> None:
        write_json_atomic(out / S.MANIFEST, {
            "status": status, "fingerprint": want, "frames": kept_frames(layout),
            "views": {"train": 1 + want["augment_views"], "validation": 1},
            "source": str(info.data_dir), "shards": [done[p.name] for _, p in jobs if p.name in done]})

    out.mkdir(parents=True, exist_ok=True)
    save("incomplete")
    import webdataset as wds

    bar = tqdm(total=total or None, desc=f"cache-latents {info.data_dir.name}", unit="sample", disable=not progress,
               initial=sum(e["samples"] for e in done.values()))
    for split, shard in jobs:
        if shard.name in done:
            continue
        records, pending = [], []

        def flush() -> None:
            pixel_views = [v for _, _, vs in pending for v in vs]
            latents = views.encode(pixel_views) if pixel_views else np.zeros(0)
            i = 0
            for key, sample, vs in pending:
                members = {m: sample[m] for m in PASSTHROUGH}
                members[LATENTS] = _npy(latents[i:i + len(vs)].astype(np_dtype))
                i += len(vs)
                records.append(sample_record(key, members))
            bar.update(len(pending))
            pending.clear()

        reader = CheckedTarSamples(counts, PASSTHROUGH, digests, info.data_dir / S.MANIFEST)
        for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), reader):
            key = sample["__key__"]
            missing = [m for m in PASSTHROUGH if m not in sample]
            if missing:
                raise DataError(f"{shard}: sample {key} lacks member(s) {', '.join(missing)}")
            pending.append((key, sample, views.pixels(sample, key, split == "train")))
            if len(pending) >= batch_size:
                flush()
        flush()
        nbytes, sha256 = _write_tar(out / shard.name, records)
        done[shard.name] = {"name": shard.name, "split": split, "samples": len(records), "bytes": nbytes,
                            "sha256": sha256}
        save("incomplete")
    bar.close()
    save("complete")
    return out


__all__ = ["build_latent_cache", "cache_fingerprint", "check_cache_matches_model", "dataset_content", "encode_threads",
           "kept_frames", "read_cache_manifest", "rebuild_hint", "fingerprint_difference", "LATENTS"]
