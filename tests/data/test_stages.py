"""The webdataset stages of data/stages.py, one by one, on real tar shards (tests/fixtures/shard_factory.py) read
with webdataset, and on hand-built sample dicts for the edge cases.

tests/data/test_datamodule.py checks the assembled pipeline through CosmosDataModule; here each stage is fed
directly, so a failure names the stage: the rank x worker partition, the per-worker share of an epoch,
the seeded shuffle, the objective mix (frequencies, outcome balance, absent classes), the round-robin
labels of held-out samples, the resume position, JPEG / npy decoding with its one-line errors, the
latent-cache decoder and the collation into the batch contract of data/datamodule.py.
"""

from __future__ import annotations

import collections
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.augment import apply_uint8, center_crop_params
from cosmos_policy_lightning.data.augment import test_transform as centre_crop
from cosmos_policy_lightning.data.dataset_info import read_dataset_info
from cosmos_policy_lightning.data.latent_cache import LATENTS, kept_frames
from cosmos_policy_lightning.data.stages import (
    BATCH_KEYS,
    LatentSampleDecoder,
    ObjectiveMixer,
    RoundRobinObjectives,
    SampleDecoder,
    Shuffle,
    SplitByRank,
    StreamPosition,
    TakeShare,
    collate,
    decode_images,
    read_meta,
    stream_rng,
    worker_position,
)
from cosmos_policy_lightning.errors import DataError
from cosmos_policy_lightning.inference_record import InferenceRecord
from cosmos_policy_lightning.layout import OBJECTIVES, SequenceLayout

from ..fixtures.shard_factory import HashTextEncoder, standard_episodes, write_dataset

POLICY, WORLD_MODEL, VALUE, VALUE_FUTURE = (OBJECTIVES.index(o) for o in
                                            ("policy", "world_model", "value", "value_future_state"))
PRETRAIN_MIX = [0.5, 0.25, 0.25, 0.0, 0.0]    # docs/method.md §2
FINETUNE_MIX = [0.1, 0.45, 0.0, 0.45, 0.0]    # the planning fine-tune's mix


# ============================================================================ fixtures and helpers
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """6 + 2 training and 3 + 2 validation episodes, 10 samples per shard: 9 train and 6 validation shards."""
    return write_dataset(tmp_path_factory.mktemp("stages"), standard_episodes(6, 2, 3, 2, length=10),
                         samples_per_shard=10)


def _read(paths) -> list[dict]:
    """Raw samples of the shards, in order, the way the data module reads them (tar -> member dicts)."""
    return list(wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples()))


@pytest.fixture(scope="module")
def raw(toy):
    """``split -> raw samples`` read once; use :func:`fresh` to get copies the stages may annotate."""
    return {split: _read(toy.root / n for n in toy.shard_names[split]) for split in S.SPLITS}


def fresh(samples) -> list[dict]:
    return [dict(s) for s in samples]


@pytest.fixture(scope="module")
def normalizers(toy):
    info = read_dataset_info(toy.root)
    record = InferenceRecord(info.embodiment, info.stats)
    return {m: record.normalizer(m) for m in ("action", "proprio")}


def decoder(toy, normalizers, mode="none", cls=SampleDecoder, max_text_tokens=512, **kw):
    return cls(toy.embodiment, normalizers, str(toy.root / S.TEXT_DIR), max_text_tokens, mode, **kw)


def hand_sample(i: int, success: bool, url: str = "/data/train-000003.tar") -> dict:
    """A raw sample with only ``meta.json`` (what the objective stages read), keyed ``e<i>_000000``."""
    meta = {"episode": f"e{i}", "step": 0, "future_step": 0, "length": 1, "success": success,
            "score": float(success), "value": 0.0, "instruction": "push the block"}
    return {"__key__": S.sample_key(f"e{i}", 0), "__url__": url, S.META: json.dumps(meta).encode()}


def outcome_stream(n: int, p_success: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [hand_sample(i, bool(rng.random() < p_success)) for i in range(n)]


def mixed(mixer: ObjectiveMixer, samples) -> list[tuple[str, int, bool]]:
    """``(key, objective, success)`` of every sample the mixer lets through, in order."""
    return [(s["__key__"], s["__objective__"], bool(read_meta(s)["success"])) for s in mixer.run(iter(samples))]


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ============================================================================ random streams
def test_stream_rng_is_keyed_by_seed_rank_epoch_stream_and_start():
    draw = lambda *a, **k: stream_rng(*a, **k).integers(2**62, size=4).tolist()  # noqa: E731
    base = draw(0, 0, 0, 0)
    assert draw(0, 0, 0, 0) == base                       # reproducible
    assert draw(0, 0, 0, 0, start=0) == base              # a fresh run draws what it always drew
    others = [draw(1, 0, 0, 0), draw(0, 1, 0, 0), draw(0, 0, 1, 0), draw(0, 0, 0, 1), draw(0, 0, 0, 0, start=7)]
    assert all(o != base for o in others) and len({tuple(o) for o in others}) == len(others)
    assert draw(0, 0, 0, 0, start=7) == draw(0, 0, 0, 0, start=7) != draw(0, 0, 0, 0, start=8)
    assert worker_position() == (0, 1)  # the main process is worker 0 of 1


class _WorkerDraws(torch.utils.data.IterableDataset):
    """Yields ``(worker id, workers, first draw of stream_rng(5, 0, 0, 0))`` once per data-loader worker."""

    def __iter__(self):
        worker, workers = worker_position()
        yield worker, workers, int(stream_rng(5, 0, 0, 0).integers(2**62))


def test_stream_rng_differs_between_data_loader_workers():
    got = sorted(DataLoader(_WorkerDraws(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    assert [(int(w), int(n)) for w, n, _ in got] == [(0, 2), (1, 2)]
    assert int(got[0][2]) != int(got[1][2])
    # Worker 0 keys its stream like the main process does (worker 0).
    assert int(got[0][2]) == int(stream_rng(5, 0, 0, 0).integers(2**62))


# ============================================================================ meta.json
def test_read_meta_parses_caches_and_names_the_sample(raw, toy):
    sample = fresh(raw["train"][:1])[0]
    meta = read_meta(sample)
    assert meta == toy.records[sample["__key__"]]["meta"]
    assert sample["__meta__"] is meta and read_meta(sample) is meta  # parsed once per sample

    where = f"{Path(sample['__url__']).name}: sample {sample['__key__']}"
    broken = [({k: v for k, v in sample.items() if k not in (S.META, "__meta__")}, f"missing member {S.META}"),
              ({**sample, S.META: b"{not json", "__meta__": None}, "is not valid JSON"),
              ({**sample, S.META: json.dumps({"episode": "x", "step": 1}).encode()},
               "lacks field(s) future_step, length, success, score, value, instruction")]
    for bad, fragment in broken:
        bad.pop("__meta__", None)
        with pytest.raises(DataError) as err:
            read_meta(bad)
        assert where in str(err.value) and fragment in str(err.value) and "\n" not in str(err.value)


def test_read_meta_refuses_json_that_is_not_an_object():
    for payload in (b"1", b"null"):
        with pytest.raises(DataError, match="train-000003.tar: sample e0_000000"):
            read_meta({**hand_sample(0, True), S.META: payload})


# ============================================================================ SplitByRank / TakeShare
def test_split_by_rank_takes_every_world_size_th_item():
    items = list(range(11))
    assert list(SplitByRank(0, 1).run(iter(items))) == items
    parts = [list(SplitByRank(r, 3).run(iter(items))) for r in range(3)]
    assert parts == [items[0::3], items[1::3], items[2::3]]
    assert sorted(sum(parts, [])) == items


def _key(sample: dict) -> str:
    return sample["__key__"]


def _rank_pass(paths: list[str], rank: int, world: int, workers: int) -> list[str]:
    """The held-out pipeline of the data module up to the reader, on one rank with ``workers`` workers."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(paths), SplitByRank(rank, world), wds.split_by_worker,
                                wds.tarfile_to_samples(), wds.map(_key))
    return list(DataLoader(pipeline, batch_size=None, num_workers=workers, multiprocessing_context="fork"))


def test_ranks_times_workers_partition_the_held_out_samples(toy):
    """2 ranks x 2 workers over 6 shards: every sample exactly once, and the same split every time."""
    paths = [str(toy.root / n) for n in toy.shard_names["validation"]]
    assert len(paths) == 6
    passes = {rank: _rank_pass(paths, rank, 2, 2) for rank in range(2)}
    everything = passes[0] + passes[1]
    assert collections.Counter(everything) == collections.Counter(toy.keys("validation"))
    assert set(passes[0]).isdisjoint(passes[1]) and passes[0] and passes[1]
    # Rank r reads shards r, r + 2, r + 4 (whole shards, never a part of one).
    for rank, keys in passes.items():
        own = {k for n in toy.shard_names["validation"][rank::2] for k in (s["__key__"] for s in _read([toy.root / n]))}
        assert set(keys) == own
    assert {rank: _rank_pass(paths, rank, 2, 2) for rank in range(2)} == passes  # deterministic


def _endless_keys(paths: list[str], total: int):
    """A resampled (endless) stream of real samples cut by TakeShare, each tagged with its worker id."""
    return wds.DataPipeline(wds.ResampledShards(paths, seed=0, deterministic=True), wds.tarfile_to_samples(),
                            wds.map(lambda s: (worker_position()[0], s["__key__"])), TakeShare(total))


@pytest.mark.parametrize("total, workers", [(7, 2), (1, 2), (7, 1)])
def test_take_share_gives_one_rank_exactly_total_items_over_its_workers(toy, total, workers):
    paths = [str(toy.root / n) for n in toy.shard_names["train"]]
    items = list(DataLoader(_endless_keys(paths, total), batch_size=None, num_workers=workers,
                            multiprocessing_context="fork"))
    assert len(items) == total
    per_worker = collections.Counter(int(w) for w, _ in items)
    assert {i: per_worker.get(i, 0) for i in range(workers)} == \
        {i: total // workers + (i < total % workers) for i in range(workers)}


def test_take_share_in_the_main_process_takes_total(toy):
    paths = [str(toy.root / n) for n in toy.shard_names["train"]]
    assert len(list(_endless_keys(paths, 5))) == 5
    assert list(TakeShare(3).run(iter(range(10)))) == [0, 1, 2]
    assert list(TakeShare(30).run(iter(range(10)))) == list(range(10))  # a finite source ends it earlier


# ============================================================================ Shuffle
def _shuffled(keys, bufsize=30, seed=0, rank=0, position=None, epochs=1):
    stage = Shuffle(bufsize, seed, rank, position)
    return [list(stage.run(iter(keys))) for _ in range(epochs)]


def test_shuffle_is_a_seeded_permutation(raw):
    keys = [s["__key__"] for s in raw["train"]]
    first, second = _shuffled(keys, epochs=2)
    assert sorted(first) == sorted(keys) and sorted(second) == sorted(keys)  # nothing lost or repeated
    assert first != keys
    assert _shuffled(keys)[0] == first                                  # same seed, rank, epoch: same order
    assert second != first                                              # the next epoch reshuffles
    for other in (_shuffled(keys, seed=1)[0], _shuffled(keys, rank=1)[0],
                  _shuffled(keys, position=StreamPosition(4))[0]):
        assert other != first and sorted(other) == sorted(keys)
    assert _shuffled(keys, position=StreamPosition(0))[0] == first      # start 0 == a fresh run


def test_shuffle_fills_its_buffer_before_the_first_sample_leaves():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    out = Shuffle(25, seed=3).run(source())
    next(out)
    assert len(pulled) >= 25
    # Over many seeds the first sample comes from anywhere in the buffer, not from its first few items.
    firsts = [next(iter(Shuffle(25, seed=s).run(iter(range(100))))) for s in range(40)]
    assert max(firsts) >= 15 and len(set(firsts)) >= 15


def test_shuffle_accepts_any_iterable():
    assert sorted(Shuffle(4, seed=0).run([1, 2, 3, 4, 5])) == [1, 2, 3, 4, 5]


# ============================================================================ ObjectiveMixer
@pytest.mark.parametrize("weights, success_fraction", [(PRETRAIN_MIX, 0.5), (FINETUNE_MIX, 0.2)])
def test_mixer_follows_the_mix_and_the_success_fraction(weights, success_fraction):
    """4000 samples, 75% successes: objectives by the weights, policy from successes only, the other
    objectives from successes in ``success_fraction`` proportion (rejection sampling of the surplus)."""
    samples = outcome_stream(4000, 0.75, seed=1)
    out = mixed(ObjectiveMixer(weights, success_fraction, True, True, seed=4), samples)
    keys = [k for k, _, _ in out]
    assert len(keys) == len(set(keys)) and len(out) > 1200   # each input at most once
    order = {s["__key__"]: i for i, s in enumerate(samples)}
    for outcome in (True, False):  # each outcome's samples leave in arrival order (FIFO pools)
        idx = [order[k] for k, _, s in out if s == outcome]
        assert idx == sorted(idx)
    objectives = np.array([o for _, o, _ in out])
    success = np.array([s for _, _, s in out])
    for i, w in enumerate(weights):
        assert (objectives == i).mean() == pytest.approx(w, abs=0.035), OBJECTIVES[i]
    assert success[objectives == POLICY].all()
    assert success[objectives != POLICY].mean() == pytest.approx(success_fraction, abs=0.04)


def test_mixer_on_real_shards_takes_policy_samples_from_successful_episodes(raw, toy):
    out = list(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=2).run(iter(fresh(raw["train"]))))
    assert len(out) >= 40
    objectives = collections.Counter(s["__objective__"] for s in out)
    assert set(objectives) == {POLICY, WORLD_MODEL, VALUE}
    for s in out:
        if s["__objective__"] == POLICY:
            assert toy.records[s["__key__"]]["meta"]["success"]
        assert s[S.image_member("front")] is not None  # still undecoded: the mixer only reads meta.json
    assert any(not toy.records[s["__key__"]]["meta"]["success"] for s in out)


def test_mixer_draws_are_seeded_by_seed_epoch_and_position():
    samples = outcome_stream(600, 0.6, seed=2)
    objectives = lambda mixer, epochs=1: [[o for _, o, _ in mixed(mixer, fresh(samples))]  # noqa: E731
                                          for _ in range(epochs)]
    first, second = objectives(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=4), epochs=2)
    assert objectives(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=4))[0] == first
    assert second != first
    assert objectives(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=5))[0] != first
    assert objectives(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=4, rank=1))[0] != first
    assert objectives(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=4, position=StreamPosition(9)))[0] != first


def test_mixer_without_failures_uses_every_success():
    samples = outcome_stream(500, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the manifest said so: nothing to guess, nothing to warn
        out = mixed(ObjectiveMixer(PRETRAIN_MIX, 0.5, True, False, seed=1), samples)
    assert [k for k, _, _ in out] == [s["__key__"] for s in samples]  # nothing waits, nothing is dropped
    assert all(s for _, _, s in out) and {o for _, o, _ in out} == {POLICY, WORLD_MODEL, VALUE}


def test_mixer_without_successes():
    samples = outcome_stream(300, 0.0)
    with pytest.raises(DataError, match="policy objective needs successful episodes") as err:
        mixed(ObjectiveMixer(PRETRAIN_MIX, 0.5, False, True), samples)
    assert "\n" not in str(err.value)
    out = mixed(ObjectiveMixer([0.0, 0.5, 0.5, 0.0, 0.0], 0.5, False, True, seed=1), samples)
    assert len(out) == len(samples) and not any(s for _, _, s in out)
    with pytest.raises(DataError, match="hold no samples"):
        mixed(ObjectiveMixer(PRETRAIN_MIX, 0.5, False, False), samples)


def test_mixer_with_unknown_counts_declares_a_missing_class_absent_after_stall_limit():
    """No failures in the data, counts unknown: after ``stall_limit`` consecutive samples without a
    failure, failures are taken as absent (one warning) and the successes that waited are used."""
    samples = outcome_stream(400, 1.0)
    with pytest.warns(UserWarning, match="no failed sample in 50 consecutive training samples") as caught:
        out = mixed(ObjectiveMixer(PRETRAIN_MIX, 0.5, None, None, seed=3, stall_limit=50, pool_size=1000), samples)
    assert len([w for w in caught if "objective mix" in str(w.message)]) == 1
    assert sorted(k for k, _, _ in out) == sorted(s["__key__"] for s in samples)  # the pool held them all
    assert all(s for _, _, s in out)
    # A pool smaller than the stall drops the oldest surplus while waiting (rejection sampling).
    with pytest.warns(UserWarning, match="no failed sample"):
        capped = mixed(ObjectiveMixer(PRETRAIN_MIX, 0.5, None, None, seed=3, stall_limit=50, pool_size=10), samples)
    assert len(samples) - 50 <= len(capped) < len(samples)

    failures = outcome_stream(400, 0.0)
    with pytest.warns(UserWarning, match="no successful sample in 50"):
        out = mixed(ObjectiveMixer([0.0, 0.5, 0.5, 0.0, 0.0], 0.5, None, None, stall_limit=50), failures)
    assert out and not any(s for _, _, s in out)
    # A policy mix on data that turns out to hold no success is refused, not silently trained on failures.
    with pytest.raises(DataError, match="policy objective needs successful episodes"):
        mixed(ObjectiveMixer(PRETRAIN_MIX, 0.5, None, None, stall_limit=50), failures)


def test_mixer_pools_drop_the_surplus_beyond_pool_size():
    """World-model samples from failures only (success_fraction 0) on 90%-success data: every failure is
    used once, in order; the waiting successes never come out."""
    samples = outcome_stream(1000, 0.9, seed=5)
    out = mixed(ObjectiveMixer([0.0, 1.0, 0.0, 0.0, 0.0], 0.0, True, True, pool_size=5), samples)
    assert [k for k, _, _ in out] == [s["__key__"] for s in samples if not read_meta(s)["success"]]
    assert {o for _, o, _ in out} == {WORLD_MODEL}


# ============================================================================ RoundRobinObjectives
def _expected_round_robin(toy, samples, objectives):
    """Independent reference: slot = shard index + position in shard; policy skipped for failures."""
    shard_index = {n: i for i, n in enumerate(toy.shard_names["validation"])}
    out, position = {}, collections.Counter()
    for s in samples:
        name = Path(s["__url__"]).name
        slot = shard_index[name] + position[name]
        position[name] += 1
        success = toy.records[s["__key__"]]["meta"]["success"]
        cycle = [objectives[(slot + k) % len(objectives)] for k in range(len(objectives))]
        usable = [o for o in cycle if o != POLICY or success]
        if usable:
            out[s["__key__"]] = usable[0]
    return out


def test_round_robin_cycles_over_the_objectives_by_shard_and_position(toy, raw):
    objectives = [POLICY, WORLD_MODEL, VALUE]
    stage = RoundRobinObjectives(objectives, toy.shard_names["validation"])
    out = list(stage.run(iter(fresh(raw["validation"]))))
    labels = {s["__key__"]: s["__objective__"] for s in out}
    assert labels == _expected_round_robin(toy, raw["validation"], objectives)
    assert len(out) == len(raw["validation"])  # with other objectives in the mix, failures are kept
    # Successful samples of one shard cycle policy -> world model -> value, starting at the shard's index.
    first = raw["validation"][:10]
    assert all(toy.records[s["__key__"]]["meta"]["success"] for s in first)
    assert [labels[s["__key__"]] for s in first] == [objectives[i % 3] for i in range(10)]
    counts = collections.Counter(labels.values())
    # Failures (21 of 54 samples) pass over the policy slot, so policy gets about a third of the successes.
    assert set(counts) == set(objectives) and min(counts.values()) >= 10
    assert all(toy.records[k]["meta"]["success"] for k, o in labels.items() if o == POLICY)


def test_round_robin_labels_do_not_depend_on_how_shards_are_split(toy, raw):
    objectives = [POLICY, WORLD_MODEL, VALUE]
    names = toy.shard_names["validation"]
    whole = {s["__key__"]: s["__objective__"]
             for s in RoundRobinObjectives(objectives, names).run(iter(fresh(raw["validation"])))}
    # Two "workers", each with every other shard, in reverse order.
    split = {}
    for part in (names[0::2][::-1], names[1::2][::-1]):
        samples = _read(toy.root / n for n in part)
        split.update((s["__key__"], s["__objective__"]) for s in RoundRobinObjectives(objectives, names).run(iter(samples)))
    assert split == whole


def test_round_robin_policy_only_skips_failures_and_without_policy_keeps_all(toy, raw):
    names = toy.shard_names["validation"]
    policy = list(RoundRobinObjectives([POLICY], names).run(iter(fresh(raw["validation"]))))
    assert [s["__key__"] for s in policy] == [s["__key__"] for s in raw["validation"]
                                              if toy.records[s["__key__"]]["meta"]["success"]]
    assert {s["__objective__"] for s in policy} == {POLICY}
    two = list(RoundRobinObjectives([WORLD_MODEL, VALUE_FUTURE], names).run(iter(fresh(raw["validation"]))))
    assert len(two) == len(raw["validation"])
    labels = {s["__key__"]: s["__objective__"] for s in two}
    assert labels == _expected_round_robin(toy, raw["validation"], [WORLD_MODEL, VALUE_FUTURE])
    assert {o for o in labels.values()} == {WORLD_MODEL, VALUE_FUTURE}


# ============================================================================ StreamPosition (resume)
def _training_chain(toy, normalizers, samples, position):
    """Shuffle -> ObjectiveMixer -> SampleDecoder(augment), the training stages sharing one position."""
    stages = [Shuffle(40, 7, 0, position),
              ObjectiveMixer(PRETRAIN_MIX, 0.5, True, True, seed=7, pool_size=40, position=position),
              decoder(toy, normalizers, "augment", seed=7, position=position)]
    return stages, lambda: list(stages[2].run(stages[1].run(stages[0].run(iter(fresh(samples))))))


def test_a_resumed_position_draws_a_new_stream_and_a_fresh_one_is_unchanged(toy, normalizers, raw):
    samples = raw["train"]
    fresh_run = _training_chain(toy, normalizers, samples, None)[1]()
    at_zero = _training_chain(toy, normalizers, samples, StreamPosition(0))[1]()
    summary = lambda out: [(d["episode"], d["step"], d["objective"]) for d in out]  # noqa: E731
    assert summary(at_zero) == summary(fresh_run)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(at_zero, fresh_run))

    # The data module builds the stages first and sets the start when the checkpoint is loaded (before
    # the first batch): the stages read the shared position when they start iterating.
    position = StreamPosition(0)
    _, run = _training_chain(toy, normalizers, samples, position)
    position.start = 12
    resumed = run()
    assert summary(resumed) == summary(_training_chain(toy, normalizers, samples, StreamPosition(12))[1]())
    # Not a replay of steps 0, 1, 2...: other order, other objectives, other augmentation of a sample.
    assert summary(resumed)[:16] != summary(fresh_run)[:16]
    by_key = {(d["episode"], d["step"]): d for d in fresh_run}
    common = [(d, by_key[(d["episode"], d["step"])]) for d in resumed if (d["episode"], d["step"]) in by_key]
    assert common and all(not torch.equal(a["images"], b["images"]) for a, b in common[:5])
    # ... but the same sampler: policy samples still come from successes only.
    assert all(d["success"] for d in resumed if d["objective"] == POLICY)
    assert repr(position) == "StreamPosition(start=12)"


# ============================================================================ decoding
def test_decode_images_stacks_current_then_future_cameras(toy, raw):
    sample = raw["train"][13]
    rec = toy.records[sample["__key__"]]
    future = toy.records[S.sample_key(rec["meta"]["episode"], rec["meta"]["future_step"])]
    assert rec["meta"]["future_step"] != rec["meta"]["step"]
    pixels = decode_images(sample, ["wrist", "front"], (32, 32))
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 32, 32, 3)
    stored = np.stack(rec["images"] + future["images"]).astype(np.float64)
    errors = np.abs(pixels.numpy().astype(np.float64) - stored).mean(axis=(1, 2, 3))
    assert (errors < 3.0).all()  # JPEG q95 error only
    swapped = decode_images(sample, ["front", "wrist"], (32, 32))
    assert torch.equal(swapped, pixels[[1, 0, 3, 2]])


def test_sample_decoder_gives_the_batch_contract_with_normalised_vectors(toy, normalizers, raw):
    dec = decoder(toy, normalizers, "none")
    encoder = HashTextEncoder()
    for sample in fresh(raw["train"][::9]):
        sample["__objective__"] = VALUE
        out = dec.decode(sample)
        rec = toy.records[sample["__key__"]]
        meta = rec["meta"]
        assert set(out) == set(BATCH_KEYS) - {"text_mask"}
        assert out["images"].dtype == torch.uint8 and out["images"].shape == (2, 32, 32, 3)
        assert out["future_images"].dtype == torch.uint8 and out["future_images"].shape == (2, 32, 32, 3)
        assert torch.equal(torch.cat([out["images"], out["future_images"]]),
                           decode_images(sample, ["wrist", "front"], (32, 32)))
        for key, raw_key, norm, shape in (("proprio", "proprio", "proprio", (3,)),
                                          ("future_proprio", "future_proprio", "proprio", (3,)),
                                          ("actions", "actions", "action", (4, 2))):
            assert out[key].dtype == torch.float32 and out[key].shape == shape, key
            np.testing.assert_allclose(out[key].numpy(), normalizers[norm].normalize(rec[raw_key]), atol=1e-6)
            assert out[key].abs().max() <= 1.0 + 1e-6 or not meta["success"]  # successes span [-1, 1]
        assert out["value"] == pytest.approx(meta["value"]) and isinstance(out["value"], float)
        assert (out["objective"], out["success"], out["score"]) == (VALUE, meta["success"], meta["score"])
        assert (out["episode"], out["step"]) == (meta["episode"], meta["step"])
        want = encoder.encode([meta["instruction"]])[0].astype(np.float16).astype(np.float32)
        assert out["text"].dtype == torch.float32 and torch.equal(out["text"], torch.from_numpy(want))
    short = decoder(toy, normalizers, "none", max_text_tokens=2).decode({**sample, "__objective__": POLICY})
    assert short["text"].shape == (2, 8) and torch.equal(short["text"], out["text"][:2])


def test_centre_mode_is_the_deterministic_test_transform(toy, normalizers, raw):
    sample = dict(raw["validation"][4], __objective__=POLICY)
    pixels = decode_images(sample, ["wrist", "front"], (32, 32))
    a = decoder(toy, normalizers, "center").decode(dict(sample))
    b = decoder(toy, normalizers, "center", seed=99).decode(dict(sample))
    both = torch.cat([a["images"], a["future_images"]])
    assert torch.equal(both, torch.cat([b["images"], b["future_images"]]))
    assert torch.equal(both, centre_crop(pixels))
    assert torch.equal(both, apply_uint8(pixels, center_crop_params((32, 32))))
    assert not torch.equal(both, pixels)
    none = decoder(toy, normalizers, "none").decode(dict(sample))
    assert all(torch.equal(a[k], none[k]) for k in ("proprio", "future_proprio", "actions", "text"))


def test_augment_mode_draws_one_parameter_set_per_sample(toy, normalizers, raw):
    # The last step of an episode: its future frame is itself, so current and future images are the
    # same JPEGs and one shared parameter set must give identical augmented images.
    last = next(s for s in raw["train"] if read_meta(dict(s))["step"] == read_meta(dict(s))["length"] - 1)
    sample = dict(last, __objective__=WORLD_MODEL)
    run = lambda seed: list(decoder(toy, normalizers, "augment", seed=seed).run(  # noqa: E731
        iter([dict(sample), dict(sample), dict(sample)])))
    first = run(3)
    for out in first:
        assert out["images"].dtype == torch.uint8 and out["images"].shape == (2, 32, 32, 3)
        assert torch.equal(out["images"], out["future_images"])
    assert not torch.equal(first[0]["images"], first[1]["images"])     # another draw per sample
    assert not torch.equal(first[1]["images"], first[2]["images"])
    again = run(3)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, again))  # seeded
    assert not torch.equal(run(4)[0]["images"], first[0]["images"])
    plain = decoder(toy, normalizers, "none").decode(dict(sample))
    assert not torch.equal(first[0]["images"], plain["images"])
    for key in ("proprio", "future_proprio", "actions", "text"):       # only the images are augmented
        assert torch.equal(first[0][key], plain[key])
    with pytest.raises(ValueError, match="mode must be augment, center or none"):
        decoder(toy, normalizers, "random")


def _truncated_jpeg(sample):
    data = sample[S.image_member("front")]
    return {**sample, S.image_member("front"): data[: len(data) // 2]}


def _drop(member):
    return lambda s: {k: v for k, v in s.items() if k != member}


def _with_meta(**changes):
    return lambda s: {**s, S.META: json.dumps({**json.loads(s[S.META]), **changes}).encode()}


MALFORMED = {
    "missing camera": (_drop(S.image_member("front")), S.image_member("front"), "missing member"),
    "missing future camera": (_drop(S.image_member("wrist", True)), S.image_member("wrist", True), "missing member"),
    "truncated jpeg": (_truncated_jpeg, S.image_member("front"), "is not a readable JPEG"),
    "not a jpeg": (lambda s: {**s, S.image_member("wrist"): b"\x00" * 64}, S.image_member("wrist"),
                   "is not a readable JPEG"),
    "wrong image size": (lambda s: {**s, S.image_member("front"): _jpeg(np.zeros((16, 24, 3), np.uint8))},
                         S.image_member("front"), "is 16x24, expected the embodiment's image_size 32x32"),
    "missing proprio": (_drop(S.PROPRIO), S.PROPRIO, "missing member"),
    "wrong proprio shape": (lambda s: {**s, S.PROPRIO: _npy(np.zeros(4, np.float32))}, S.PROPRIO,
                            "has shape (4,), expected (3,)"),
    "wrong action shape": (lambda s: {**s, S.ACTIONS: _npy(np.zeros((3, 2), np.float32))}, S.ACTIONS,
                           "has shape (3, 2), expected (4, 2)"),
    "not an npy": (lambda s: {**s, S.ACTIONS: b"garbage"}, S.ACTIONS, "is not a .npy array"),
    "nan": (lambda s: {**s, S.FUTURE_PROPRIO: _npy(np.array([0.0, np.nan, 1.0], np.float32))}, S.FUTURE_PROPRIO,
            "contains NaN or inf"),
    "value above 1": (_with_meta(value=1.5), S.META, "value 1.5 outside [-1, 1]"),
    "missing meta": (_drop(S.META), S.META, "missing member"),
    "unknown instruction": (_with_meta(instruction="juggle three balls"), "juggle three balls",
                            "no text embedding cached"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_sample_is_a_one_line_error_naming_shard_key_and_member(toy, normalizers, raw, case):
    mutate, member, fragment = MALFORMED[case]
    sample = mutate(dict(raw["train"][21], __objective__=WORLD_MODEL))
    with pytest.raises(DataError) as err:
        decoder(toy, normalizers, "none").decode(sample)
    msg = str(err.value)
    assert msg.startswith(f"{toy.shard_names['train'][2]}: sample {sample['__key__']}: "), msg
    assert member in msg and fragment in msg and "\n" not in msg


def test_a_non_numeric_npy_member_is_a_data_error(toy, normalizers, raw):
    sample = dict(raw["train"][21], __objective__=WORLD_MODEL, **{S.PROPRIO: _npy(np.array(["a", "b", "c"]))})
    with pytest.raises(DataError, match=S.PROPRIO.replace(".", r"\.")):
        decoder(toy, normalizers, "none").decode(sample)


# ============================================================================ LatentSampleDecoder
@pytest.fixture(scope="module")
def latent_shard(toy, raw, tmp_path_factory):
    """A hand-made latent-cache shard (data/latent_cache.py's members) for 4 real training samples:
    ``latents.npy`` (3 views, 16, F kept frames, 4, 4) float16 plus the pixel sample's vectors and meta."""
    layout = SequenceLayout.from_embodiment(toy.embodiment)
    frames = kept_frames(layout)
    path = tmp_path_factory.mktemp("latents") / toy.shard_names["train"][0]
    rng = np.random.default_rng(0)
    views = {}
    with wds.TarWriter(str(path)) as sink:
        for s in raw["train"][:4]:
            views[s["__key__"]] = rng.standard_normal((3, 16, len(frames), 4, 4)).astype(np.float16)
            sink.write({"__key__": s["__key__"], LATENTS: _npy(views[s["__key__"]]),
                        **{m: s[m] for m in (S.PROPRIO, S.FUTURE_PROPRIO, S.ACTIONS, S.META)}})
    return path, layout, frames, views


def _latent_decoder(toy, normalizers, latent_shard, mode, **kw):
    _, layout, frames, _ = latent_shard
    return decoder(toy, normalizers, mode, cls=LatentSampleDecoder, layout_frames=frames,
                   num_latent_frames=layout.num_latent_frames, **kw)


def test_latent_decoder_puts_the_kept_frames_at_their_layout_positions(toy, normalizers, raw, latent_shard):
    path, layout, frames, views = latent_shard
    samples = _read([path])
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in raw["train"][:4]]
    assert S.image_member("front") not in samples[0]
    dropped = [i for i in range(layout.num_latent_frames) if i not in frames]
    assert frames and dropped  # the proprio / action / value frames are not stored
    pixel_decoder = decoder(toy, normalizers, "none")
    for mode in ("none", "center"):
        dec = _latent_decoder(toy, normalizers, latent_shard, mode)
        for s, pixel in zip(fresh(samples), fresh(raw["train"][:4])):
            out = dec.decode(dict(s, __objective__=VALUE))
            lat = out["latents"]
            assert lat.dtype == torch.float32 and lat.shape == (16, layout.num_latent_frames, 4, 4)
            assert torch.equal(lat[:, frames], torch.from_numpy(views[s["__key__"]][0].astype(np.float32)))
            assert not lat[:, dropped].any()
            assert "images" not in out and "future_images" not in out
            vectors = pixel_decoder.decode_vectors(dict(pixel, __objective__=VALUE))
            for key in ("proprio", "future_proprio", "actions", "text"):
                assert torch.equal(out[key], vectors[key]), key
            assert (out["episode"], out["step"], out["objective"]) == (vectors["episode"], vectors["step"], VALUE)


def test_latent_decoder_in_augment_mode_draws_stored_views(toy, normalizers, latent_shard):
    path, _, frames, views = latent_shard
    samples = [dict(s, __objective__=WORLD_MODEL) for s in _read([path]) * 6]
    drawn = collections.Counter()
    for s, out in zip(samples, _latent_decoder(toy, normalizers, latent_shard, "augment", seed=1).run(iter(samples))):
        stored = torch.from_numpy(views[s["__key__"]].astype(np.float32))
        matches = [v for v in range(3) if torch.equal(out["latents"][:, frames], stored[v])]
        assert len(matches) == 1
        drawn[matches[0]] += 1
    assert set(drawn) == {0, 1, 2}  # 24 draws over 3 views


def test_latent_decoder_errors_name_the_member(toy, normalizers, raw, latent_shard):
    path = latent_shard[0]
    dec = _latent_decoder(toy, normalizers, latent_shard, "none")
    pixel = dict(raw["train"][0], __objective__=VALUE)
    with pytest.raises(DataError, match=r"missing member latents\.npy \(is this a latent cache shard\?\)") as err:
        dec.decode(pixel)
    assert str(err.value).startswith(f"{toy.shard_names['train'][0]}: sample {pixel['__key__']}: ")
    sample = dict(_read([path])[0], __objective__=VALUE)
    sample[LATENTS] = _npy(np.zeros((1, 16, len(latent_shard[2]) + 1, 4, 4), np.float16))
    with pytest.raises(DataError, match=r"latents\.npy has shape \(1, 16, 6, 4, 4\), expected \(views, C, 5, h, w\)"):
        dec.decode(sample)
    bad = np.zeros((1, 16, len(latent_shard[2]), 4, 4), np.float16)
    bad[0, 3, 1, 2, 2] = np.inf  # a float16 overflow
    sample[LATENTS] = _npy(bad)
    with pytest.raises(DataError, match=r"latents\.npy view 0 contains NaN or inf; rebuild the latent cache"):
        dec.decode(sample)


# ============================================================================ collate
def test_collate_stacks_and_pads_text_to_the_longest_instruction(toy, normalizers, raw):
    dec = decoder(toy, normalizers, "none")
    picks = [s for s in raw["train"] if read_meta(dict(s))["step"] == 1]  # one sample per episode
    samples = [dec.decode(dict(s, __objective__=i % 3)) for i, s in enumerate(picks)]
    batch = collate(samples)
    b = len(samples)
    assert b == 8 and set(batch) == set(BATCH_KEYS)
    for key, dtype, shape in (("images", torch.uint8, (b, 2, 32, 32, 3)), ("future_images", torch.uint8, (b, 2, 32, 32, 3)),
                              ("proprio", torch.float32, (b, 3)), ("future_proprio", torch.float32, (b, 3)),
                              ("actions", torch.float32, (b, 4, 2)), ("value", torch.float32, (b,)),
                              ("objective", torch.int64, (b,)), ("success", torch.bool, (b,)),
                              ("score", torch.float32, (b,)), ("step", torch.int64, (b,)),
                              ("text", torch.float32, (b, 6, 8)), ("text_mask", torch.bool, (b, 6))):
        assert batch[key].dtype == dtype and batch[key].shape == shape, key
    for i, s in enumerate(samples):
        for key in ("images", "future_images", "proprio", "future_proprio", "actions"):
            assert torch.equal(batch[key][i], s[key]), key
        assert batch["value"][i].item() == pytest.approx(s["value"])
        assert (batch["objective"][i].item(), batch["success"][i].item(), batch["step"][i].item()) == \
            (s["objective"], s["success"], s["step"])
        n = s["text"].shape[0]
        assert n in (4, 6)  # "push the block" / "open the top drawer slowly" + the end token
        assert batch["text_mask"][i].tolist() == [True] * n + [False] * (6 - n)
        assert torch.equal(batch["text"][i, :n], s["text"]) and not batch["text"][i, n:].any()
    assert batch["episode"] == [s["episode"] for s in samples]
    assert {s["text"].shape[0] for s in samples} == {4, 6}
    # A batch of short instructions only is padded to its own longest, not to a global length.
    short = [s for s in samples if s["text"].shape[0] == 4]
    assert collate(short)["text"].shape == (len(short), 4, 8) and collate(short)["text_mask"].all()


def test_collate_latent_and_text_free_batches(toy, normalizers, latent_shard):
    path, layout, _, _ = latent_shard
    dec = _latent_decoder(toy, normalizers, latent_shard, "none")
    samples = [dec.decode(dict(s, __objective__=POLICY)) for s in _read([path])]
    batch = collate(samples)
    assert set(batch) == (set(BATCH_KEYS) - {"images", "future_images"}) | {"latents"}
    assert batch["latents"].dtype == torch.float32
    assert batch["latents"].shape == (4, 16, layout.num_latent_frames, 4, 4)
    assert all(torch.equal(batch["latents"][i], s["latents"]) for i, s in enumerate(samples))
    # A dataset converted without text: (0, 0) embeddings give (B, 0, 0) text and a (B, 0) mask.
    text_free = collate([{**s, "text": torch.zeros(0, 0)} for s in samples])
    assert text_free["text"].shape == (4, 0, 0) and text_free["text_mask"].shape == (4, 0)
    assert text_free["text_mask"].dtype == torch.bool
