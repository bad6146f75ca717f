"""The ALOHA simulation (gym-aloha, real MuJoCo + dm_control): the adapter's observations, placements and
refusals, the scripted expert (ACT's plans through IK) succeeding on clean episodes of both tasks, and the
whole chain collect -> convert (step stride) -> one real training step -> a short closed-loop evaluation,
with a checkpoint of one robot refused by the other robot's simulator."""

from __future__ import annotations

import json

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.errors import CosmosPolicyError

from ..conftest import EMBODIMENTS, require_rendering, sim_unavailable

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def aloha():
    require_rendering()
    try:
        from cosmos_policy_lightning.sim import aloha
        aloha.check_task("transfer_cube")
    except CosmosPolicyError as err:
        sim_unavailable(f"the ALOHA simulation is not installed: {err}", module_level=True)
    return aloha


def _run_expert(env, episode: int) -> tuple[bool, int, float]:
    env.reset(episode)
    while True:
        _, _, success, truncated, info = env.step(env.expert())
        if success or truncated:
            return success, env.steps, info["success_score"]


def test_observation_placements_and_bounds(aloha):
    from cosmos_policy_lightning.sim.env import SimEnv, simulator

    assert simulator("aloha") is aloha.AlohaEnv
    with aloha.AlohaEnv("transfer_cube", seed=0) as env:
        assert isinstance(env, SimEnv)
        obs = env.reset(3)
        assert set(obs["images"]) == {"left_wrist", "right_wrist", "top"}
        assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in obs["images"].values())
        assert obs["images"]["top"].std() > 5           # a rendered scene, not a blank buffer
        assert obs["proprio"].shape == (14,) and obs["proprio"].dtype == np.float32
        assert 0.0 <= obs["proprio"][6] <= 1.05 and "cube" in obs["instruction"]
        first = env.objects.copy()
        env.reset(4)
        assert not np.allclose(env.objects[:3], first[:3])      # another placement
        env.reset(3)
        np.testing.assert_allclose(env.objects, first)          # the same one again
        assert 0.0 <= first[0] <= 0.2 and 0.4 <= first[1] <= 0.6   # gym-aloha's sampling box
        low, high = env.action_bounds
        assert low.shape == high.shape == (14,) and low[6] == 0.0 and high[13] == 1.0 and (high > low).all()
        with pytest.raises(CosmosPolicyError, match=r"shape \(14,\)"):
            env.step(np.zeros(4))
    with aloha.AlohaEnv("transfer_cube", seed=1) as other:
        other.reset(3)
        assert not np.allclose(other.objects[:3], first[:3])    # a different seed: unseen placements


def test_episode_limit_and_stepping_a_finished_episode(aloha):
    with aloha.AlohaEnv("insertion", render=False, max_steps=3) as env:
        env.reset(0)
        hold = env.proprio()
        results = [env.step(hold) for _ in range(3)]
        assert [r[3] for r in results] == [False, False, True] and not any(r[2] for r in results)
        assert results[-1][4]["success_score"] == 0.0
        with pytest.raises(CosmosPolicyError, match="reset"):
            env.step(hold)


def test_diverging_physics_ends_the_episode_as_a_failure(aloha):
    """Full-range joint jumps (what a random policy commands) blow MuJoCo up (mjWARN_BADQACC): the episode
    ends there, truncated and failed, and the next reset starts clean."""
    with aloha.AlohaEnv("transfer_cube", render=False) as env:
        env.reset(0)
        low, high = env.action_bounds
        for t in range(20):
            _, _, success, truncated, info = env.step(high if t % 2 else low)
            if truncated:
                break
        assert truncated and not success and "BADQACC" in info["physics_error"] and t < 19
        with pytest.raises(CosmosPolicyError, match="reset"):
            env.step(low)
        obs = env.reset(0)
        assert np.isfinite(obs["proprio"]).all()
        assert env.step(env.expert())[3] is False


@pytest.mark.parametrize("task", ["transfer_cube", "insertion"])
def test_scripted_expert_succeeds_on_clean_episodes(aloha, task):
    with aloha.AlohaEnv(task, render=False) as env:
        for episode in range(2):
            success, steps, score = _run_expert(env, episode)
            assert success and score == 1.0 and steps < aloha.EPISODE_STEPS
            assert env._expert.worst_error < 1e-2            # the IK reaches every planned pose


def test_expert_baseline_through_the_cli(aloha, tmp_path):
    out = tmp_path / "expert"
    assert main(["evaluate", "aloha", "--policy", "expert", "--tasks", "[insertion]", "--episodes", "1",
                 "--seed", "1000", "--videos", "0", "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["insertion"]["successes"] == 1 and res["episodes"][0]["length"] < 400
    # the partial progress (stages / 4) is recorded per episode and averaged per task
    assert res["episodes"][0]["score"] == 1.0 and res["tasks"]["insertion"]["mean_score"] == 1.0


def test_unknown_task_and_other_robots_are_refused(aloha):
    with pytest.raises(CosmosPolicyError, match="unknown ALOHA task 'peg'.*transfer_cube"):
        aloha.AlohaEnv("peg")
    with pytest.raises(CosmosPolicyError, match=r"4-d proprio and 4-d actions; the aloha simulator takes 14-d"):
        aloha.AlohaEnv("transfer_cube", EMBODIMENTS / "metaworld.yaml")


def test_collect_convert_train_and_evaluate(aloha, tmp_path, capsys):
    """`collect aloha` -> `convert --format episode_hdf5 --step_stride` -> one real fit step -> `evaluate aloha`."""
    from cosmos_policy_lightning.data.convert import convert
    from cosmos_policy_lightning.data.datamodule import CosmosDataModule
    from cosmos_policy_lightning.model.module import CosmosPolicyModule

    from ..fixtures.checkpoint_factory import tiny_vae_dir

    data = tmp_path / "aloha"
    assert main(["collect", "aloha", "--tasks", "[transfer_cube]", "--episodes", "2", "--clean_episodes", "1",
                 "--noise_std", "0.05", "--noise_theta", "0.05", "--max_steps", "250", "--output", str(data)]) == 0
    files = sorted((data / "transfer_cube").glob("*.hdf5"))
    assert len(files) == 2
    with h5py.File(files[0]) as f:
        assert bool(f.attrs["success"]) and f["observations/images/top"].shape[1:] == (64, 64, 3)
        assert f["observations/qpos"].shape[1] == 14 and f["action"].shape[1] == 14
    with h5py.File(files[1]) as f:   # 5 % of each joint's half range drifting: the expert misses the cube
        assert not bool(f.attrs["success"]) and f["action"].shape[0] == 250

    shards = tmp_path / "shards"
    manifest = convert(str(data), output=str(shards), embodiment=str(EMBODIMENTS / "aloha_sim.yaml"),
                       format="episode_hdf5", text_encoder="none", val_fraction=0.0, step_stride=8, progress=False)
    counts = manifest["counts"]["train"]
    lengths = {e["length"] for e in manifest["episodes"].values()}
    assert counts["episodes"] == 2 and counts["samples"] == sum(-(-n // 8) for n in lengths)
    assert sorted(e["success"] for e in manifest["episodes"].values()) == [False, True]

    dm = CosmosDataModule(str(shards), batch_size=2, num_workers=0, shuffle_buffer=8, augment=False)
    torch.manual_seed(0)
    module = CosmosPolicyModule(embodiment=dm.embodiment.to_dict(), text_dim=dm.text_dim,
                                vae=str(tiny_vae_dir(tmp_path)), image_log_every_n_steps=0, warmup_steps=1,
                                inference_record=dm.inference_record())
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "aloha.ckpt"
    trainer.save_checkpoint(str(ckpt))

    out = tmp_path / "eval"
    assert main(["evaluate", "aloha", "--checkpoint", str(ckpt), "--tasks", "[transfer_cube]", "--episodes", "1",
                 "--max_steps", "30", "--num_steps", "1", "--seed", "1000", "--videos", "1",
                 "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    task = res["tasks"]["transfer_cube"]
    assert res["config"]["simulator"] == "aloha" and task["episodes"] == 1 and res["episodes"][0]["length"] == 30
    assert task["latency"]["calls"] == 2        # 30 steps, 25 executed per chunk
    assert 0.0 <= res["episodes"][0]["score"] <= 0.25 and task["mean_score"] == res["episodes"][0]["score"]
    assert (out / "videos" / "transfer_cube-ep000.gif").is_file()

    # the ALOHA checkpoint given to Meta-World: refused in one line, before any episode runs
    capsys.readouterr()
    assert main(["evaluate", "metaworld", "--checkpoint", str(ckpt), "--tasks", "reach-v3", "--episodes", "1",
                 "--output", str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "14-d proprio and 14-d actions; the metaworld simulator takes 4-d" in err[0]


def test_a_metaworld_checkpoint_is_refused_by_aloha(aloha, metaworld_checkpoint, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", "aloha", "--checkpoint", str(metaworld_checkpoint), "--tasks", "[transfer_cube]",
                 "--episodes", "1", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the aloha simulator takes 14-d proprio and 14-d actions" in err[0]


def _reddest(img: np.ndarray) -> np.ndarray:
    """(row, col) of the most saturated red pixel of an (H, W, 3) uint8 image: the cube, the only red object."""
    x = img.astype(np.float32)
    red = x[..., 0] - 0.5 * (x[..., 1] + x[..., 2])
    return np.array(np.unravel_index(np.argmax(red), red.shape), dtype=np.float32)


def test_shipped_aloha_vae_keeps_the_cube(aloha):
    """The shipped ALOHA VAE on frames of unseen placements, encoded as the framework does: the scene comes back
    (PSNR floor) and the 1-2 pixel cube of the 64x64 top camera stays where it was -- the Meta-World VAE erased
    it (docs/aloha.md), which left the policy blind to the cube's position."""
    from cosmos_policy_lightning.model.vae import VideoVAE
    from cosmos_policy_lightning.shipped import shipped_path

    vae = VideoVAE(str(shipped_path("assets/tiny_aloha_vae")))
    tops, wrists = [], []
    with aloha.AlohaEnv("transfer_cube", EMBODIMENTS / "aloha_sim.yaml", seed=4321) as env:
        for episode in range(4):
            obs = env.reset(episode)
            tops.append(obs["images"]["top"])
            wrists.append(obs["images"]["right_wrist"])
    a = torch.from_numpy(np.stack(wrists)).permute(0, 3, 1, 2).float() / 127.5 - 1
    b = torch.from_numpy(np.stack(tops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    black = torch.full_like(a, -1.0)
    seq = torch.cat([black[:, :, None], a[:, :, None].expand(-1, -1, 4, -1, -1),
                     b[:, :, None].expand(-1, -1, 4, -1, -1)], dim=2)
    rec = ((vae.decode(vae.encode(seq)).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()
    for i, top in enumerate(tops):
        mse = np.mean((rec[i, 8].astype(np.float64) - top) ** 2)
        assert 10 * np.log10(255.0**2 / mse) > 22.0
        assert np.abs(_reddest(rec[i, 8]) - _reddest(top)).max() <= 3.0, i   # the cube, within 3 pixels (it was 24 px off with the Meta-World VAE)
    # the four placements differ, so a VAE that drew the cube in one fixed place would fail the check above
    assert len({tuple(_reddest(t)) for t in tops}) == 4
