"""`cosmos-policy convert --format robomimic`: samples, padding, values, statistics, split, manifest,
interleaving, several files, instructions."""

import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.normalization import DatasetStats, fingerprint

from ..fixtures.convert_checks import check_conversion
from ..fixtures.factories import (ACTION_DIM, GAMMA, K, PROPRIO_DIM, EpisodeSpec, episode_arrays, proprio_of, read_split,
                        write_embodiment, write_robomimic)

SPECS = [EpisodeSpec(7, 1), EpisodeSpec(5, 2, success=False), EpisodeSpec(9, 3), EpisodeSpec(2, 4),
         EpisodeSpec(6, 5, success=False)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("robomimic")
    emb = write_embodiment(root)
    src = write_robomimic(root / "demos.hdf5", SPECS, problem_instruction="stack the red block")
    out = root / "out"
    manifest = convert(str(src), output=str(out), embodiment=str(emb), format="robomimic", val_fraction=0.4,
                       shard_size_mb=0.12, text_encoder="none", progress=False)
    return out, manifest


def test_every_step_becomes_one_correct_sample(converted):
    out, _ = converted
    episodes = {f"demo_{i}": spec for i, spec in enumerate(SPECS)}
    check_conversion(out, episodes, chunk_size=K, gamma=GAMMA,
                     instructions={e: "stack the red block" for e in episodes})


def test_future_images_reuse_the_frame_of_the_clamped_future_step(converted):
    out, _ = converted
    samples = read_split(out, "train") + read_split(out, "validation")
    by_key = {s["__key__"]: s for s in samples}
    for s in samples:
        meta = json.loads(s[S.META])
        other = by_key[S.sample_key(meta["episode"], meta["future_step"])]
        for cam in ("wrist", "front"):
            assert s[S.image_member(cam, future=True)] == other[S.image_member(cam)]


def test_split_manifest_and_shard_counts(converted):
    out, manifest = converted
    assert manifest == json.loads((out / S.MANIFEST).read_text())
    splits = manifest["splits"]
    assert len(splits["validation"]) == 2 and len(splits["train"]) == 3  # round(0.4 * 5)
    assert not set(splits["train"]) & set(splits["validation"])
    lengths = {f"demo_{i}": s.length for i, s in enumerate(SPECS)}
    for split in S.SPLITS:
        c = manifest["counts"][split]
        ids = splits[split]
        assert c["episodes"] == len(ids)
        assert c["samples"] == sum(lengths[i] for i in ids) == len(read_split(out, split))
        assert c["successes"] == sum(SPECS[int(i.split("_")[1])].success for i in ids)
        assert c["failures"] == c["episodes"] - c["successes"]
    assert manifest["counts"]["bad_episodes"] == 0
    assert manifest["source"]["format"] == "robomimic" and manifest["embodiment"]["name"] == "toy"
    assert manifest["settings"]["chunk_size"] == K and manifest["settings"]["shard_size_mb"] == 0.12
    # every listed shard exists, holds exactly its episodes' samples, and nothing else is there
    listed = {s["name"] for s in manifest["shards"]}
    assert listed == {p.name for p in out.glob("*.tar")}
    assert len(listed) >= 3  # the small shard size splits the train episodes
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            keys = Counter(m.name.split(".", 1)[0] for m in tar.getmembers())
        assert len(keys) == shard["samples"] == sum(lengths[e] for e in shard["episodes"])
        assert all(n == 2 * 2 + 4 for n in keys.values())  # 2 cameras x 2 times + 3 npy + meta
        assert all(shard["name"].startswith(manifest["episodes"][e]["split"]) for e in shard["episodes"])
    assert not (out / ".work").exists()
    assert not list(out.glob(".*.tmp"))


def test_statistics_match_numpy_over_training_episodes(converted):
    out, manifest = converted
    stats = DatasetStats.load(out / S.STATS)
    train = manifest["splits"]["train"]
    assert stats.fingerprint == manifest["stats_fingerprint"] == fingerprint(ACTION_DIM, PROPRIO_DIM, K, train)
    arrays = {e: episode_arrays(SPECS[int(e.split("_")[1])]) for e in train}
    successful = [e for e in train if SPECS[int(e.split("_")[1])].success]
    for which, ids in (("all", train), ("successful", successful)):
        for modality, get in (("action", lambda a: a["actions"]), ("proprio", proprio_of)):
            data = np.concatenate([get(arrays[e]) for e in ids]).astype(np.float64)
            st = getattr(stats, which)[modality]
            assert st.count == data.shape[0]
            np.testing.assert_allclose(st.min, data.min(0))
            np.testing.assert_allclose(st.max, data.max(0))
            np.testing.assert_allclose(st.mean, data.mean(0), rtol=1e-6)
            np.testing.assert_allclose(st.std, data.std(0), rtol=1e-6)
            np.testing.assert_allclose(st.q01, np.quantile(data, 0.01, axis=0))
            np.testing.assert_allclose(st.q99, np.quantile(data, 0.99, axis=0))


def test_shards_interleave_episodes(tmp_path):
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(12, s) for s in range(3)]
    src = write_robomimic(tmp_path / "d.hdf5", specs)
    convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), val_fraction=0.0, text_encoder="none",
            progress=False)
    samples = read_split(tmp_path / "o", "train")
    assert len(list((tmp_path / "o").glob("train-*.tar"))) == 1
    episodes = [s["__key__"].rsplit("_", 1)[0] for s in samples]
    switches = sum(a != b for a, b in zip(episodes, episodes[1:]))
    assert switches > 6  # grouped by episode would give 2
    for e in set(episodes):  # each episode's steps stay in order
        steps = [int(s["__key__"].rsplit("_", 1)[1]) for s in samples if s["__key__"].startswith(e + "_")]
        assert steps == sorted(steps) == list(range(12))


def test_several_files_explicit_validation_and_filename_instructions(tmp_path):
    emb = write_embodiment(tmp_path)
    write_robomimic(tmp_path / "src" / "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", [EpisodeSpec(5, 1), EpisodeSpec(4, 2)])
    write_robomimic(tmp_path / "src" / "open_the_drawer_demo.hdf5", [EpisodeSpec(6, 3, instruction="open it")])
    manifest = convert(str(tmp_path / "src" / "*.hdf5"), output=str(tmp_path / "o"), embodiment=str(emb),
                       val_episodes=["open_the_drawer_demo-demo_0"], text_encoder="none", progress=False)
    ids = {"KITCHEN_SCENE3_turn_on_the_stove_demo-demo_0", "KITCHEN_SCENE3_turn_on_the_stove_demo-demo_1",
           "open_the_drawer_demo-demo_0"}
    assert set(manifest["episodes"]) == ids
    assert manifest["splits"]["validation"] == ["open_the_drawer_demo-demo_0"]
    instr = {e: v["instruction"] for e, v in manifest["episodes"].items()}
    assert instr["KITCHEN_SCENE3_turn_on_the_stove_demo-demo_1"] == "turn on the stove"
    assert instr["open_the_drawer_demo-demo_0"] == "open it"  # a demo attribute wins over the file name
    assert manifest["instructions"] == ["open it", "turn on the stove"]


def test_minilm_text_embeddings_cached_per_instruction(tmp_path):
    from cosmos_policy_lightning.text import TextEmbeddingCache

    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "d.hdf5", [EpisodeSpec(3, 1, instruction="push the cube"),
                                                EpisodeSpec(3, 2, instruction="push the cube"),
                                                EpisodeSpec(3, 3, instruction="pull the lever")])
    manifest = convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), val_fraction=0.0,
                       text_encoder="minilm", progress=False)
    cache = TextEmbeddingCache(tmp_path / "o" / S.TEXT_DIR)
    assert manifest["text_encoder"] == cache.identity and cache.identity.startswith("minilm")
    assert sorted(cache.instructions) == ["pull the lever", "push the cube"]
    a, b = cache.get("push the cube"), cache.get("pull the lever")
    assert a.ndim == 2 and a.shape[1] == cache.dim == 384 and np.isfinite(a).all()
    assert not np.allclose(a.mean(0), b.mean(0))
