"""Closed-loop evaluation in Meta-World (real MuJoCo): one short episode of a tiny checkpoint end to end,
the recorded rollout HDF5 converting with ``--format episode_hdf5``, planning mode, the expert and
random baselines, and the Wilson interval."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim.evaluate import latency_summary, wilson_interval

from ..conftest import EMBODIMENTS

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def ckpt(metaworld_checkpoint):
    return metaworld_checkpoint


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(CosmosPolicyError):
        wilson_interval(3, 2)
    s = latency_summary([0.1, 0.2, 0.3, 0.4])
    assert s["calls"] == 4 and s["mean_s"] == pytest.approx(0.25) and s["p50_s"] == pytest.approx(0.25)


def test_one_episode_end_to_end_records_an_hdf5_that_converts(ckpt, tmp_path):
    out = tmp_path / "eval"
    rc = main(["evaluate", "metaworld", "--checkpoint", str(ckpt), "--tasks", "reach-v3", "--episodes", "1",
               "--max-steps", "12", "--num-steps", "2", "--record-hdf5", "true", "--videos", "1",
               "--output", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    task = res["tasks"]["reach-v3"]
    assert task["episodes"] == 1 and res["episodes"][0]["length"] == 12 == task["mean_length"]
    assert task["latency"]["calls"] == 2 and task["latency"]["p95_s"] > 0   # 12 steps, chunks of 8 executed
    assert res["overall"]["warmup_s"] > 0 and 0 <= task["ci95"][0] <= task["success_rate"] <= task["ci95"][1] <= 1
    values = res["episodes"][0]["values"]
    assert [s for s, _ in values] == [0, 8] and all(0 <= v <= 1 for _, v in values)
    gif = Image.open(out / "videos" / "reach-v3-ep000.gif")
    assert gif.n_frames == 12 and gif.size == (2 * 64 * 3, 64 * 3)
    assert (out / "values-reach-v3.png").stat().st_size > 1000
    # calibration against the realised return of the one (failed or successful) episode, and the ranking,
    # undefined with a single episode
    calib = task["value_calibration"]
    assert calib["samples"] == 2 and sum(calib["counts"]) == 2 and 0 <= calib["ece"] <= 1
    assert task["value_ranking"] == {"accuracy": None, "pairs": 0}
    assert (out / "calibration-reach-v3.png").stat().st_size > 1000

    path = out / "rollouts" / "reach-v3" / "reach-v3-ep000.hdf5"
    with h5py.File(path) as f:
        assert bool(f.attrs["success"]) == res["episodes"][0]["success"]
        assert f.attrs["task_description"] == "reach the goal position"
        assert f["observations/images/corner"].shape == (12, 64, 64, 3)
        assert f["observations/qpos"].shape == (12, 4) and f["action"].shape == (12, 4)
        assert np.abs(f["action"][()]).max() <= 1.0

    from cosmos_policy_lightning.data.convert import convert

    convert(str(out / "rollouts"), output=str(tmp_path / "shards"), embodiment=str(EMBODIMENTS / "metaworld.yaml"),
            format="episode_hdf5", text_encoder="none", val_fraction=0.0, progress=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["train"]["samples"] == 12
    ep = manifest["episodes"]["reach-v3-ep000"]
    assert ep["success"] == res["episodes"][0]["success"] and ep["instruction"] == "reach the goal position"


def test_planning_mode_runs_the_planner_per_chunk(ckpt, tmp_path):
    from cosmos_policy_lightning.sim.evaluate import evaluate

    res = evaluate("metaworld", ckpt, tasks=["reach-v3"], episodes=1, max_steps=8, planning=True, num_proposals=2,
                             num_futures=2, num_values=2, num_steps=1, output=tmp_path / "plan", videos=0)
    assert res["config"]["policy"] == "planning" and res["config"]["num_proposals"] == 2
    assert res["tasks"]["reach-v3"]["latency"]["calls"] == 1
    assert len(res["episodes"][0]["values"]) == 1


def test_a_planning_checkpoint_alone_turns_planning_on_as_in_serve(ckpt, tmp_path):
    # the rule of inference/options.py PolicyOptions.plans: no --planning needed with --planning_checkpoint
    assert main(["evaluate", "metaworld", "--checkpoint", str(ckpt), "--planning_checkpoint", str(ckpt),
                 "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "4", "--num-proposals", "2",
                 "--num-futures", "1", "--num-values", "1", "--num-steps", "1", "--videos", "0",
                 "--output", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["policy"] == "planning" and res["config"]["planning_checkpoint"] == str(ckpt)
    assert res["config"]["num_proposals"] == 2


def test_expert_and_random_baselines_use_the_same_command(tmp_path, gl):
    out = tmp_path / "expert"
    assert main(["evaluate", "metaworld", "--policy", "expert", "--tasks", "reach-v3", "--episodes", "1",
                 "--max-steps", "150", "--videos", "0", "--output", str(out)]) == 0
    expert = json.loads((out / "results.json").read_text())["tasks"]["reach-v3"]
    assert expert["successes"] == 1 and expert["mean_length"] < 150 and expert["latency"]["calls"] == 0
    out = tmp_path / "random"
    assert main(["evaluate", "metaworld", "--policy", "random", "--tasks", "reach-v3", "--episodes", "1",
                 "--max-steps", "10", "--videos", "0", "--output", str(out)]) == 0
    rnd = json.loads((out / "results.json").read_text())
    assert rnd["config"]["policy"] == "random" and rnd["episodes"][0]["length"] <= 10


def test_model_policy_needs_a_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "metaworld", "--tasks", "reach-v3", "--episodes", "1", "--output", str(tmp_path)]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
