"""webdataset pipeline stages between the shards and a collated batch (docs/method.md §2, §4).

The stages run inside data-loader workers, in this order::

    raw samples -> ObjectiveMixer (train) | RoundRobinObjectives (validation / test)
                -> SampleDecoder (JPEG -> uint8, augmentation, normalisation, text lookup)
                -> webdataset.batched(collate)

Objectives are assigned *before* decoding, so a sample the mix does not need (surplus successes
waiting for a failure, say) is dropped without paying for its JPEG decoding.

Every stage is a picklable object whose random state is derived from ``(seed, rank, worker,
epoch)``: the workers of all ranks draw independent streams, and a run with the same seed and
worker count is reproducible.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.filters import PipelineStage, shuffle

from ..embodiment import Embodiment
from ..errors import DataError
from ..layout import OBJECTIVE_TABLE, OBJECTIVES
from ..normalization import Normalizer
from ..text import InstructionEmbeddings, pad_text_batch
from . import schema as S
from .augment import REFERENCE_AUGMENT, apply_uint8, center_crop_params, sample_params

#: Per objective index: drawn from successful episodes only (``layout.Objective.successes_only``).
SUCCESSES_ONLY = tuple(o.successes_only for o in OBJECTIVE_TABLE)

#: Batch keys and their per-sample dtypes (the batch contract of :mod:`.datamodule`).
BATCH_KEYS = ("images", "future_images", "proprio", "future_proprio", "actions", "value", "objective",
              "success", "score", "text", "text_mask", "instruction", "episode", "step")


def worker_position() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the calling data-loader worker; ``(0, 1)`` in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def stream_rng(seed: int, rank: int, epoch: int, stream: int, start: int = 0) -> np.random.Generator:
    """Independent numpy generator for one (seed, rank, worker, epoch, stream) tuple; a resumed training
    stream (``start`` > 0 batches delivered before, :class:`StreamPosition`) gets its own generators."""
    worker, _ = worker_position()
    key = [int(seed) & 0xFFFFFFFF, rank, worker, epoch, stream]
    return np.random.default_rng(key + [int(start)] if start else key)


class StreamPosition:
    """Where a training stream starts: the number of batches the loader had delivered in earlier runs
    of the same training (0 for a fresh run; restored from the checkpoint on resume).

    The stages of one pipeline share this object and mix ``start`` into their random streams, so a
    resumed run draws new shards, shuffles, objectives and augmentations instead of replaying the
    batches of step 0, 1, 2... again -- and, being a fresh draw from the same sampler, keeps the data
    distribution. A fresh run (``start == 0``) draws exactly the streams it always did.
    """

    def __init__(self, start: int = 0):
        self.start = int(start)

    def __repr__(self) -> str:
        return f"StreamPosition(start={self.start})"


def _start(position: "StreamPosition | None") -> int:
    return position.start if position is not None else 0


def _where(sample: dict) -> str:
    return f"{Path(str(sample.get('__url__', '<stream>'))).name}: sample {sample.get('__key__', '?')}"


def read_meta(sample: dict) -> dict:
    """Parse ``meta.json`` of a raw sample (cached under ``__meta__``).

    Raises:
        DataError: missing or malformed meta.json (names the shard and the sample key).
    """
    if "__meta__" in sample:
        return sample["__meta__"]
    raw = sample.get(S.META)
    if raw is None:
        raise DataError(f"{_where(sample)}: missing member {S.META}")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{_where(sample)}: {S.META} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{_where(sample)}: {S.META} must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in S.META_FIELDS if k not in meta]
    if missing:
        raise DataError(f"{_where(sample)}: {S.META} lacks field(s) {', '.join(missing)}")
    sample["__meta__"] = meta
    return meta


# ---------------------------------------------------------------------------------------- splitting
class SplitByRank(PipelineStage):
    """``webdataset.split_by_node`` with the rank captured in the main process.

    webdataset's splitter asks ``torch.distributed`` from inside the worker, which is not initialised
    in a spawned worker; the trainer's rank is known when the loader is built, so we carry it.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = int(rank), int(world_size)

    def run(self, src: Iterable) -> Iterator:
        return islice(src, self.rank, None, self.world_size) if self.world_size > 1 else iter(src)


class TakeShare(PipelineStage):
    """End a (resampled, infinite) stream after this worker's share of ``total`` items.

    The ``total`` batches of one rank's epoch are divided over the workers as evenly as possible
    (worker ``i`` takes ``total // n + (i < total % n)``), so one epoch yields exactly ``total``
    batches per rank whatever the worker count -- every rank takes the same number of steps.
    """

    def __init__(self, total: int):
        self.total = int(total)

    def run(self, src: Iterable) -> Iterator:
        worker, workers = worker_position()
        share = self.total // workers + (1 if worker < self.total % workers else 0)
        return islice(src, share)


class Shuffle(PipelineStage):
    """``webdataset.shuffle`` with a buffer of ``bufsize`` samples, seeded per (seed, rank, worker, epoch).

    The buffer is filled completely before the first sample leaves it: a shard holds few episodes,
    so a half-filled buffer would give batches of one or two episodes at the start of each epoch.
    """

    def __init__(self, bufsize: int, seed: int = 0, rank: int = 0, position: StreamPosition | None = None):
        self.bufsize, self.seed, self.rank = max(1, int(bufsize)), seed, rank
        self.position = position
        self.epoch = -1

    def run(self, src: Iterable) -> Iterator:
        self.epoch += 1
        rng = random.Random(int(stream_rng(self.seed, self.rank, self.epoch, 0, _start(self.position))
                                .integers(2**63)))
        return shuffle(self.bufsize, self.bufsize, rng=rng)(iter(src))  # webdataset's shuffle calls next()


# ---------------------------------------------------------------------------------------- objectives
class ObjectiveMixer(PipelineStage):
    """Assign an objective to every training sample by the configured mix (docs/method.md §2).

    Per output sample: draw the objective from ``weights``; a policy sample must come from a
    successful episode; any other objective takes a success with probability ``success_fraction``
    and a failure otherwise. Incoming (shuffled) samples wait in one pool per outcome until a draw
    asks for them; a pool holds at most ``pool_size`` samples (older surplus is dropped, i.e.
    rejection sampling), so the output follows the mix whatever the data's success rate.

    When the data has no failures (``has_failure=False``, from the manifest), non-policy samples are
    all successes (and vice versa). When that is unknown (``None``), a class that does not show up
    within ``stall_limit`` consecutive samples is taken as absent, with one warning.

    Args:
        weights: probability per objective index (length ``len(OBJECTIVES)``, sums to 1).
        success_fraction: P(success) for non-policy samples, in [0, 1].
        has_success, has_failure: whether the split holds successful / failed samples (None = unknown).
        seed, rank: for the worker's random stream; position: the shared :class:`StreamPosition` (resume).
        pool_size: capacity of each outcome pool (samples, undecoded).
        stall_limit: consecutive unmatched samples before a class is declared absent.

    Raises (while iterating):
        DataError: the mix needs policy samples and the data has no successful episode.
    """

    def __init__(self, weights: list[float], success_fraction: float, has_success: bool | None,
                 has_failure: bool | None, seed: int = 0, rank: int = 0, pool_size: int = 1000,
                 stall_limit: int = 4000, position: StreamPosition | None = None):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.success_fraction = float(success_fraction)
        self.has_success, self.has_failure = has_success, has_failure
        self.seed, self.rank = seed, rank
        self.pool_size, self.stall_limit = max(1, int(pool_size)), max(1, int(stall_limit))
        self.position = position
        self.epoch = -1

    def _check_policy(self, available: dict[bool, bool]) -> None:
        needy = [OBJECTIVES[i] for i, w in enumerate(self.weights) if w > 0 and SUCCESSES_ONLY[i]]
        if needy and not available[True]:
            raise DataError(f"objective mix: the {'/'.join(needy)} objective needs successful episodes, but the "
                            f"training shards hold none (set objective_mix.{needy[0]} to 0 or add successful "
                            f"demonstrations)")

    def _draw(self, rng: np.random.Generator, available: dict[bool, bool]) -> tuple[int, bool]:
        obj = int(rng.choice(len(self.weights), p=self.weights))
        if SUCCESSES_ONLY[obj]:
            return obj, True
        want = bool(rng.random() < self.success_fraction)
        if not available[want]:
            want = not want
        return obj, want

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = stream_rng(self.seed, self.rank, self.epoch, 1, _start(self.position))
        available = {True: self.has_success is not False, False: self.has_failure is not False}
        if not (available[True] or available[False]):
            raise DataError("objective mix: the training shards hold no samples")
        self._check_policy(available)
        pools: dict[bool, deque] = {True: deque(), False: deque()}
        want: tuple[int, bool] | None = None
        misses = 0
        for sample in src:
            pools[bool(read_meta(sample)["success"])].append(sample)
            while True:
                if want is None:
                    want = self._draw(rng, available)
                obj, outcome = want
                if not pools[outcome]:
                    break
                out = pools[outcome].popleft()
                out["__objective__"] = obj
                yield out
                want, misses = None, 0
            # Here a draw waits for an outcome its pool lacks: count the miss, cap the pools.
            misses += 1
            for pool in pools.values():
                while len(pool) > self.pool_size:
                    pool.popleft()
            if misses >= self.stall_limit:
                outcome = want[1]
                kind = "successful" if outcome else "failed"
                available[outcome] = False
                self._check_policy(available)
                if not available[not outcome]:
                    raise DataError("objective mix: the training shards hold neither usable successes nor failures")
                warnings.warn(f"objective mix: no {kind} sample in {misses} consecutive training samples; "
                              f"treating the data as having none (write success/failure counts into the "
                              f"manifest to avoid this guess)", stacklevel=2)
                want, misses = None, 0


class RoundRobinObjectives(PipelineStage):
    """Deterministic objectives for validation / test: round-robin over ``objectives``.

    The position in the cycle is ``shard index + position of the sample in its shard``, which does
    not depend on how shards are split over ranks and workers, so every run labels every held-out
    sample the same way. A failed episode's sample never gets a successes-only objective (the policy): it
    takes the next objective of the cycle instead, and is skipped when no other objective is in the mix.

    Args:
        objectives: indices into ``OBJECTIVES`` with nonzero weight, in ``OBJECTIVES`` order.
        shard_names: the split's shard file names, in order.
    """

    def __init__(self, objectives: list[int], shard_names: list[str]):
        self.objectives = list(objectives)
        self.shard_index = {name: i for i, name in enumerate(shard_names)}

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        n = len(self.objectives)
        current, position = None, 0
        for sample in src:
            name = Path(str(sample.get("__url__", ""))).name
            if name != current:
                current, position = name, 0
            slot = self.shard_index.get(name, 0) + position
            position += 1
            success = bool(read_meta(sample)["success"])
            for k in range(n):
                obj = self.objectives[(slot + k) % n]
                if success or not SUCCESSES_ONLY[obj]:
                    sample["__objective__"] = obj
                    yield sample
                    break


# ---------------------------------------------------------------------------------------- decoding
def _decode_jpeg(data: bytes, where: str, member: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError(f"{where}: {member} is not a readable JPEG ({type(err).__name__}: {err})") from None
    if arr.shape[:2] != tuple(size):
        raise DataError(f"{where}: {member} is {arr.shape[0]}x{arr.shape[1]}, expected the embodiment's "
                        f"image_size {size[0]}x{size[1]}")
    return arr


def decode_images(sample: dict, cameras: list[str], size: tuple[int, int]) -> torch.Tensor:
    """The camera JPEGs of one raw sample as uint8 ``(2N, H, W, 3)``: the N cameras at step t, then at
    step t', in ``cameras`` order.

    Raises:
        DataError: a camera member is missing, unreadable or not ``size`` (names shard, key, member).
    """
    where = _where(sample)
    images = []
    for future in (False, True):
        for cam in cameras:
            member = S.image_member(cam, future)
            data = sample.get(member)
            if data is None:
                raise DataError(f"{where}: missing member {member} (cameras: {', '.join(cameras)})")
            images.append(_decode_jpeg(data, where, member, size))
    return torch.from_numpy(np.stack(images))


def _read_npy(sample: dict, member: str, where: str, hint: str = "") -> np.ndarray:
    raw = sample.get(member)
    if raw is None:
        raise DataError(f"{where}: missing member {member}{hint}")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{where}: {member} is not a .npy array ({err})") from None


def _load_npy(sample: dict, member: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    arr = _read_npy(sample, member, where)
    if arr.shape != shape:
        raise DataError(f"{where}: {member} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{where}: {member} has dtype {arr.dtype}, expected real numbers")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: {member} contains NaN or inf")
    return arr.astype(np.float32, copy=False)


class SampleDecoder(PipelineStage):
    """Raw shard sample -> tensors of the batch contract (one sample, no batch axis).

    Images: JPEG -> uint8, stacked ``(2N, H, W, 3)`` (current cameras then future cameras, in the
    embodiment's camera order), transformed with one parameter set (``mode``: ``"augment"`` =
    random docs/method.md §4 augmentation, ``"center"`` = test-time centre crop, ``"none"``), then split.
    Proprio and actions are normalised to [-1, 1] by the normalisers; the value is V(s') from meta.

    Args:
        embodiment: the robot (camera order, image size, dims, chunk size).
        normalizers: ``{"action": Normalizer, "proprio": Normalizer}``.
        text_dir: the dataset's ``text_embeddings`` directory.
        max_text_tokens: text embeddings are truncated to this many tokens.
        mode: ``"augment"``, ``"center"`` or ``"none"``.
        seed, rank: for the augmentation's random stream; position: the shared :class:`StreamPosition`.

    Raises (while iterating):
        DataError: a member is missing, malformed or has the wrong shape (names shard, key, member).
    """

    def __init__(self, embodiment: Embodiment, normalizers: dict[str, Normalizer], text_dir: str,
                 max_text_tokens: int, mode: str, seed: int = 0, rank: int = 0,
                 position: StreamPosition | None = None):
        if mode not in ("augment", "center", "none"):
            raise ValueError(f"SampleDecoder: mode must be augment, center or none, got {mode!r}")
        self.cameras = embodiment.camera_names
        self.image_size = tuple(embodiment.image_size)
        self.proprio_shape = (embodiment.proprio.dim,)
        self.action_shape = (embodiment.action.chunk_size, embodiment.action.dim)
        self.normalizers = normalizers
        self.text = InstructionEmbeddings(max_text_tokens, directory=text_dir)
        self.mode, self.seed, self.rank = mode, seed, rank
        self.position = position
        self.epoch = -1

    def decode(self, sample: dict, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Decode one raw sample (see the class docstring); ``rng`` is needed in ``augment`` mode."""
        pixels = decode_images(sample, self.cameras, self.image_size)
        if self.mode == "augment":
            pixels = apply_uint8(pixels, sample_params(rng, self.image_size, REFERENCE_AUGMENT))
        elif self.mode == "center":
            pixels = apply_uint8(pixels, center_crop_params(self.image_size))
        n = len(self.cameras)
        return {"images": pixels[:n], "future_images": pixels[n:], **self.decode_vectors(sample)}

    def decode_vectors(self, sample: dict) -> dict[str, Any]:
        """Everything of the batch contract but the images: normalised proprio / actions, V(s'), labels,
        the instruction's text embedding."""
        where = _where(sample)
        meta = read_meta(sample)
        proprio = _load_npy(sample, S.PROPRIO, self.proprio_shape, where)
        future_proprio = _load_npy(sample, S.FUTURE_PROPRIO, self.proprio_shape, where)
        actions = _load_npy(sample, S.ACTIONS, self.action_shape, where)
        norm_p, norm_a = self.normalizers["proprio"], self.normalizers["action"]
        value = float(meta["value"])
        if not -1.0 - 1e-6 <= value <= 1.0 + 1e-6:
            raise DataError(f"{where}: {S.META} value {value} outside [-1, 1]")
        return {
            "proprio": torch.from_numpy(np.asarray(norm_p.normalize(proprio), dtype=np.float32)),
            "future_proprio": torch.from_numpy(np.asarray(norm_p.normalize(future_proprio), dtype=np.float32)),
            "actions": torch.from_numpy(np.asarray(norm_a.normalize(actions), dtype=np.float32)),
            "value": value,
            "objective": int(sample["__objective__"]),
            "success": bool(meta["success"]),
            "score": float(meta["score"]),
            "text": self.text.get(str(meta["instruction"]), where),
            "instruction": str(meta["instruction"]),
            "episode": str(meta["episode"]),
            "step": int(meta["step"]),
        }

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = stream_rng(self.seed, self.rank, self.epoch, 2, _start(self.position)) if self.mode == "augment" \
            else None
        for sample in src:
            yield self.decode(sample, rng)


class LatentSampleDecoder(SampleDecoder):
    """Raw *latent-cache* sample (``data/latent_cache.py``) -> the batch contract with ``latents``
    instead of ``images`` / ``future_images``.

    ``latents`` is float32 ``(16, T, h, w)``: the stored VAE frames at their latent indices and zeros in
    the proprio / action / value frames (the model injects the vectors there). In ``augment`` mode one of
    the sample's stored views is drawn uniformly per sample and epoch; otherwise view 0 (the test-time view).

    Args:
        layout_frames: latent indices of the stored frames (the cache manifest's ``frames``).
        num_latent_frames: T of the layout.
        other arguments: as :class:`SampleDecoder`.

    Raises (while iterating):
        DataError: ``latents.npy`` missing, malformed, of the wrong frame count or not finite.
    """

    def __init__(self, embodiment: Embodiment, normalizers: dict[str, Normalizer], text_dir: str,
                 max_text_tokens: int, mode: str, layout_frames: list[int], num_latent_frames: int,
                 seed: int = 0, rank: int = 0, position: StreamPosition | None = None):
        super().__init__(embodiment, normalizers, text_dir, max_text_tokens, mode, seed, rank, position)
        self.frames = torch.tensor(list(layout_frames), dtype=torch.long)
        self.num_latent_frames = int(num_latent_frames)

    def decode(self, sample: dict, rng: np.random.Generator | None = None) -> dict[str, Any]:
        where = _where(sample)
        views = _read_npy(sample, "latents.npy", where, " (is this a latent cache shard?)")
        if views.ndim != 5 or views.shape[2] != len(self.frames):
            raise DataError(f"{where}: latents.npy has shape {views.shape}, expected (views, C, "
                            f"{len(self.frames)}, h, w)")
        view = int(rng.integers(views.shape[0])) if self.mode == "augment" and rng is not None else 0
        stored = torch.from_numpy(views[view].astype(np.float32))
        if not torch.isfinite(stored).all():  # a float16 overflow or a damaged file: never train on NaN
            raise DataError(f"{where}: latents.npy view {view} contains NaN or inf; rebuild the latent cache")
        c, _, h, w = stored.shape
        latents = torch.zeros(c, self.num_latent_frames, h, w)
        latents[:, self.frames] = stored
        return {"latents": latents, **self.decode_vectors(sample)}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into the batch contract; text is zero-padded to the longest in the batch.
    Samples from the latent cache carry ``latents`` (B, 16, T, h, w) instead of the two image keys.

    Returns:
        the batch dict documented in :mod:`cosmos_policy_lightning.data.datamodule`.
    """
    text, mask = pad_text_batch([s["text"] for s in samples])
    # Pixel batches carry images; latent-cache batches carry their stored latents instead.
    pictures = ("latents",) if "latents" in samples[0] else ("images", "future_images")
    return {
        **{key: torch.stack([s[key] for s in samples]) for key in pictures},
        "proprio": torch.stack([s["proprio"] for s in samples]),
        "future_proprio": torch.stack([s["future_proprio"] for s in samples]),
        "actions": torch.stack([s["actions"] for s in samples]),
        "value": torch.tensor([s["value"] for s in samples], dtype=torch.float32),
        "objective": torch.tensor([s["objective"] for s in samples], dtype=torch.int64),
        "success": torch.tensor([s["success"] for s in samples], dtype=torch.bool),
        "score": torch.tensor([s["score"] for s in samples], dtype=torch.float32),
        "text": text,
        "text_mask": mask,
        "instruction": [s["instruction"] for s in samples],
        "episode": [s["episode"] for s in samples],
        "step": torch.tensor([s["step"] for s in samples], dtype=torch.int64),
    }
