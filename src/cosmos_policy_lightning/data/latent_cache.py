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
size, the augmentation settings and the pixel dataset's statistics fingerprint; the data module
refuses a cache whose fingerprint differs from what it is asked for, and the preparation stage
(``training/prepare.py``) refuses one made with another VAE than the model's
(:func:`check_cache_matches_model`).

This module only reads and writes caches: the encoder comes in as an argument (the model's
``model/sequence.py`` ``PixelSequenceEncoder``), so the data package never imports the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, write_json_atomic
from ..embodiment import Embodiment
from ..errors import DataError
from ..layout import SequenceLayout
from ..locking import folder_lock
from . import schema as S
from .augment import REFERENCE_AUGMENT, apply_uint8, center_crop_params, sample_params
from .dataset_info import load_json, read_dataset_info
from .integrity import CheckedTarSamples, check_shard_sizes
from .shards import BLOCK, RECORD, sample_record
from .stages import decode_images

#: Member of a latent sample holding the stored views.
LATENTS = "latents.npy"
#: Members copied unchanged from the pixel sample.
PASSTHROUGH = (S.PROPRIO, S.FUTURE_PROPRIO, S.ACTIONS, S.META)
CACHE_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


def kept_frames(layout: SequenceLayout) -> list[int]:
    """Latent indices whose content comes from the VAE (not overwritten by vector injection): the blank
    frame and every camera slot, current and future."""
    vector_slots = {layout.index(n) for n in ("proprio", "future_proprio", "action", "value")}
    return [i for i in range(layout.num_latent_frames) if i not in vector_slots]


def cache_fingerprint(layout: SequenceLayout, image_size: tuple[int, int], vae_hash: str, augment: bool,
                      augment_views: int, seed: int, dtype: str, stats_fingerprint: str) -> dict[str, Any]:
    """Everything the stored latents depend on, as a JSON-able dict (compared key by key, in its JSON
    form: tuples become lists)."""
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
    path = Path(cache_dir) / S.MANIFEST
    return load_json(path) if path.is_file() else None


def refuse_other_fingerprint(manifest: dict, want: dict, cache_dir: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Raise DataError (one line) when the cache's fingerprint differs from ``want`` outside ``ignore``."""
    have = {k: v for k, v in (manifest.get("fingerprint") or {}).items() if k not in ignore}
    diff = fingerprint_difference(have, {k: v for k, v in want.items() if k not in ignore})
    if diff is not None:
        raise DataError(f"{Path(cache_dir) / S.MANIFEST}: a latent cache with another fingerprint is there: {diff}; "
                        f"delete {cache_dir} or choose another cache directory")


def check_cache_matches_model(cache_manifest: dict, cache_dir: str | Path, vae_hash: str,
                              layout: SequenceLayout) -> None:
    """Refuse to train or test a model on latents of another VAE or layout.

    Raises:
        DataError: one line naming the cache and what differs.
    """
    fp = cache_manifest.get("fingerprint") or {}
    where = Path(cache_dir) / S.MANIFEST
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
        data_dir: converted (pixel) dataset directory.
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
        threads: torch threads while encoding (default: all cores; restored afterwards).

    Returns:
        the cache directory.

    Raises:
        DataError: the dataset is missing or incomplete, or ``output`` holds a cache with another
            fingerprint (one line naming what differs).
    """
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: dataset directory not found")
    out = Path(output) if output is not None else Path(data_dir) / "latents"
    # Nothing else runs while the cache is built (training waits for it), so the VAE gets every core:
    # 1.5x faster on 2 cores than the one thread a training process is usually given.
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    try:
        with folder_lock(out, "latent cache"):
            return _build_latent_cache(data_dir, encoder, out, augment, augment_views, seed, dtype, batch_size,
                                       embodiment, progress)
    finally:
        torch.set_num_threads(previous)


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
    want = cache_fingerprint(layout, info.embodiment.image_size, encoder.fingerprint, augment,
                             augment_views, seed, dtype, info.stats.fingerprint)
    manifest = read_cache_manifest(out)
    if manifest is not None:
        refuse_other_fingerprint(manifest, want, out)
        if manifest.get("status") == "complete":
            return out
    done = {e["name"]: e for e in (manifest or {}).get("shards", [])}
    jobs = [(split, Path(p)) for split in S.SPLITS for p in info.splits[split].shards]
    counts = {Path(p).name: n for split in S.SPLITS for p, n in zip(info.splits[split].shards,
                                                                     info.splits[split].samples)}
    check_shard_sizes([(p, b) for split in S.SPLITS for p, b in zip(info.splits[split].shards,
                                                                    info.splits[split].bytes)],
                      info.data_dir / S.MANIFEST)
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
        if shard.name in done and (out / shard.name).is_file() and \
                (out / shard.name).stat().st_size == done[shard.name].get("bytes", (out / shard.name).stat().st_size):
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

        for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), CheckedTarSamples(counts, PASSTHROUGH)):
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


__all__ = ["build_latent_cache", "cache_fingerprint", "check_cache_matches_model", "kept_frames",
           "read_cache_manifest", "fingerprint_difference", "LATENTS"]
