"""Checks shared by the converter tests: what the shards of a conversion must contain, recomputed
independently from the factory arrays (numpy and PIL, not the converter's code)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cosmos_policy_lightning.data import schema as S

from .factories import CAMERAS, EpisodeSpec, decode_sample, episode_arrays, proprio_of, read_split


def expected_value(length: int, future: int, score: float, gamma: float) -> float:
    """docs/method.md §4 with a fractional score scaling the curve: ``2 R gamma^(T-1-t') - 1``."""
    return 2.0 * score * gamma ** (length - 1 - future) - 1.0


def check_conversion(output: Path, episodes: dict[str, EpisodeSpec], *, chunk_size: int, gamma: float,
                     image_size: tuple[int, int] = (32, 32), scores: dict[str, float] | None = None,
                     successes: dict[str, bool] | None = None, instructions: dict[str, str] | None = None,
                     image_tolerance: float = 6.0) -> dict[str, list[dict]]:
    """Assert that ``output`` holds exactly one sample per step of every episode, with the right
    images, proprio, padded action chunk, clamped future index and value. Returns decoded samples
    per split.

    Args:
        episodes: episode id -> the spec its arrays were generated from.
        scores / successes / instructions: per episode expectations (default: from the spec).
        image_tolerance: max mean absolute pixel difference to the PIL-resized source frame.
    """
    manifest = json.loads((Path(output) / S.MANIFEST).read_text())
    assert manifest["status"] == "complete"
    by_split = {split: [decode_sample(s) for s in read_split(output, split)] for split in S.SPLITS}
    keys = Counter(s["__key__"] for split in by_split.values() for s in split)
    assert all(n == 1 for n in keys.values()), "duplicate sample keys"
    expected_keys = {S.sample_key(eid, t) for eid, spec in episodes.items() for t in range(spec.length)}
    assert set(keys) == expected_keys
    h, w = image_size
    for split, samples in by_split.items():
        for s in samples:
            meta = s[S.META]
            eid, t = meta["episode"], meta["step"]
            assert manifest["episodes"][eid]["split"] == split
            spec = episodes[eid]
            arrays = episode_arrays(spec)
            T = spec.length
            tf = min(t + chunk_size, T - 1)
            score = (scores or {}).get(eid, spec.score if spec.score is not None else float(spec.success))
            success = (successes or {}).get(eid, spec.success)
            assert s["__key__"] == S.sample_key(eid, t)
            assert meta["future_step"] == tf and meta["length"] == T
            assert meta["success"] == success and abs(meta["score"] - score) < 1e-6
            assert abs(meta["value"] - expected_value(T, tf, score, gamma)) < 1e-5
            assert -1.0 <= meta["value"] <= 1.0
            if instructions is not None:
                assert meta["instruction"] == instructions[eid]
            # action chunk actions[t:t+K], padded by repeating the last action
            chunk = s[S.ACTIONS]
            assert chunk.shape == (chunk_size, arrays["actions"].shape[1]) and chunk.dtype == np.float32
            for j in range(chunk_size):
                np.testing.assert_array_equal(chunk[j], arrays["actions"][min(t + j, T - 1)])
            prop = proprio_of(arrays)
            np.testing.assert_array_equal(s[S.PROPRIO], prop[t])
            np.testing.assert_array_equal(s[S.FUTURE_PROPRIO], prop[tf])
            for cam in CAMERAS:
                for name, step in ((S.image_member(cam), t), (S.image_member(cam, future=True), tf)):
                    img = s[name]
                    assert img.shape == (h, w, 3) and img.dtype == np.uint8
                    ref = np.asarray(Image.fromarray(arrays[cam][step]).resize((w, h), Image.Resampling.BILINEAR))
                    diff = np.abs(img.astype(np.int16) - ref.astype(np.int16)).mean()
                    assert diff < image_tolerance, f"{eid} step {step} {name}: mean abs diff {diff:.1f}"
    return by_split
