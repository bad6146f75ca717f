"""`--format episode_hdf5`: ALOHA files (image arrays, JPEG byte strings, padded JPEG rows), rollout
files with success / success_score / task_description attributes, and every success-label source."""

import json

import numpy as np
import pytest

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from ..fixtures.convert_checks import check_conversion
from ..fixtures.factories import (GAMMA, K, EpisodeSpec, decode_sample, read_split, write_embodiment, write_episode_dir,
                        write_episode_hdf5)


def _convert(src, tmp_path, **kw):
    emb = write_embodiment(tmp_path / "emb")
    kw = {"val_fraction": 0.0, "text_encoder": "none", "progress": False, **kw}
    return convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), format="episode_hdf5", **kw)


@pytest.mark.parametrize("images", ["array", "jpeg", "padded"])
def test_aloha_layout_with_every_image_storage(tmp_path, images):
    specs = [EpisodeSpec(6, 1), EpisodeSpec(3, 2)]
    src = write_episode_dir(tmp_path / "aloha_transfer_cube", specs, images=images)
    manifest = _convert(src, tmp_path, all_success=True)
    check_conversion(tmp_path / "out", {f"episode_{i}": s for i, s in enumerate(specs)}, chunk_size=K, gamma=GAMMA,
                     instructions={"episode_0": "aloha transfer cube", "episode_1": "aloha transfer cube"},
                     image_tolerance=8.0 if images != "array" else 6.0)
    assert manifest["counts"]["train"]["samples"] == 9


def test_rollout_attributes_give_success_fractional_score_and_instruction(tmp_path):
    specs = [EpisodeSpec(5, 1, success=True, instruction="fold the towel"),
             EpisodeSpec(6, 2, success=False, instruction="fold the towel"),
             EpisodeSpec(4, 3, success=False, score=0.5, instruction="hang the cup")]
    src = write_episode_dir(tmp_path / "rollouts", specs, rollout_attrs=True)
    manifest = _convert(src, tmp_path)
    samples = check_conversion(tmp_path / "out", {f"episode_{i}": s for i, s in enumerate(specs)}, chunk_size=K,
                               gamma=GAMMA, instructions={"episode_0": "fold the towel", "episode_1": "fold the towel",
                                                          "episode_2": "hang the cup"})
    last = {s["meta.json"]["episode"]: s["meta.json"]["value"] for s in samples["train"]
            if s["meta.json"]["future_step"] == s["meta.json"]["length"] - 1}
    assert last["episode_0"] == pytest.approx(1.0)
    assert last["episode_1"] == pytest.approx(-1.0)
    assert last["episode_2"] == pytest.approx(0.0)  # half success ends halfway
    assert manifest["counts"]["train"]["successes"] == 1 and manifest["counts"]["train"]["failures"] == 2


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_sidecar_labels(tmp_path, kind):
    specs = [EpisodeSpec(4, 1), EpisodeSpec(4, 2), EpisodeSpec(4, 3)]
    src = write_episode_dir(tmp_path / "eps", specs)
    if kind == "json":
        side = tmp_path / "labels.json"
        side.write_text(json.dumps({"episode_0": True, "episode_1.hdf5": {"success": False, "instruction": "wave"},
                                    "episode_2": 0.25}))
    else:
        side = tmp_path / "labels.csv"
        side.write_text("episode,success,score,instruction\nepisode_0,yes,,\nepisode_1,0,,wave\nepisode_2,,0.25,\n")
    _convert(src, tmp_path, success_sidecar=str(side), instruction="do it")
    check_conversion(tmp_path / "out", {f"episode_{i}": s for i, s in enumerate(specs)}, chunk_size=K, gamma=GAMMA,
                     successes={"episode_0": True, "episode_1": False, "episode_2": False},
                     scores={"episode_0": 1.0, "episode_1": 0.0, "episode_2": 0.25},
                     instructions={"episode_0": "do it", "episode_1": "wave", "episode_2": "do it"})


def test_sidecar_without_an_episode_is_an_error(tmp_path):
    src = write_episode_dir(tmp_path / "eps", [EpisodeSpec(4, 1), EpisodeSpec(4, 2)])
    side = tmp_path / "labels.json"
    side.write_text(json.dumps({"episode_0": True}))
    with pytest.raises(DataError, match="labels.json: no success entry for episode episode_1"):
        _convert(src, tmp_path, success_sidecar=str(side))


def test_path_regex_labels_with_score_group(tmp_path):
    write_episode_hdf5(tmp_path / "eps" / "success" / "run_a.hdf5", EpisodeSpec(4, 1))
    write_episode_hdf5(tmp_path / "eps" / "failure" / "run_b.hdf5", EpisodeSpec(4, 2))
    write_episode_hdf5(tmp_path / "eps" / "partial_0.75" / "run_c.hdf5", EpisodeSpec(4, 3))
    manifest = _convert(tmp_path / "eps", tmp_path, success_regex=r"/(success|partial_(?P<score>[0-9.]+))/")
    ep = manifest["episodes"]
    assert (ep["run_a"]["success"], ep["run_a"]["score"]) == (True, 1.0)
    assert (ep["run_b"]["success"], ep["run_b"]["score"]) == (False, 0.0)
    assert (ep["run_c"]["success"], ep["run_c"]["score"]) == (False, 0.75)


def test_rewards_label_success_and_missing_labels_are_reported(tmp_path):
    import h5py

    src = write_episode_dir(tmp_path / "eps", [EpisodeSpec(4, 1), EpisodeSpec(4, 2)])
    with pytest.raises(DataError, match=r"episode_0\.hdf5: episode episode_0: no success label .*--all_success"):
        _convert(src, tmp_path)
    with h5py.File(src / "episode_0.hdf5", "a") as f:
        f["reward"] = np.array([0, 0, 0, 1.0])
    with h5py.File(src / "episode_1.hdf5", "a") as f:
        f["reward"] = np.array([0, 1.0, 0, 0])
    manifest = _convert(src, tmp_path)
    assert manifest["episodes"]["episode_0"]["success"] and not manifest["episodes"]["episode_1"]["success"]


def test_swap_rb_swaps_red_and_blue(tmp_path):
    src = write_episode_dir(tmp_path / "eps", [EpisodeSpec(3, 1)])
    _convert(src, tmp_path, all_success=True)
    plain = decode_sample(read_split(tmp_path / "out", "train")[0])["image.front.jpg"].astype(int)
    _convert(src, tmp_path / "b", all_success=True, swap_rb=True)
    swapped = decode_sample(read_split(tmp_path / "b" / "out", "train")[0])["image.front.jpg"].astype(int)
    assert np.abs(plain[..., ::-1] - swapped).mean() < 3 < np.abs(plain - swapped).mean()


def test_step_stride_keeps_every_episode_and_full_rate_targets(tmp_path):
    """`--step_stride 3`: samples at t = 0, 3, 6, ... of every episode; the chunk and the future frame of
    each still come from the full-rate episode (t + 1 ... t + K, t' = min(t + K, T - 1)), the statistics
    from all steps."""
    specs = [EpisodeSpec(7, 1), EpisodeSpec(4, 2, success=False)]
    src = write_episode_dir(tmp_path / "eps", specs, rollout_attrs=True)
    manifest = _convert(src, tmp_path, step_stride=3)
    metas = [decode_sample(s)["meta.json"] for s in read_split(tmp_path / "out", "train")]
    steps = sorted((m["episode"], m["step"], m["future_step"]) for m in metas)
    assert steps == [("episode_0", 0, K), ("episode_0", 3, min(3 + K, 6)), ("episode_0", 6, 6),
                     ("episode_1", 0, min(K, 3)), ("episode_1", 3, 3)]
    assert manifest["counts"]["train"]["samples"] == 5 and manifest["counts"]["train"]["episodes"] == 2
    assert manifest["settings"]["step_stride"] == 3
    strided = json.loads((tmp_path / "out" / "stats.json").read_text())
    _convert(src, tmp_path / "all")
    full = json.loads((tmp_path / "all" / "out" / "stats.json").read_text())
    assert strided["all"] == full["all"] and strided["successful"] == full["successful"]
    with pytest.raises(DataError, match="--step_stride: expected an integer >= 1, got 0"):
        _convert(src, tmp_path / "zero", step_stride=0)
