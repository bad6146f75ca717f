"""Meta-World: real MuJoCo episodes rendered offscreen, written as robomimic HDF5 and read back.

Skipped (with the reason) only when MuJoCo cannot render offscreen on this machine, and failed instead
where $COSMOS_POLICY_REQUIRE_SIM is set (CI, see conftest.sim_unavailable).
"""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest

from ..conftest import require_rendering, sim_unavailable

# find_spec, not import: importing metaworld imports MuJoCo, which binds its GL backend (require_rendering)
if importlib.util.find_spec("metaworld") is None:
    sim_unavailable("Meta-World is the [sim] extra (pip install -e \".[sim]\")", module_level=True)

from cosmos_policy_lightning.cli import main as cli_main  # noqa: E402
from cosmos_policy_lightning.embodiment import Embodiment  # noqa: E402
from cosmos_policy_lightning.errors import CosmosPolicyError  # noqa: E402
from cosmos_policy_lightning.sim import metaworld as mw  # noqa: E402
from cosmos_policy_lightning.sim.collect import collect_metaworld, run_episode  # noqa: E402
from cosmos_policy_lightning.sim.noise import CorrelatedActionNoise, noise_rng  # noqa: E402

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module", autouse=True)
def can_render():
    """Probe offscreen rendering in a subprocess (MuJoCo fixes its GL backend at import)."""
    require_rendering()


def test_env_renders_real_images_and_steps(embodiments_dir):
    emb = Embodiment.from_yaml(embodiments_dir / "metaworld.yaml")
    with mw.MetaWorldEnv("reach-v3", emb, seed=0, max_steps=12) as env:
        assert env.instruction == "reach the goal position"
        obs0 = env.reset(0)
        assert set(obs0["images"]) == set(emb.camera_names)
        for img in obs0["images"].values():
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert img.std() > 10, "a blank render"
        wrist, corner = obs0["images"]["wrist"], obs0["images"]["corner"]
        assert np.abs(wrist.astype(int) - corner).mean() > 10, "the two cameras show the same picture"
        assert obs0["proprio"].shape == (4,) and obs0["proprio"].dtype == np.float32
        expert = env.expert_policy()
        for t in range(12):
            obs, reward, success, truncated, info = env.step(expert())
            assert truncated == (t == 11) and isinstance(success, bool) and 0 <= reward <= 10
        for cam in emb.camera_names:  # the arm moved: both views changed
            assert np.abs(obs["images"][cam].astype(int) - obs0["images"][cam]).mean() > 1.0, cam
        assert np.linalg.norm(obs["proprio"][:3] - obs0["proprio"][:3]) > 0.02  # metres
        with pytest.raises(CosmosPolicyError, match="reset"):
            env.step(np.zeros(4))
        env.reset(1)
        with pytest.raises(CosmosPolicyError, match="shape"):
            env.step(np.zeros(3))
    assert mw.instruction_for("brand-new-thing-v3") == "brand new thing"
    with pytest.raises(CosmosPolicyError, match="unknown Meta-World task"):
        mw.check_task("drawer-opne-v3")


def test_same_seed_same_episode():
    with mw.MetaWorldEnv("push-v3", seed=3, max_steps=10) as env:
        runs = [run_episode(env, 4, CorrelatedActionNoise(4, 0.3, 0.1, noise_rng(3, "push-v3", 4)))
                for _ in range(2)]
        other = run_episode(env, 4, CorrelatedActionNoise(4, 0.3, 0.1, noise_rng(4, "push-v3", 4)))
    np.testing.assert_array_equal(runs[0].actions, runs[1].actions)
    np.testing.assert_array_equal(runs[0].images["corner"], runs[1].images["corner"])
    assert not np.array_equal(runs[0].actions, other.actions)


def test_noise_is_correlated_with_the_requested_std():
    noise = CorrelatedActionNoise(4, 0.3, 0.1, np.random.default_rng(0))
    x = np.stack([noise() for _ in range(20000)])
    assert abs(x.std() - 0.3) < 0.03
    lag1 = np.corrcoef(x[:-1, 0], x[1:, 0])[0, 1]
    assert abs(lag1 - 0.9) < 0.03  # AR(1) coefficient 1 - theta


def test_collect_writes_robomimic_hdf5_with_failures(tmp_path, embodiments_dir):
    """One clean episode that succeeds and one strongly perturbed episode that fails."""
    emb = Embodiment.from_yaml(embodiments_dir / "metaworld.yaml")
    summary = collect_metaworld(tasks=["reach-v3"], episodes=2, clean_episodes=1, noise_std=1.0, noise_theta=0.05,
                                max_steps=60, stop_after_success=2, output=tmp_path, seed=0)
    path = tmp_path / "reach-v3.hdf5"
    assert summary["tasks"]["reach-v3"]["path"] == str(path) and not list(tmp_path.rglob("*tmp"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["collection.json", "reach-v3.hdf5"]
    assert summary["tasks"]["reach-v3"]["clean_success"] == 1 and summary["tasks"]["reach-v3"]["noisy_success"] == 0
    with h5py.File(path, "r") as f:
        assert f.attrs["env"] == "metaworld" and f.attrs["task"] == "reach-v3"
        assert f.attrs["instruction"] == "reach the goal position" and "noise_std" in f.attrs["arguments"]
        clean, noisy = f["data/demo_0"], f["data/demo_1"]
        assert bool(clean.attrs["success"]) and not bool(noisy.attrs["success"])
        assert clean.attrs["noise_std"] == 0.0 and noisy.attrs["noise_std"] == 1.0
        T = int(clean.attrs["num_samples"])
        assert T == clean.attrs["success_step"] + 3 < 60  # stopped 2 steps after the first success
        assert noisy.attrs["num_samples"] == 60 and noisy["rewards"][:].sum() == 0
        assert clean["rewards"][-1] == 1.0 and clean["dones"][:].tolist() == [0] * (T - 1) + [1]
        assert clean["actions"].shape == (T, 4) and np.abs(clean["actions"][:]).max() <= 1.0
        obs = clean["obs"]
        for cam in emb.cameras:  # the embodiment's robomimic keys are the file's keys
            images = obs[cam.keys["robomimic"]][:]
            assert images.shape == (T, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 10
            assert np.abs(images[-1].astype(int) - images[0]).mean() > 1.0
        assert obs["hand_pos"].shape == (T, 3) and obs["gripper_opening"].shape == (T, 1)
        assert set(emb.proprio.keys["robomimic"]) <= set(obs)
        # obs[t] is what the robot saw before actions[t]: proprio moves in the action's direction.
        moved = obs["hand_pos"][1:] - obs["hand_pos"][:-1]
        assert np.mean(np.sum(moved[:20] * clean["actions"][:20, :3], axis=1) > 0) > 0.8
    with pytest.raises(CosmosPolicyError, match="other arguments"):
        collect_metaworld(tasks=["reach-v3"], episodes=1, output=tmp_path)


def test_cli_parallel_matches_serial(tmp_path, capsys):
    """Workers share out the episodes of each task (each env runs a different subset, in another order)."""
    argv = ["collect", "metaworld", "--tasks", "[reach-v3,button-press-topdown-v3]", "--episodes", "3",
            "--max-steps", "6", "--noise-std", "0.3", "--seed", "7"]
    assert cli_main(argv + ["--output", str(tmp_path / "par"), "--workers", "2"]) == 0
    assert cli_main(argv + ["--output", str(tmp_path / "ser")]) == 0
    for task in ("reach-v3", "button-press-topdown-v3"):
        with h5py.File(tmp_path / "par" / f"{task}.hdf5") as a, h5py.File(tmp_path / "ser" / f"{task}.hdf5") as b:
            for i in range(3):
                np.testing.assert_array_equal(a[f"data/demo_{i}/actions"][:], b[f"data/demo_{i}/actions"][:])
                np.testing.assert_array_equal(a[f"data/demo_{i}/obs/corner_rgb"][:], b[f"data/demo_{i}/obs/corner_rgb"][:])
    assert cli_main(["collect", "metaworld", "--tasks", "drawer-opne-v3", "--episodes", "1",
                     "--output", str(tmp_path / "bad")]) == 2
    assert "unknown Meta-World task" in capsys.readouterr().err


def test_episode_hdf5_format_converts_with_the_success_flags(tmp_path):
    """``--format episode_hdf5`` on Meta-World: the embodiment's episode_hdf5 keys name the datasets, and
    ``convert --format episode_hdf5`` reads them with each episode's success."""
    out = tmp_path / "episodes"
    assert cli_main(["collect", "metaworld", "--tasks", "[reach-v3]", "--episodes", "2", "--clean-episodes", "1",
                     "--noise-std", "1.0", "--noise-theta", "0.05", "--max-steps", "60", "--stop-after-success", "2",
                     "--format", "episode_hdf5", "--output", str(out)]) == 0
    with h5py.File(out / "reach-v3" / "episode_0.hdf5") as f:
        assert bool(f.attrs["success"]) and f.attrs["sim"] == "metaworld" and f.attrs["noise_std"] == 0.0
        T = f["action"].shape[0]
        assert f["observations/images/corner"].shape == (T, 64, 64, 3) and f["observations/qpos"].shape == (T, 4)
    assert cli_main(["convert", str(out), "--format", "episode_hdf5", "--embodiment", "metaworld", "--output",
                     str(tmp_path / "shards"), "--val_fraction", "0", "--text_encoder", "none",
                     "--progress", "false"]) == 0
    counts = json.loads((tmp_path / "shards" / "manifest.json").read_text())["counts"]["train"]
    assert (counts["episodes"], counts["successes"], counts["failures"]) == (2, 1, 1)
