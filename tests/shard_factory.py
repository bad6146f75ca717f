"""Writes small converted datasets exactly as ``data/schema.py`` specifies: real webdataset tar shards,
``stats.json`` (normalization.DatasetStats), ``manifest.json`` and a real ``text_embeddings/`` cache.

Used by the data-module tests, independently of the converter, so the reader is tested against the
written contract rather than against the writer's interpretation of it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.embodiment import Embodiment
from cosmos_policy_lightning.text import TextEmbeddingCache
from cosmos_policy_lightning.normalization import DatasetStats, Stats, fingerprint, write_json_atomic

TOY_EMBODIMENT = {
    "name": "toy",
    "control_hz": 10,
    "image_size": [32, 32],
    "cameras": [{"name": "wrist", "role": "wrist"}, {"name": "front", "role": "primary"}],
    "proprio": {"dim": 3},
    "action": {"dim": 2, "chunk_size": 4},
    "value": {"gamma": 0.9},
}


def toy_embodiment(**overrides) -> Embodiment:
    """The 2-camera, 32x32 test robot (proprio 3, action 2, K = 4), with top-level fields overridden."""
    return Embodiment.from_dict({**TOY_EMBODIMENT, **overrides})


class HashTextEncoder:
    """A deterministic text encoder (the ``TextEncoder`` protocol of text.py) without model weights:
    one token per word plus an end token, each an 8-d vector derived from a hash of the word."""

    identity = "test:hash-words"
    dim = 8

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            rows = []
            for word in text.split() + ["</s>"]:
                seed = int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "little")
                rows.append(np.random.default_rng(seed).standard_normal(self.dim))
            out.append(np.asarray(rows, dtype=np.float32))
        return out


@dataclass
class EpisodeSpec:
    """One synthetic episode: ``length`` steps, outcome, instruction and split."""

    episode_id: str
    length: int
    success: bool
    split: str = "train"
    score: float | None = None
    instruction: str = "push the block"


@dataclass
class ToyDataset:
    """What :func:`write_dataset` wrote: the directory, the embodiment, and every sample's raw arrays by key."""

    root: Path
    embodiment: Embodiment
    records: dict[str, dict]        # sample key -> {"proprio", "future_proprio", "actions", "meta", "split", "images"}
    shard_names: dict[str, list[str]]

    def keys(self, split: str) -> set[str]:
        return {k for k, r in self.records.items() if r["split"] == split}


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _image(rng: np.random.Generator, size: tuple[int, int], episode: int, step: int, cam: int) -> np.ndarray:
    # A smooth colour ramp (JPEG-friendly) whose colour depends on episode, step and camera.
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.array([40 + 30 * (episode % 6), 60 + 10 * (step % 12), 80 + 60 * cam], dtype=np.float64)
    img = base[None, None, :] + 2.0 * xx[..., None] + 1.0 * yy[..., None] + rng.normal(0, 2, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def episode_values(length: int, success: bool, score: float, gamma: float) -> np.ndarray:
    """V at every step in [-1, 1] (method §4): ``2 * score * gamma^(T-1-t) - 1`` for a success, -1 for a failure."""
    t = np.arange(length)
    if not success:
        return -np.ones(length)
    return 2.0 * score * gamma ** (length - 1 - t) - 1.0


def write_dataset(root: str | Path, episodes: list[EpisodeSpec], embodiment: Embodiment | None = None,
                  samples_per_shard: int = 40, seed: int = 0, text_encoder=None) -> ToyDataset:
    """Write a converted dataset of ``episodes`` into ``root``.

    Every step t of an episode is one sample (docs/method.md §1): images at t and t' = min(t + K, T - 1), proprio
    at both, ``actions[t:t+K]`` padded with the last action, V(s'). Samples go into shards of
    ``samples_per_shard`` per split, episodes in order. Statistics are computed over the training
    split (successful episodes for normalisation) with the matching fingerprint in the manifest.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    emb = embodiment or toy_embodiment()
    rng = np.random.default_rng(seed)
    k, a_dim, p_dim = emb.action.chunk_size, emb.action.dim, emb.proprio.dim
    records: dict[str, dict] = {}
    per_split: dict[str, list[tuple[str, dict]]] = {s: [] for s in S.SPLITS}
    stats_rows = {"success": {"action": [], "proprio": []}, "all": {"action": [], "proprio": []}}
    counts = {s: {"episodes": 0, "successes": 0, "failures": 0, "samples": 0} for s in S.SPLITS}

    for e_index, ep in enumerate(episodes):
        T = ep.length
        score = ep.score if ep.score is not None else (1.0 if ep.success else 0.0)
        proprio = rng.uniform(-2, 3, (T, p_dim)).astype(np.float32)
        actions = rng.uniform(-1, 0.5, (T, a_dim)).astype(np.float32)
        values = episode_values(T, ep.success, score, emb.value.gamma)
        frames = {(t, c): _image(rng, emb.image_size, e_index, t, c)
                  for t in range(T) for c in range(emb.num_cameras)}
        if ep.split == "train":
            for group in (["all", "success"] if ep.success else ["all"]):
                stats_rows[group]["action"].append(actions)
                stats_rows[group]["proprio"].append(proprio)
        counts[ep.split]["episodes"] += 1
        counts[ep.split]["successes" if ep.success else "failures"] += 1
        for t in range(T):
            tf = min(t + k, T - 1)
            chunk = np.concatenate([actions[t:t + k], np.repeat(actions[-1:], max(0, t + k - T), axis=0)])
            meta = {"episode": ep.episode_id, "step": t, "future_step": tf, "length": T, "success": ep.success,
                    "score": score, "value": float(values[tf]), "instruction": ep.instruction}
            key = S.sample_key(ep.episode_id, t)
            sample = {"__key__": key, S.META: json.dumps(meta).encode()}
            for c, cam in enumerate(emb.camera_names):
                sample[S.image_member(cam)] = _jpeg(frames[(t, c)])
                sample[S.image_member(cam, future=True)] = _jpeg(frames[(tf, c)])
            for member, arr in ((S.PROPRIO, proprio[t]), (S.FUTURE_PROPRIO, proprio[tf]), (S.ACTIONS, chunk)):
                buf = io.BytesIO()
                np.save(buf, np.asarray(arr, dtype=np.float32))
                sample[member] = buf.getvalue()
            per_split[ep.split].append((key, sample))
            records[key] = {"proprio": proprio[t], "future_proprio": proprio[tf], "actions": chunk, "meta": meta,
                            "split": ep.split, "images": [frames[(t, c)] for c in range(emb.num_cameras)]}
            counts[ep.split]["samples"] += 1

    # The converter's manifest layout: one flat shard list whose entries name their split.
    shards: list[dict] = []
    for split, samples in per_split.items():
        for i in range(0, len(samples), samples_per_shard):
            name = f"{split}-{i // samples_per_shard:06d}.tar"
            chunk = samples[i:i + samples_per_shard]
            with wds.TarWriter(str(root / name)) as sink:
                for _, s in chunk:
                    sink.write(s)
            shards.append({"name": name, "split": split, "samples": len(chunk)})
        counts[split]["shards"] = sum(sh["split"] == split for sh in shards)

    def stats_of(group: str) -> dict[str, Stats]:
        rows = stats_rows[group]
        if not rows["action"]:
            return {}
        return {m: Stats.compute(np.concatenate(rows[m])) for m in ("action", "proprio")}

    train_ids = [ep.episode_id for ep in episodes if ep.split == "train"]
    fp = fingerprint(a_dim, p_dim, k, train_ids)
    DatasetStats(fp, stats_of("success"), stats_of("all")).save(root / S.STATS)
    encoder = text_encoder or HashTextEncoder()
    TextEmbeddingCache(root / S.TEXT_DIR).add(encoder, sorted({ep.instruction for ep in episodes}))
    write_json_atomic(root / S.MANIFEST, {
        "status": "complete",
        "stats_fingerprint": fp,
        "embodiment": emb.to_dict(),
        "shards": shards,
        "counts": counts,
        "text_encoder": encoder.identity,
    })
    return ToyDataset(root, emb, records, {sp: [d["name"] for d in shards if d["split"] == sp] for sp in S.SPLITS})


def standard_episodes(n_train_success: int = 6, n_train_failure: int = 2, n_val_success: int = 3,
                      n_val_failure: int = 2, length: int = 10) -> list[EpisodeSpec]:
    """A mix of successful and failed episodes in both splits, with two different instructions."""
    out = []
    for split, ns, nf in (("train", n_train_success, n_train_failure), ("validation", n_val_success, n_val_failure)):
        for i in range(ns + nf):
            success = i < ns
            out.append(EpisodeSpec(f"{split}-ep{i:03d}", length + (i % 3), success, split,
                                   instruction="push the block" if i % 2 else "open the top drawer slowly"))
    return out
