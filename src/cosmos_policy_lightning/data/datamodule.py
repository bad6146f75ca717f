"""LightningDataModule over converted shards: the objective mix, augmentation and normalisation
(docs/method.md §2, §4).

A converted dataset directory (schema: :mod:`cosmos_policy_lightning.data.schema`) becomes batches:

* **training**: an endless stream -- shards resampled with replacement per worker, samples shuffled in
  a buffer, each sample given an objective by the configured mix (policy samples from successful
  episodes only; the other objectives from successes and failures in ``success_fraction`` proportion),
  decoded, augmented with one random parameter set per sample, normalised. An epoch is
  ``samples_per_epoch // (batch_size * world_size)`` batches per rank, split over the workers.
* **validation / test / predict**: one exact pass over the ``validation`` shards (split by rank,
  then by worker; no resampling, no augmentation, the test-time centre crop), with objectives
  assigned round-robin so every objective of the mix gets metrics.

Batch contract (a dict; B = batch size, N = cameras in embodiment order, K = chunk size,
A / P = action / proprio dims, L = longest instruction of the batch in tokens, D = text width):

==================  ==========================  ====================================================
key                 dtype, shape                content
==================  ==========================  ====================================================
``images``          uint8 (B, N, H, W, 3)       cameras at step t (convert to float on the device)
``future_images``   uint8 (B, N, H, W, 3)       cameras at step t' = min(t + K, T - 1)
``latents``         float32 (B, 16, T, h, w)    instead of the two image keys with ``latent_cache``:
                                                the VAE latents of the pixel sequence (one stored
                                                view), zeros in the proprio / action / value frames
``proprio``         float32 (B, P)              step t, normalised to [-1, 1]
``future_proprio``  float32 (B, P)              step t', normalised
``actions``         float32 (B, K, A)           ``actions[t:t+K]``, normalised
``value``           float32 (B,)                V(s') in [-1, 1] (docs/method.md §4)
``objective``       int64 (B,)                  index into ``layout.OBJECTIVES``
``success``         bool (B,)                   the episode succeeded
``score``           float32 (B,)                the episode's score in [0, 1]
``text``            float32 (B, L, D)           per-token instruction embedding, zero-padded
``text_mask``       bool (B, L)                 True on real tokens
``instruction``     list[str]                   the episodes' instructions (per-task test metrics)
``episode``         list[str]                   episode ids
``step``            int64 (B,)                  t
==================  ==========================  ====================================================
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from ..embodiment import Embodiment
from ..errors import CosmosPolicyError, DataError
from ..layout import OBJECTIVE_TABLE, OBJECTIVES, SequenceLayout
from ..inference_record import InferenceRecord
from ..normalization import DatasetStats, Normalizer
from ..storage import location
from . import schema as S
from .dataset_info import DatasetInfo, is_converted, read_dataset_info
from .latent_cache import cache_fingerprint, dataset_content, read_cache_manifest, refuse_other_fingerprint
from .stages import (
    ObjectiveMixer,
    RoundRobinObjectives,
    SampleDecoder,
    Shuffle,
    SplitByRank,
    StreamPosition,
    TakeShare,
    collate,
)
from .training_source import PixelShards, training_source

#: The pre-training mix of docs/method.md §2; the planning fine-tune uses ``{"policy": 0.1, "world_model": 0.45,
#: "value": 0.45}``.
DEFAULT_OBJECTIVE_MIX: dict[str, float] = {"policy": 0.5, "world_model": 0.25, "value": 0.25}


# ============================================================================ the data module
def _worker_init(worker_id: int) -> None:
    # Data-loader workers share the host's cores with each other and with the trainer.
    torch.set_num_threads(1)


def _resample_seed(rank: int, position: StreamPosition | None = None) -> int:
    """Per-(rank, worker) seed of webdataset's ResampledShards (rank carried from the main process); a
    resumed stream (``position.start`` > 0) draws other shards than the run it continues."""
    info = torch.utils.data.get_worker_info()
    seed = rank * 1000 + (info.id if info is not None else 0)
    start = position.start if position is not None else 0
    return seed if not start else int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


class _ResumableLoader(DataLoader):
    """The training DataLoader, resumable the way an endless resampled stream can be: its state is the
    number of batches delivered so far (plus those of the runs it continues), saved in the checkpoint
    by Lightning (``state_dict``) and given back on resume (``load_state_dict``) before the first batch,
    which re-seeds every stage of the stream (:class:`~.stages.StreamPosition`)."""

    def __init__(self, *args, position: StreamPosition, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position
        self.delivered = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"stream_start": self.position.start + self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position.start = int(state.get("stream_start", self.position.start))
        self.delivered = 0


class _SizedPipeline(wds.DataPipeline):
    """A DataPipeline with ``__len__`` (batches per rank per epoch) for progress bars and schedules;
    a module-level class so spawned workers can unpickle it (``with_length`` builds a class on the fly)."""

    def __init__(self, *stages, length: int):
        super().__init__(*stages)
        self.size = int(length)

    def __len__(self) -> int:
        return self.size


class CosmosDataModule(L.LightningDataModule):
    """Batches of ``(s, a, s', V(s'))`` samples with objectives, from a converted dataset (docs/method.md §2, §4).

    Args:
        data_dir: converted dataset directory (shards, ``stats.json``, ``manifest.json``, ``text_embeddings/``).
        embodiment: embodiment YAML path; default (None): the embodiment stored in the manifest. A given
            one must describe the same robot as the shards; its normalisation modes are used.
        batch_size: training samples per batch, per rank.
        num_workers: data-loader worker processes (persistent when > 0; 1 torch thread each).
        objective_mix: weight per objective (names of ``layout.OBJECTIVES``), normalised to sum 1. docs/method.md §2:
            ``{policy: 0.5, world_model: 0.25, value: 0.25}`` for training, ``{policy: 0.1, world_model:
            0.45, value: 0.45}`` (or with ``value_future_state``) for the planning fine-tune.
        success_fraction: share of successful-episode samples among non-policy samples, in [0, 1]
            (docs/method.md §2: 0.5). Policy samples always come from successes.
        shuffle_buffer: samples in each worker's shuffle buffer (undecoded; also the cap of the mixer's
            per-outcome pools).
        samples_per_epoch: training samples per epoch over all ranks; default: the number of training
            samples in the manifest.
        augment: random docs/method.md §4 augmentation in training, and the test-time centre crop in validation /
            test / predict (inference must then centre-crop too: see :attr:`center_crop`). False: raw
            images everywhere.
        max_text_tokens: instruction embeddings are cut to this many tokens.
        seed: base seed of shard resampling, shuffling, objective draws and augmentation.
        val_batch_size: batch size of validation / test / predict; default ``batch_size``.
        convert_from: keyword arguments of :func:`cosmos_policy_lightning.data.convert.convert` (at least
            ``source``; ``format``, ``val_fraction``, ...). When ``data_dir`` holds no finished
            conversion, the preparation stage (``training/prepare.py``, run by the CLI before anything
            reads the dataset; from Python ``prepare_dataset(dm)``) makes the shards from them first
            (``output`` = ``data_dir``, ``embodiment`` = this module's), so a recipe runs on a fresh
            checkout. An unfinished conversion resumes. The data module itself only reads shards.
        latent_cache: train, validate and test from VAE latents encoded once (``data/latent_cache.py``)
            instead of encoding images at every step. The preparation stage builds the cache with the
            model's VAE on first use (resumable) and refuses one made with another VAE.
        vae: the VAE of the cache (the CLI links it from ``model.init_args.vae``).
        latent_views: random augmented views stored per training sample besides the test-time view
            (with ``augment``); one is drawn per sample and step.
        latent_dir: cache directory; default ``<data_dir>/latents``.
        latent_dtype: ``float16`` (default) or ``float32`` storage of the cached latents.
        check_sha256: hash every shard (pixel or latent) the first time a process reads it and refuse one
            whose SHA-256 differs from its manifest's, before any of its samples is used
            (``data/integrity.py``; one extra read per shard and process, measured by
            ``tools/benchmark_cache.py --integrity``). False: sizes and sample counts only (``cosmos-policy verify``
            then checks the bytes).

    Raises:
        CosmosPolicyError: an argument is out of range (at construction).
        DataError: the dataset is missing, inconsistent or does not match the embodiment (at the first
            access to the metadata or at :meth:`setup`).
    """

    def __init__(
        self,
        data_dir: str,
        embodiment: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        objective_mix: dict[str, float] = DEFAULT_OBJECTIVE_MIX,
        success_fraction: float = 0.5,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        augment: bool = True,
        max_text_tokens: int = 512,
        seed: int = 0,
        val_batch_size: int | None = None,
        convert_from: dict[str, Any] | None = None,
        latent_cache: bool = False,
        vae: str | dict | None = None,
        latent_views: int = 4,
        latent_dir: str | None = None,
        latent_dtype: str = "float16",
        check_sha256: bool = True,
    ):
        super().__init__()
        self.data_dir = str(data_dir)
        self.embodiment_path = None if embodiment is None else str(embodiment)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.val_batch_size = _positive_int(val_batch_size if val_batch_size is not None else batch_size,
                                            "val_batch_size")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise CosmosPolicyError(f"data: num_workers must be an integer >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.objective_weights = normalize_objective_mix(objective_mix)
        if not (isinstance(success_fraction, (int, float)) and 0.0 <= success_fraction <= 1.0):
            raise CosmosPolicyError(f"data: success_fraction must be in [0, 1], got {success_fraction!r}")
        self.success_fraction = float(success_fraction)
        self.shuffle_buffer = _positive_int(shuffle_buffer, "shuffle_buffer")
        self.samples_per_epoch = None if samples_per_epoch is None else _positive_int(samples_per_epoch,
                                                                                      "samples_per_epoch")
        self.augment = bool(augment)
        self.max_text_tokens = _positive_int(max_text_tokens, "max_text_tokens")
        self.seed = int(seed)
        check_convert_from(convert_from, embodiment)
        self.convert_from = dict(convert_from) if convert_from else None
        self.latent_cache = bool(latent_cache)
        if self.latent_cache and not vae:
            raise CosmosPolicyError("data: latent_cache needs data.vae (the model's VAE; the CLI links it from "
                                    "model.init_args.vae)")
        self.vae = vae
        if isinstance(latent_views, bool) or not isinstance(latent_views, int) or latent_views < 0:
            raise CosmosPolicyError(f"data: latent_views must be an integer >= 0, got {latent_views!r}")
        self.latent_views = latent_views
        self.latent_dir = latent_dir
        self.latent_dtype = latent_dtype
        self.check_sha256 = bool(check_sha256)
        self._cache_manifest: dict | None = None
        self._source: PixelShards | None = None
        # The model's hparams hold the embodiment as a dict; Lightning refuses to merge differing values.
        self.save_hyperparameters(ignore=["embodiment"])
        self._info: DatasetInfo | None = None
        self._normalizers: dict[str, Normalizer] | None = None
        self._fit_checked = False
        self._files_checked = False

    # ------------------------------------------------------------------ metadata (lazy, cheap)
    @staticmethod
    def read_info(data_dir: str | Path, embodiment: str | Path | None = None) -> DatasetInfo:
        """Metadata of a dataset without building loaders (see :func:`read_dataset_info`)."""
        return read_dataset_info(data_dir, embodiment)

    @property
    def info(self) -> DatasetInfo:
        """The dataset's :class:`DatasetInfo`, read on first access (so CLI links work right after
        construction, before :meth:`setup`).

        Raises:
            DataError: the dataset is missing or unfinished (with ``convert_from``: the hint to run the
                preparation stage), or inconsistent.
        """
        if self._info is None:
            if self.convert_from is not None and not self.converted:
                raise DataError(f"{self.data_dir}: not converted yet; data.convert_from is run by the preparation "
                                f"stage: cosmos-policy fit/test do it, from Python call "
                                f"cosmos_policy_lightning.training.prepare.prepare_dataset(datamodule)")
            self._info = read_dataset_info(self.data_dir, self.embodiment_path)
        return self._info

    @property
    def converted(self) -> bool:
        """Whether ``data_dir`` holds a finished conversion (its manifest says ``complete``)."""
        return is_converted(self.data_dir)

    @property
    def embodiment(self) -> Embodiment:
        return self.info.embodiment

    @property
    def stats(self) -> DatasetStats:
        return self.info.stats

    @property
    def manifest(self) -> dict:
        return self.info.manifest

    @property
    def text_encoder_identity(self) -> str:
        return self.info.text_encoder

    @property
    def text_dim(self) -> int:
        return self.info.text_dim

    @property
    def normalizers(self) -> dict[str, Normalizer]:
        """``{"action": Normalizer, "proprio": Normalizer}`` from ``stats.json`` with the embodiment's modes."""
        if self._normalizers is None:
            record = self.inference_record()  # the normalisers inference will use, by construction
            self._normalizers = {m: record.normalizer(m) for m in ("action", "proprio")}
        return self._normalizers

    @property
    def center_crop(self) -> bool:
        """Whether validation / test images get the docs/method.md §4 centre crop (True when trained with
        augmentation); inference must do the same (``augment.test_transform``)."""
        return self.augment

    @property
    def cache_dir(self) -> Path:
        """Directory of the latent cache (``latent_dir`` or ``<data_dir>/latents``)."""
        return location(self.latent_dir) if self.latent_dir else location(self.data_dir) / "latents"

    @property
    def cache_manifest(self) -> dict | None:
        """The latent cache's manifest; None without ``latent_cache``. Everything but the VAE is checked
        here without loading it (the preparation stage checks the VAE against the model's).

        Raises:
            DataError: the cache is missing or unfinished (build it with ``cosmos-policy cache-latents`` or
                let ``cosmos-policy fit`` build it), or was made for other settings.
        """
        if not self.latent_cache:
            return None
        if self._cache_manifest is None:
            manifest = read_cache_manifest(self.cache_dir)
            if manifest is None or manifest.get("status") != "complete":
                raise DataError(f"{self.cache_dir}: no finished latent cache; cosmos-policy fit/test build it with "
                                f"the model's VAE (from Python: training.prepare.prepare_latent_cache(datamodule, "
                                f"model.vae)), or run cosmos-policy cache-latents {self.data_dir}")
            info = self.info
            want = cache_fingerprint(layout=SequenceLayout.from_embodiment(info.embodiment),
                                     image_size=info.embodiment.image_size, vae_hash="", augment=self.augment,
                                     augment_views=self.latent_views, seed=self.seed, dtype=self.latent_dtype,
                                     stats_fingerprint=info.stats.fingerprint, content=dataset_content(info))
            refuse_other_fingerprint(manifest, want, self.cache_dir, ignore=("vae",))
            self._cache_manifest = manifest
        return self._cache_manifest

    def inference_record(self) -> InferenceRecord:
        """What a model trained on this data needs at inference (``inference_record.py``): the embodiment,
        statistics, text encoder, token limit, objective mix and test-time transform. The CLI links it
        into ``model.init_args.inference_record``; the model stores it in every checkpoint."""
        info = self.info
        return InferenceRecord(embodiment=info.embodiment, stats=info.stats, text_encoder=info.text_encoder,
                               max_text_tokens=self.max_text_tokens, objective_mix=self.objective_mix,
                               test_transform="center_crop" if self.center_crop else "none")

    @property
    def source(self) -> PixelShards:
        """Where batches come from, chosen once: the latent cache (``latent_cache``) or the pixel shards
        (``data/training_source.py``: shards, decoder, required members, sizes and checksums)."""
        if self._source is None:
            self._source = training_source(self.info, self.cache_manifest, self.cache_dir, self.vae)
        return self._source

    def _decoder(self, mode: str, rank: int = 0, position: StreamPosition | None = None) -> SampleDecoder:
        info = self.info
        return self.source.decoder((info.embodiment, self.normalizers, str(info.data_dir / S.TEXT_DIR),
                                    self.max_text_tokens, mode), seed=self.seed, rank=rank, position=position)

    @property
    def objective_mix(self) -> dict[str, float]:
        """The normalised mix, ``{objective: weight}`` over the objectives with nonzero weight."""
        return {o: w for o, w in zip(OBJECTIVES, self.objective_weights) if w > 0}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Read and check the metadata (idempotent; a few small JSON files)."""
        info = self.info
        _ = self.normalizers
        if not self._files_checked:
            self.source.check_files()
            self._files_checked = True
        if stage in (None, "fit") and not self._fit_checked:
            train = info.splits["train"]
            if not train.shards:
                raise DataError(f"{info.data_dir}: no training shards (train-*.tar)")
            total = train.total_samples
            if total is not None and self.batch_size > total:
                raise DataError(f"data: batch_size {self.batch_size} is larger than the training split of "
                                f"{info.data_dir} ({total} samples); lower data.batch_size")
            # the policy learns from successes only (layout.Objective.successes_only)
            successes_only = sum(w for w, o in zip(self.objective_weights, OBJECTIVE_TABLE) if o.successes_only)
            if successes_only > 0 and train.has_success is False:
                raise DataError(f"{info.data_dir / S.MANIFEST}: the objective mix has policy samples but the training "
                                f"split has no successful episode (set objective_mix.policy to 0)")
            if train.has_failure is False and successes_only < 1:
                warnings.warn(f"{info.data_dir}: no failed episodes in the training split; world-model and value "
                              f"samples all come from successes", stacklevel=2)
            self._fit_checked = True

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def train_batches_per_epoch(self, world_size: int = 1) -> int:
        """Batches one rank yields per training epoch: ``samples_per_epoch // (batch_size * world_size)``,
        at least 1.

        Raises:
            DataError: ``samples_per_epoch`` unset and the manifest has no sample counts.
        """
        total = self.samples_per_epoch or self.info.splits["train"].total_samples
        if total is None:
            raise DataError(f"{self.info.data_dir / S.MANIFEST}: no sample counts in shards.train; "
                            f"set data.samples_per_epoch")
        return max(1, total // (self.batch_size * world_size))

    def _loader(self, pipeline: wds.DataPipeline, position: StreamPosition | None = None) -> DataLoader:
        kwargs = dict(batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
                      persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
        if position is not None:
            return _ResumableLoader(pipeline, position=position, **kwargs)
        return DataLoader(pipeline, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Endless resampled stream cut into epochs of :meth:`train_batches_per_epoch` batches."""
        self.setup("fit")
        info, (rank, world) = self.info, self._rank_world()
        train = info.splits["train"]
        batches = self.train_batches_per_epoch(world)
        # Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is
        # exact by construction (TakeShare), so that one message is silenced.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)
        # Resuming: the trainer's step is restored before this is called; the exact position comes from
        # the checkpoint through _ResumableLoader.load_state_dict (older checkpoints: the step).
        trainer = getattr(self, "trainer", None)
        position = StreamPosition(int(trainer.global_step) if trainer is not None else 0)
        pipeline = _SizedPipeline(
            # Every worker of every rank draws shards independently with replacement, so no node /
            # worker splitting is needed (and no rank can run out of data).
            wds.ResampledShards(self.source.shards("train"), seed=self.seed, deterministic=True,
                                worker_seed=functools.partial(_resample_seed, rank, position)),
            self.source.reader("train", self.check_sha256),
            Shuffle(self.shuffle_buffer, self.seed, rank, position),
            ObjectiveMixer(self.objective_weights, self.success_fraction, train.has_success, train.has_failure,
                           seed=self.seed, rank=rank, pool_size=self.shuffle_buffer,
                           stall_limit=4 * self.shuffle_buffer, position=position),
            self._decoder("augment" if self.augment else "none", rank, position),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
            TakeShare(batches),
            length=batches,
        )
        return self._loader(pipeline, position)

    def _held_out_loader(self) -> DataLoader | list:
        self.setup("validate")
        info, (rank, world) = self.info, self._rank_world()
        val = info.splits["validation"]
        if not val.shards:
            warnings.warn(f"{info.data_dir}: no validation shards; skipping validation / test", stacklevel=3)
            return []
        objectives = [i for i, w in enumerate(self.objective_weights) if w > 0]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.source.shards("validation")),
            SplitByRank(rank, world),
            wds.split_by_worker,
            self.source.reader("validation", self.check_sha256),
            RoundRobinObjectives(objectives, [Path(p).name for p in val.shards]),
            self._decoder("center" if self.augment else "none"),
            wds.batched(self.val_batch_size, collation_fn=collate, partial=True),
        )
        return self._loader(pipeline)

    def val_dataloader(self) -> DataLoader | list:
        """One exact pass over the validation shards (each held-out sample once, over all ranks and workers)."""
        return self._held_out_loader()

    def test_dataloader(self) -> DataLoader | list:
        """Same pass as :meth:`val_dataloader` (the held-out episodes)."""
        return self._held_out_loader()

    def predict_dataloader(self) -> DataLoader | list:
        """Same pass as :meth:`val_dataloader`."""
        return self._held_out_loader()


def check_convert_from(convert_from: dict[str, Any] | None, embodiment: str | None) -> None:
    """Refuse a ``convert_from`` that cannot run (see :class:`CosmosDataModule`).

    Raises:
        CosmosPolicyError: no ``source``, or no embodiment to make the shards for.
    """
    if convert_from is not None and "source" not in convert_from:
        raise CosmosPolicyError("data: convert_from needs a 'source' (file, directory or glob of demonstrations)")
    if convert_from is not None and embodiment is None:
        raise CosmosPolicyError("data: convert_from needs data.embodiment (the YAML the shards are made for)")


def normalize_objective_mix(mix: dict[str, float]) -> list[float]:
    """Weights per objective in ``OBJECTIVES`` order, summing to 1.

    Raises:
        CosmosPolicyError: unknown objective, negative / non-finite weight, or all weights zero.
    """
    if not isinstance(mix, dict) or not mix:
        raise CosmosPolicyError(f"data: objective_mix must be a non-empty mapping objective -> weight, got {mix!r}")
    weights = [0.0] * len(OBJECTIVES)
    for name, w in mix.items():
        if name not in OBJECTIVES:
            raise CosmosPolicyError(f"data: objective_mix: unknown objective {name!r} "
                                    f"(expected one of {', '.join(OBJECTIVES)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise CosmosPolicyError(f"data: objective_mix.{name} must be a finite weight >= 0, got {w!r}")
        weights[OBJECTIVES.index(name)] = float(w)
    total = sum(weights)
    if total <= 0:
        raise CosmosPolicyError("data: objective_mix: all weights are zero")
    return [w / total for w in weights]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CosmosPolicyError(f"data: {name} must be a positive integer, got {value!r}")
    return value


__all__ = ["CosmosDataModule", "check_convert_from", "normalize_objective_mix", "DEFAULT_OBJECTIVE_MIX"]
