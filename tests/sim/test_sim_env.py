"""The simulator protocol (``sim/env.py``): Meta-World implements it (real MuJoCo), and the generic evaluator runs
real episodes of a simulator that is not MuJoCo at all — a 1-D reach written here — through the registry, with the
expert and random baselines and with a policy-like object, recording GIFs and rollout HDF5 files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.embodiment import load_embodiment
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim import env as sim_env
from cosmos_policy_lightning.sim.env import SimEnv, simulator
from cosmos_policy_lightning.sim.evaluate import evaluate, policy_controller, run_rollout

from ..conftest import EMBODIMENTS


# ----------------------------------------------------------------------------- a simulator without MuJoCo
class Reach1D:
    """A point on a line moves towards a goal: x in [-1, 1] (m), action (1,) in [-1, 1] moves it 5 cm per unit.

    Episode ``i`` starts at x = -0.8 with the goal at ``0.3 + 0.1 * (i % 5)``; success within 2 cm of the goal.
    The camera ``top`` shows the point white and the goal red on a black strip.
    """

    default_embodiment = "<written by the test>"
    default_task = "reach-line"
    TASKS = ("reach-line",)

    def __init__(self, task, embodiment, *, seed, max_steps, render):
        self.task, self.embodiment, self.seed = task, load_embodiment(embodiment), seed
        self.max_steps, self.render_images = min(max_steps, 100), render
        self.instruction = "move the point to the red mark"
        self.cameras = {cam.name: "strip" for cam in self.embodiment.cameras}
        self.action_bounds = (np.full(1, -1.0, np.float32), np.full(1, 1.0, np.float32))
        self.success, self.x, self.goal, self.steps, self.closed = False, 0.0, 0.0, 0, False

    @classmethod
    def create(cls, task, embodiment, *, seed, max_steps, render):
        return cls(task, embodiment, seed=seed, max_steps=max_steps, render=render)

    @staticmethod
    def check_task(task):
        if task not in Reach1D.TASKS:
            raise CosmosPolicyError(f"unknown reach task {task!r}")

    def _obs(self):
        images = {}
        if self.render_images:
            h, w = self.embodiment.image_size
            img = np.zeros((h, w, 3), np.uint8)
            col = lambda v: int(round((v + 1) / 2 * (w - 1)))  # noqa: E731
            img[:, col(self.goal), 0] = 255
            img[:, col(self.x)] = 255
            images = {cam: img.copy() for cam in self.cameras}
        return {"images": images, "proprio": np.array([self.x], np.float32), "instruction": self.instruction}

    def reset(self, episode):
        self.x, self.goal, self.steps, self.success = -0.8, 0.3 + 0.1 * (episode % 5), 0, False
        return self._obs()

    def step(self, action):
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (1,) or self.steps >= self.max_steps:
            raise CosmosPolicyError(f"reach: bad action {action} or finished episode")
        self.x = float(np.clip(self.x + 0.05 * np.clip(action[0], -1, 1), -1, 1))
        self.steps += 1
        self.success = abs(self.x - self.goal) < 0.02
        return self._obs(), -abs(self.x - self.goal), self.success, self.steps >= self.max_steps, {}

    def expert(self):
        return np.array([np.clip((self.goal - self.x) / 0.05, -1, 1)], np.float32)

    def close(self):
        self.closed = True


@pytest.fixture
def reach(monkeypatch, tmp_path):
    """Register :class:`Reach1D` as simulator ``reach1d`` (one registry line) with a 1-camera, 1-d embodiment."""
    monkeypatch.setitem(sim_env.SIMULATORS, "reach1d", f"{__name__}:Reach1D")
    data = yaml.safe_load((EMBODIMENTS / "metaworld.yaml").read_text())
    data.update(name="reach1d", image_size=[16, 32])
    data["cameras"] = [{"name": "top", "role": "primary", "keys": {"episode_hdf5": "observations/images/top"}}]
    data["proprio"] = {"dim": 1, "names": ["x"], "keys": {"episode_hdf5": ["observations/qpos"]}}
    data["action"] = {**data["action"], "dim": 1, "names": ["dx"], "keys": {"episode_hdf5": "action"}}
    path = tmp_path / "reach1d.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_toy_simulator_satisfies_the_protocol(reach):
    cls = simulator("reach1d")
    assert cls is Reach1D
    env = cls.create("reach-line", reach, seed=0, max_steps=50, render=True)
    assert isinstance(env, SimEnv)
    assert not isinstance(object(), SimEnv)
    with pytest.raises(CosmosPolicyError, match="unknown simulator 'nope'; expected one of .*metaworld"):
        simulator("nope")


def test_generic_evaluator_runs_the_expert_and_random_baselines_of_a_non_mujoco_simulator(reach, tmp_path):
    out = tmp_path / "expert"
    assert main(["evaluate", "reach1d", "--policy", "expert", "--embodiment", str(reach), "--episodes", "3",
                 "--max-steps", "60", "--videos", "1", "--record-hdf5", "true", "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["simulator"] == "reach1d" and res["config"]["tasks"] == ["reach-line"]
    task = res["tasks"]["reach-line"]
    # goals at 0.3, 0.4, 0.5 from -0.8 at 5 cm per step: 22, 24, 26 steps (success within 2 cm)
    assert task["successes"] == 3 and [e["length"] for e in res["episodes"]] == [22, 24, 26]
    assert task["latency"]["calls"] == 0
    with h5py.File(out / "rollouts" / "reach-line" / "reach-line-ep001.hdf5") as f:
        assert bool(f.attrs["success"]) and f.attrs["task_description"] == "move the point to the red mark"
        assert f["observations/images/top"].shape == (24, 16, 32, 3) and f["observations/qpos"].shape == (24, 1)
        np.testing.assert_allclose(f["observations/qpos"][1:, 0] - f["observations/qpos"][:-1, 0],
                                   0.05 * f["action"][:-1, 0], atol=1e-6)
        assert f["rewards"][()].tolist() == [0.0] * 23 + [1.0]
    assert (out / "videos" / "reach-line-ep000.gif").stat().st_size > 100

    out = tmp_path / "random"
    res = evaluate("reach1d", policy="random", embodiment=reach, episodes=2, max_steps=10, videos=0, output=out)
    # 10 random steps of at most 5 cm cannot cover the 1.1 m to the goal
    assert res["overall"]["successes"] == 0 and [e["length"] for e in res["episodes"]] == [10, 10]
    assert res["config"]["policy"] == "random" and res["tasks"]["reach-line"]["latency"]["calls"] == 0


class LinePolicy:
    """Policy-like: ``predict`` returns a chunk of 4 actions (robot units, deliberately out of bounds) and a value."""

    def __init__(self):
        self.seeds = []

    def predict(self, obs, num_steps, seed, decoding, decode_images):
        from types import SimpleNamespace

        assert obs["instruction"] == "move the point to the red mark" and obs["proprio"].shape == (1,)
        assert set(obs["images"]) == {"top"} and obs["images"]["top"].dtype == np.uint8
        self.seeds.append(seed)
        return SimpleNamespace(actions=np.full((4, 1), 3.0, np.float32), value=0.25)


def test_run_rollout_with_a_policy_object_clips_to_the_env_bounds_and_seeds_each_call(reach):
    env = Reach1D.create("reach-line", reach, seed=0, max_steps=50, render=True)
    policy = LinePolicy()
    r = run_rollout(env, policy_controller(policy, num_steps=1, decoding="parallel"), episode=0, execute_steps=2,
                    record_images=True, seed=7)
    # goal 0.3 from -0.8 at 5 cm per (clipped) step: 22 steps, one policy call per 2 executed actions
    assert r.success and r.length == 22 and r.success_step == 21
    assert len(r.latencies) == 11 and [s for s, _ in r.values] == list(range(0, 22, 2))
    assert all(float(a[0]) == 1.0 for a in r.actions)  # 3.0 clipped into action_bounds
    assert policy.seeds == [7 * 1_000_003 + c for c in range(11)]
    assert len(r.images["top"]) == 22 and r.images["top"][0].shape == (16, 32, 3)
    # The random controller draws from the call seed only: the same episode twice gives the same actions.
    from cosmos_policy_lightning.sim.evaluate import random_controller

    a = run_rollout(env, random_controller, 1, 1, record_images=False, seed=3)
    b = run_rollout(env, random_controller, 1, 1, record_images=False, seed=3)
    np.testing.assert_array_equal(np.stack(a.actions), np.stack(b.actions))
    assert np.abs(np.stack(a.actions)).max() <= 1.0


def test_expert_baseline_needs_an_expert(reach, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Reach1D, "expert", lambda self: None)
    assert main(["evaluate", "reach1d", "--policy", "expert", "--embodiment", str(reach), "--episodes", "1",
                 "--videos", "0", "--output", str(tmp_path)]) == 2
    assert "has no expert" in capsys.readouterr().err
    assert main(["evaluate", "reach1d", "--policy", "expert", "--embodiment", str(reach), "--tasks", "fly",
                 "--output", str(tmp_path)]) == 2
    assert "unknown reach task 'fly'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Meta-World (real MuJoCo)
@pytest.mark.sim
def test_metaworld_env_implements_the_protocol(gl):
    from cosmos_policy_lightning.sim.metaworld import MetaWorldEnv

    assert simulator("metaworld") is MetaWorldEnv
    with MetaWorldEnv.create("reach-v3", EMBODIMENTS / "metaworld.yaml", seed=0, max_steps=900, render=True) as env:
        assert isinstance(env, SimEnv)
        assert env.max_steps == 500  # capped at Meta-World's episode limit
        # the env owns the camera mapping: embodiment names -> MuJoCo cameras (not a data format's keys)
        assert dict(env.cameras) == {"wrist": "gripperPOV", "corner": "corner"}
        low, high = env.action_bounds
        assert low.tolist() == [-1.0] * 4 and high.tolist() == [1.0] * 4
        obs = env.reset(0)
        assert set(obs) == {"images", "proprio", "instruction"} and obs["instruction"] == env.instruction
        assert set(obs["images"]) == set(env.cameras) and obs["images"]["corner"].shape == (64, 64, 3)
        assert env.success is False
        for _ in range(3):
            action = env.expert()
            assert action.shape == (4,) and action.dtype == np.float32
            obs, reward, success, truncated, info = env.step(action)
            assert success == env.success == bool(info["success"]) and not truncated
        assert np.linalg.norm(obs["proprio"][:3] - env.reset(0)["proprio"][:3]) > 0.005
    with pytest.raises(CosmosPolicyError, match="maps to MuJoCo camera 'nowhere'"):
        MetaWorldEnv("reach-v3", EMBODIMENTS / "metaworld.yaml", render=False, cameras={"corner": "nowhere"})
    with MetaWorldEnv("reach-v3", EMBODIMENTS / "metaworld.yaml", render=True, cameras={"corner": "corner2"}) as env:
        assert env.cameras["corner"] == "corner2"
        assert env.reset(0)["images"]["corner"].std() > 10
