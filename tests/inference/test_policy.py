"""CosmosPolicy on a tiny real checkpoint (1 Lightning fit step, MiniLM text): robot units, shapes,
seeds, batching, both decodings, preprocessing, errors, and ``cosmos-policy predict`` (docs/method.md §1, §3, §4)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.augment import test_transform as center_transform
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.model.sequence import read_vectors
from cosmos_policy_lightning.text import build_text_encoder

from ..fixtures.checkpoint_factory import make_checkpoint

K, A, P = 4, 2, 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    return make_checkpoint(root, text_encoder=build_text_encoder("minilm"))


@pytest.fixture(scope="module")
def policy(ckpt):
    return CosmosPolicy.from_checkpoint(ckpt)


def observation(seed=0, hw=((48, 64), (32, 32)), proprio=None, instruction="push the block"):
    rng = np.random.default_rng(seed)
    return {"images": {"wrist": rng.integers(0, 256, (*hw[0], 3), dtype=np.uint8),
                       "front": rng.integers(0, 256, (*hw[1], 3), dtype=np.uint8)},
            "proprio": rng.uniform(-2, 3, P) if proprio is None else proprio, "instruction": instruction}


def test_checkpoint_carries_what_inference_needs(policy):
    assert policy.embodiment.name == "toy" and policy.chunk_size == K and policy.action_dim == A
    assert policy.center_crop is True  # trained with augmentation -> test-time centre crop
    assert policy.text.identity.startswith("minilm")
    assert policy.value_objective == "value"


def test_actions_are_unnormalised_robot_units(policy):
    obs = observation(1)
    out = policy(obs, seed=3)
    assert out.actions.shape == (K, A) and out.actions.dtype == np.float32
    assert out.future_proprio.shape == (P,) and out.value.shape == ()
    assert 0.0 <= float(out.value) <= 1.0
    stats = policy.module.stats.successful["action"]
    # clamped in [-1, 1] before un-normalising: inside the demonstrations' range, per dimension
    assert np.all(out.actions >= stats.min - 1e-5) and np.all(out.actions <= stats.max + 1e-5)
    # the same numbers by hand: sample with the module, read the latents, un-normalise with the stats
    batch = policy.prepare([obs])
    latents = policy.module.generate(policy.encode(batch), policy.condition_mask("policy", 1), batch.text,
                                     batch.text_mask, num_steps=5, generator=torch.Generator().manual_seed(3))
    normed = read_vectors(latents, policy.layout, P, K, A)["actions"].clamp(-1, 1)[0].double().numpy()
    expected = (normed + 1) / 2 * (stats.max - stats.min) + stats.min
    np.testing.assert_allclose(out.actions, expected, rtol=1e-5, atol=1e-5)
    # the predicted future frames are decoded images at model resolution
    assert set(out.future_images) == {"wrist", "front"}
    assert out.future_images["front"].shape == (32, 32, 3) and out.future_images["front"].dtype == np.uint8


def test_same_seed_same_actions_other_seed_other_actions(policy):
    obs = observation(2)
    a = policy(obs, seed=11, decode_images=False).actions
    b = policy(obs, seed=11, decode_images=False).actions
    c = policy(obs, seed=12, decode_images=False).actions
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_batched_observations_and_samples_in_one_forward(policy):
    calls = []
    handle = policy.module.dit.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        out = policy([observation(3), observation(4)], seed=0, num_samples=3, num_steps=2, decode_images=False)
    finally:
        handle.remove()
    assert calls == [6, 6]  # 2 observations x 3 samples, one network call per denoising step
    assert out.actions.shape == (2, 3, K, A) and out.value.shape == (2, 3) and out.future_proprio.shape == (2, 3, P)
    assert np.abs(out.actions[0, 0] - out.actions[0, 1]).max() > 1e-4  # samples differ
    single = policy(observation(3), seed=0, num_samples=3, num_steps=2, decode_images=False)
    assert single.actions.shape == (3, K, A)


def test_one_seed_per_observation_makes_batching_invisible(policy):
    obs = [observation(13), observation(14), observation(15)]
    for decoding in ("parallel", "autoregressive"):
        batched = policy(obs, seed=[5, 6, 7], num_steps=2, decoding=decoding, decode_images=False)
        for i, seed in enumerate((5, 6, 7)):
            alone = policy(obs[i], seed=seed, num_steps=2, decoding=decoding, decode_images=False)
            np.testing.assert_allclose(batched.actions[i], alone.actions, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(batched.value[i], alone.value, rtol=1e-5, atol=1e-5)
    # with S samples each, observation b's samples are those of a call with b alone
    both = policy(obs[:2], seed=[5, 6], num_samples=2, num_steps=2, decode_images=False)
    alone = policy(obs[1], seed=6, num_samples=2, num_steps=2, decode_images=False)
    np.testing.assert_allclose(both.actions[1], alone.actions, rtol=1e-5, atol=1e-5)
    with pytest.raises(CosmosPolicyError, match="got 2 seeds for 3 observations"):
        policy(obs, seed=[1, 2])


def test_autoregressive_conditions_each_stage_on_the_previous(policy):
    obs = observation(5)
    seen = []
    handle = policy.module.dit.register_forward_pre_hook(
        lambda mod, args: seen.append((args[2][0].clone(), args[0][0].clone())))
    try:
        ar = policy(obs, seed=7, decoding="autoregressive", stage_steps=(2, 3, 1), decode_images=False)
    finally:
        handle.remove()
    par = policy(obs, seed=7, num_steps=2, decode_images=False)
    lay = policy.layout
    masks = [m for m, _ in seen]
    assert len(seen) == 2 + 3 + 1
    expect = [torch.tensor(lay.conditioning_mask(o)) for o in ("policy", "world_model", "value")]
    assert all(torch.equal(m, expect[0]) for m in masks[:2])
    assert all(torch.equal(m, expect[1]) for m in masks[2:5])
    assert torch.equal(masks[5], expect[2])
    # stage 1 is the parallel run with the same noise: same action chunk
    np.testing.assert_allclose(ar.actions, par.actions, atol=1e-6)
    # stage 2 sees the sampled action, re-injected (tiled), as a clean conditioning frame
    x_wm = seen[2][1][:, lay.index("action")]
    normed = policy.action_normalizer.normalize(torch.as_tensor(ar.actions, dtype=torch.float64))
    vec = read_vectors(seen[2][1][None], lay, P, K, A)["actions"][0]
    torch.testing.assert_close(vec, normed.float(), atol=1e-4, rtol=1e-4)
    assert x_wm.std() > 0
    assert 0 <= float(ar.value) <= 1


def test_images_are_resized_jpeg_round_tripped_and_centre_cropped(policy):
    obs = observation(6, hw=((100, 80), (32, 32)))
    batch = policy.prepare([obs])
    assert batch.images.shape == (1, 2, 32, 32, 3) and batch.images.dtype == torch.uint8
    img = Image.fromarray(obs["images"]["wrist"]).resize((32, 32), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    manual = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")))[None]
    assert torch.equal(batch.images[0, 0], center_transform(manual)[0])
    # proprio normalised with the checkpoint's statistics
    expected = policy.module.normalizer("proprio").normalize(np.asarray(obs["proprio"], dtype=np.float64))
    np.testing.assert_allclose(batch.proprio[0].numpy(), expected, rtol=1e-6)


def test_prefix_encoding_equals_whole_clip_encoding(policy):
    obs = observation(7)
    batch = policy.prepare([obs])
    prefix = policy.encode(batch)
    full = policy.module.encode_batch({"images": batch.images, "future_images": batch.images,
                                       "proprio": batch.proprio, "future_proprio": batch.proprio,
                                       "actions": torch.zeros(1, K, A), "value": torch.zeros(1)})
    cond = torch.tensor(policy.layout.conditioning_mask("policy"))
    torch.testing.assert_close(prefix[:, :, cond], full[:, :, cond], atol=1e-5, rtol=1e-5)


def test_instruction_is_encoded_once_and_changes_the_output(policy):
    encoder = policy.text.encoder
    calls = []
    original = encoder.encode
    encoder.encode = lambda texts: calls.append(list(texts)) or original(texts)
    try:
        a = policy(observation(8, instruction="open the drawer"), seed=1, decode_images=False).actions
        b = policy(observation(8, instruction="open the drawer"), seed=1, decode_images=False).actions
        c = policy(observation(8, instruction="close the window"), seed=1, decode_images=False).actions
    finally:
        encoder.encode = original
    assert calls == [["open the drawer"], ["close the window"]]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6


@pytest.mark.parametrize("bad, message", [
    (lambda o: o["images"].pop("front"), "camera 'front' missing"),
    (lambda o: o.update(proprio=np.zeros(5)), "proprio of shape (3,)"),
    (lambda o: o.update(proprio=np.array([0.0, np.nan, 1.0])), "finite proprio"),
    (lambda o: o["images"].update(wrist=np.zeros((8, 8), dtype=np.uint8)), "(H, W, 3)"),
])
def test_bad_observations_raise_one_line_errors(policy, bad, message):
    obs = observation(9)
    bad(obs)
    with pytest.raises(CosmosPolicyError) as err:
        policy(obs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CosmosPolicyError, match="checkpoint not found"):
        CosmosPolicy.from_checkpoint(tmp_path / "nope.ckpt")


def test_predict_cli_writes_robot_unit_predictions(ckpt, tmp_path):
    out = tmp_path / "pred"
    rc = main(["predict", "--model", "cosmos_policy_lightning.model.module.CosmosPolicyModule",
               "--model.vae", str(ckpt.parent / "tiny_vae"), "--model.test_num_steps", "2",
               "--data", "cosmos_policy_lightning.data.datamodule.CosmosDataModule",
               "--data.data_dir", str(ckpt.parent / "data"), "--data.num_workers", "0",
               "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.callbacks+=cosmos_policy_lightning.training.callbacks.PredictionWriter",
               f"--trainer.callbacks.output_dir={out}"])
    assert rc == 0
    pred = np.load(out / "predictions.npz")
    manifest = json.loads((ckpt.parent / "data" / "manifest.json").read_text())
    n_val = manifest["counts"]["validation"]["samples"]
    assert pred["actions"].shape == (n_val, K, A) == pred["true_actions"].shape
    stats = json.loads((ckpt.parent / "data" / "stats.json").read_text())["successful"]["action"]
    assert np.all(pred["actions"] >= np.array(stats["min"]) - 1e-5)
    assert np.all(pred["actions"] <= np.array(stats["max"]) + 1e-5)
    assert np.all((pred["value"] >= 0) & (pred["value"] <= 1))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == n_val
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == n_val and summary["action_mae"] > 0
