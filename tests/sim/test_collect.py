"""The generic collector (``cosmos-policy collect SIMULATOR``, ``sim/collect.py``) on a simulator written here: a
point on a plane whose two action dimensions have different ranges, with an expert and a partial-progress score.

Real files throughout: episode HDF5 read back by ``cosmos-policy convert --format episode_hdf5``, robomimic files
read by ``--format robomimic``, an interrupted run resumed, 'spawn' workers compared with a serial run.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.embodiment import load_embodiment
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim import env as sim_env
from cosmos_policy_lightning.sim.collect import collect
from cosmos_policy_lightning.sim.noise import CorrelatedActionNoise, noise_rng

from ..conftest import EMBODIMENTS

#: Action bounds of the toy: x in [-1, 1] moves 5 cm per unit, y in [-4, 4] moves 1.25 cm per unit.
LOW, HIGH = np.array([-1.0, -4.0], np.float32), np.array([1.0, 4.0], np.float32)
GAIN = np.array([0.05, 0.0125])


class Reach2D:
    """A point moves from (-0.5, -0.5) to the goal ``(0.1 i, -0.1 i)`` of episode ``i`` (i mod 4; metres); success
    within 2 cm in both coordinates. ``info["success_score"]`` is the fraction of the coordinates within 2 cm (0, 0.5, 1).
    One camera ``top`` draws the point white and the goal red."""

    default_embodiment = "<written by the test>"
    default_task = "reach-plane"
    TASKS = ("reach-plane", "reach-plane-fast")

    def __init__(self, task, embodiment, *, seed, max_steps, render):
        self.task, self.embodiment, self.seed = task, load_embodiment(embodiment), seed
        self.max_steps = min(max_steps, 80)
        self.instruction = f"move the point to the red mark ({task})"
        self.cameras = {cam.name: "plane" for cam in self.embodiment.cameras}
        self.action_bounds = (LOW.copy(), HIGH.copy())
        self.render_images = render
        self.success, self.pos, self.goal, self.steps, self.episode = False, np.zeros(2), np.zeros(2), 0, -1

    @classmethod
    def create(cls, task, embodiment, *, seed, max_steps, render):
        return cls(task, embodiment, seed=seed, max_steps=max_steps, render=render)

    @staticmethod
    def check_task(task):
        if task not in Reach2D.TASKS:
            raise CosmosPolicyError(f"unknown plane task {task!r}; expected one of {', '.join(Reach2D.TASKS)}")

    def _obs(self):
        images = {}
        if self.render_images:
            h, w = self.embodiment.image_size
            img = np.zeros((h, w, 3), np.uint8)
            px = lambda p: (int(round((p[1] + 1) / 2 * (h - 1))), int(round((p[0] + 1) / 2 * (w - 1))))  # noqa: E731
            img[px(self.goal)] = (255, 0, 0)
            img[px(self.pos)] = 255
            images = {cam: img.copy() for cam in self.cameras}
        return {"images": images, "proprio": self.pos.astype(np.float32), "instruction": self.instruction}

    def reset(self, episode):
        self.episode, k = episode, episode % 4
        self.pos, self.goal = np.array([-0.5, -0.5]), np.array([0.1 * k, -0.1 * k])
        self.steps, self.success = 0, False
        return self._obs()

    def step(self, action):
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (2,) or self.steps >= self.max_steps:
            raise CosmosPolicyError(f"plane: bad action {action} or finished episode")
        self.pos = np.clip(self.pos + GAIN * np.clip(action, LOW, HIGH), -1, 1)
        self.steps += 1
        close = np.abs(self.pos - self.goal) < 0.02
        self.success = bool(close.all())
        info = {"success_score": close.mean()}
        return self._obs(), -float(np.abs(self.pos - self.goal).sum()), self.success, self.steps >= self.max_steps, info

    def expert(self):
        if os.environ.get("REACH2D_BREAK_AT") == str(self.episode):  # a crash in mid-collection
            raise RuntimeError("simulated crash")
        return np.clip((self.goal - self.pos) / GAIN, LOW, HIGH).astype(np.float32)

    def close(self):
        pass


@pytest.fixture
def plane(monkeypatch, tmp_path):
    """Register :class:`Reach2D` as ``plane`` (one registry line; the spawned workers find it through the
    collector's settings) with a 1-camera embodiment: 2-d proprio and action, episode_hdf5 and robomimic keys."""
    monkeypatch.setitem(sim_env.SIMULATORS, "plane", f"{__name__}:Reach2D")
    data = yaml.safe_load((EMBODIMENTS / "metaworld.yaml").read_text())
    data.update(name="plane", image_size=[16, 16])
    data["cameras"] = [{"name": "top", "role": "primary",
                        "keys": {"episode_hdf5": "observations/images/top", "robomimic": "top_rgb"}}]
    data["proprio"] = {"dim": 2, "names": ["x", "y"], "keys": {"episode_hdf5": ["observations/qpos"],
                                                              "robomimic": ["pos"]}}
    data["action"] = {**data["action"], "dim": 2, "names": ["dx", "dy"],
                      "keys": {"episode_hdf5": "action", "robomimic": "actions"}}
    path = tmp_path / "plane.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(Reach2D, "default_embodiment", str(path))
    return path


def _argv(out, *extra):
    # 4 clean episodes succeed in 10-14 steps (y moves 1.25 cm per unit, at most 4 units a step); strong slow
    # noise (0.9 of the half range, drifts of ~20 steps) with 25 steps and no stop after success makes failures
    return ["collect", "plane", "--tasks", "[reach-plane,reach-plane-fast]", "--episodes", "8", "--clean_episodes", "4",
            "--noise_std", "0.9", "--noise_theta", "0.05", "--max_steps", "25", "--stop_after_success", "2",
            "--seed", "3", "--output", str(out), *extra]


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_episode_files_success_labels_and_convert(plane, tmp_path, capsys):
    out = tmp_path / "collected"
    assert main(_argv(out)) == 0
    assert "collect plane" in capsys.readouterr().err  # the summary table
    summary = json.loads((out / "collection.json").read_text())
    assert summary["complete"] and summary["arguments"]["format"] == "episode_hdf5"
    successes = {}
    for task in ("reach-plane", "reach-plane-fast"):
        files = sorted((out / task).iterdir())
        assert [p.name for p in files] == [f"episode_{i}.hdf5" for i in range(8)]
        for i, path in enumerate(files):
            with h5py.File(path, "r") as f:
                a = f.attrs
                T = f["action"].shape[0]
                assert a["sim"] == "plane" and a["task"] == task and a["seed"] == 3 and a["initial_state"] == i
                assert a["instruction"] == f"move the point to the red mark ({task})" and a["embodiment"] == "plane"
                assert a["noise_std"] == (0.0 if i < 4 else 0.9) and json.loads(a["arguments"])["episodes"] == 8
                assert f["observations/images/top"].shape == (T, 16, 16, 3)
                assert f["observations/qpos"].shape == (T, 2) and f["action"].shape == (T, 2)
                assert (f["action"][()] >= LOW).all() and (f["action"][()] <= HIGH).all()
                # observation t is what the robot saw before action t
                np.testing.assert_allclose(np.diff(f["observations/qpos"][()], axis=0),
                                           GAIN * f["action"][:-1], atol=1e-6)
                score = f["success_score"][()]
                assert score.shape == (T,) and a["success_score"] == score.max()
                if a["success"]:
                    assert T == min(a["success_step"] + 3, 25) and score[a["success_step"]] == 1  # 2 steps after
                else:
                    assert a["success_step"] == -1 and T == 25 and score.max() < 1
                successes[f"{task}/{i}"] = bool(a["success"])
        clean = [successes[f"{task}/{i}"] for i in range(4)]
        assert all(clean), f"the clean expert failed on {task}"
        row = summary["tasks"][task]
        assert row["clean"] == 4 and row["clean_success"] == 4 and row["noisy"] == 4
        assert row["noisy_success"] == sum(successes[f"{task}/{i}"] for i in range(4, 8))
        assert row["bytes"] == sum(p.stat().st_size for p in files)
    n_fail = sum(not s for s in successes.values())
    assert n_fail >= 2, "the noise should make some episodes fail"

    shards = tmp_path / "shards"
    assert main(["convert", str(out), "--format", "episode_hdf5", "--embodiment", str(plane), "--output", str(shards),
                 "--val_fraction", "0", "--text_encoder", "none", "--progress", "false"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["counts"]["train"]["episodes"] == 16
    assert manifest["counts"]["train"]["failures"] == n_fail
    assert manifest["counts"]["train"]["successes"] == 16 - n_fail
    for episode in manifest["episodes"].values():  # the partial progress of failures feeds the value (0 or 0.5 here)
        with h5py.File(episode["source"], "r") as f:
            assert episode["success"] == bool(f.attrs["success"])
            assert episode["score"] == pytest.approx(f.attrs["success_score"]) == (1.0 if episode["success"] else
                                                                                  f["success_score"][()].max())
    assert {v["instruction"] for v in manifest["episodes"].values()} == {
        f"move the point to the red mark ({task})" for task in ("reach-plane", "reach-plane-fast")}


def test_noise_is_a_fraction_of_each_dimensions_half_range():
    bounds = (np.array([-1.0, -4.0, 0.0]), np.array([1.0, 4.0, 0.1]))
    noise = CorrelatedActionNoise.for_bounds(bounds, 0.3, 0.1, np.random.default_rng(0))
    x = np.stack([noise() for _ in range(20000)])
    np.testing.assert_allclose(x.std(axis=0), 0.3 * np.array([1.0, 4.0, 0.05]), rtol=0.1)
    lag1 = np.corrcoef(x[:-1, 1], x[1:, 1])[0, 1]
    assert abs(lag1 - 0.9) < 0.03  # AR(1) coefficient 1 - theta
    # On [-1, 1] the fraction is the absolute std: the same numbers as unscaled noise (Meta-World unchanged).
    a = CorrelatedActionNoise.for_bounds((-np.ones(4), np.ones(4)), 0.3, 0.1, noise_rng(0, "push-v3", 4))
    b = CorrelatedActionNoise(4, 0.3, 0.1, noise_rng(0, "push-v3", 4))
    np.testing.assert_array_equal(np.stack([a() for _ in range(50)]), np.stack([b() for _ in range(50)]))
    with pytest.raises(CosmosPolicyError, match="high > low"):
        CorrelatedActionNoise.for_bounds((np.zeros(2), np.array([1.0, 0.0])), 0.3, 0.1, np.random.default_rng(0))
    with pytest.raises(CosmosPolicyError, match="--noise_theta"):
        CorrelatedActionNoise(2, 0.3, 0.0, np.random.default_rng(0))


def test_interrupted_run_resumes_and_other_arguments_are_refused(plane, tmp_path, monkeypatch, capsys):
    out = tmp_path / "collected"
    reference = tmp_path / "reference"
    assert main(_argv(reference)) == 0
    # crash at episode 2 of the first task (serial order: episodes 0 and 1 are on disk)
    monkeypatch.setenv("REACH2D_BREAK_AT", "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect("plane", **_options(out))
    monkeypatch.delenv("REACH2D_BREAK_AT")
    assert sorted(p.name for p in (out / "reach-plane").iterdir()) == ["episode_0.hdf5", "episode_1.hdf5"]
    assert json.loads((out / "collection.json").read_text())["complete"] is False
    (out / "reach-plane" / ".episode_2.hdf5.abc123.tmp").write_bytes(b"half an episode")  # a kill mid-write
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "reach-plane").glob("episode_*.hdf5")}
    assert main(_argv(out)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "reach-plane").glob("episode_[01].hdf5")} == kept
    assert not list(out.rglob("*.tmp"))
    for task in ("reach-plane", "reach-plane-fast"):
        for i in range(8):
            a, b = _datasets(out / task / f"episode_{i}.hdf5"), _datasets(reference / task / f"episode_{i}.hdf5")
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a complete collection rerun: nothing to do; a deleted episode is made again
    (out / "reach-plane-fast" / "episode_5.hdf5").unlink()
    assert main(_argv(out)) == 0
    assert _datasets(out / "reach-plane-fast" / "episode_5.hdf5").keys() == \
        _datasets(reference / "reach-plane-fast" / "episode_5.hdf5").keys()
    capsys.readouterr()
    assert main(_argv(out, "--episodes", "9")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other arguments (episodes 8 -> 9)" in err and "--overwrite" in err
    assert main(_argv(out, "--episodes", "3", "--clean_episodes", "3", "--overwrite", "true")) == 0
    assert sorted(p.name for p in (out / "reach-plane").iterdir()) == [f"episode_{i}.hdf5" for i in range(3)]
    # files that no collection.json describes are not taken over
    stray = tmp_path / "stray"
    (stray / "reach-plane").mkdir(parents=True)
    (stray / "reach-plane" / "episode_0.hdf5").write_bytes(b"")
    assert main(_argv(stray)) == 2
    assert "does not record its arguments" in capsys.readouterr().err


def _options(out, **extra):
    return dict(tasks=["reach-plane", "reach-plane-fast"], episodes=8, clean_episodes=4, noise_std=0.9,
                noise_theta=0.05, max_steps=25, stop_after_success=2, seed=3, output=out, **extra)


def test_parallel_workers_write_what_a_serial_run_writes(plane, tmp_path):
    serial = collect("plane", **_options(tmp_path / "serial"))
    parallel = collect("plane", **_options(tmp_path / "parallel", workers=2))
    for task in ("reach-plane", "reach-plane-fast"):
        for key in ("clean_success", "noisy_success", "steps"):
            assert serial["tasks"][task][key] == parallel["tasks"][task][key]
        for i in range(8):
            a = _datasets(tmp_path / "serial" / task / f"episode_{i}.hdf5")
            b = _datasets(tmp_path / "parallel" / task / f"episode_{i}.hdf5")
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_robomimic_format_joins_parts_after_an_interruption(plane, tmp_path, monkeypatch):
    out = tmp_path / "robomimic"
    monkeypatch.setenv("REACH2D_BREAK_AT", "2")
    with pytest.raises(RuntimeError):
        collect("plane", **_options(out, format="robomimic"))
    monkeypatch.delenv("REACH2D_BREAK_AT")
    assert sorted(p.name for p in (out / ".parts" / "reach-plane").iterdir()) == ["demo_0.hdf5.part", "demo_1.hdf5.part"]
    summary = collect("plane", **_options(out, format="robomimic"))
    assert not (out / ".parts").exists() and sorted(p.name for p in out.glob("*.hdf5")) == \
        ["reach-plane-fast.hdf5", "reach-plane.hdf5"]
    with h5py.File(out / "reach-plane.hdf5", "r") as f:
        assert f.attrs["env"] == "plane" and f.attrs["episodes"] == 8 and sorted(f["data"]) == \
            sorted(f"demo_{i}" for i in range(8))
        demo = f["data/demo_6"]
        assert demo.attrs["initial_state"] == 6 and demo.attrs["noise_std"] == 0.9
        assert demo["obs/top_rgb"].shape[1:] == (16, 16, 3) and demo["obs/pos"].shape[1] == 2
        assert f["data"].attrs["total"] == sum(f[f"data/demo_{i}"].attrs["num_samples"] for i in range(8))
        assert f.attrs["successes"] == sum(bool(f[f"data/demo_{i}"].attrs["success"]) for i in range(8))
    shards = tmp_path / "shards"
    assert main(["convert", str(out), "--format", "robomimic", "--embodiment", str(plane), "--output", str(shards),
                 "--val_fraction", "0", "--text_encoder", "none", "--progress", "false"]) == 0
    counts = json.loads((shards / "manifest.json").read_text())["counts"]["train"]
    tasks = summary["tasks"].values()
    assert counts["episodes"] == 16 and counts["successes"] == sum(t["clean_success"] + t["noisy_success"] for t in tasks)


def test_one_line_refusals(plane, tmp_path, capsys, monkeypatch):
    for extra, message in ((["--episodes", "0"], "--episodes must be >= 1"),
                           (["--clean_episodes", "9"], "--clean_episodes must be in [0, 8]"),
                           (["--noise_std", "-1"], "--noise_std must be >= 0"),
                           (["--workers", "0"], "--workers must be >= 1"),
                           (["--tasks", "[fly]"], "unknown plane task 'fly'")):
        assert main(_argv(tmp_path / "bad", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    with monkeypatch.context() as m:
        step = Reach2D.step
        m.setattr(Reach2D, "step", lambda self, a: (*step(self, a)[:4], {"success_score": 2}))
        assert main(_argv(tmp_path / "bad3")) == 2
        assert "info['success_score'] must be a fraction in [0, 1]" in capsys.readouterr().err
    assert main(["collect", "nowhere", "--output", str(tmp_path / "bad")]) == 2
    assert "unknown simulator 'nowhere'" in capsys.readouterr().err
    # several proprio keys need the adapter's widths
    data = yaml.safe_load(plane.read_text())
    data["proprio"]["keys"]["episode_hdf5"] = ["observations/x", "observations/y"]
    two = tmp_path / "two_keys.yaml"
    two.write_text(yaml.safe_dump(data))
    assert main(_argv(tmp_path / "bad2", "--embodiment", str(two))) == 2
    assert "proprio_parts" in capsys.readouterr().err
