"""The latent cache (data/latent_cache.py): cached latents equal the online encoding, mismatched caches are
refused in one line, a training step from the cache gives the online loss, and building resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.data.latent_cache import (
    LATENTS,
    build_latent_cache,
    check_cache_matches_model,
    kept_frames,
    read_cache_manifest,
)
from cosmos_policy_lightning.errors import DataError
from cosmos_policy_lightning.layout import SequenceLayout
from cosmos_policy_lightning.model.vae import VideoVAE
from cosmos_policy_lightning.model.module import CosmosPolicyModule
from cosmos_policy_lightning.model.sequence import PixelSequenceEncoder

from ..fixtures.shard_factory import HashTextEncoder, TOY_EMBODIMENT, standard_episodes, toy_embodiment, write_dataset

# A small random AutoencoderKLWan: the cache must reproduce whatever VAE it is given.
VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
       "temperal_downsample": [False, True, True], "latents_mean": [0.1] * 16, "latents_std": [0.9] * 16}
OTHER_VAE = {**VAE, "latents_std": [1.1] * 16}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_dataset(root / "data", standard_episodes(3, 1, 2, 1, length=6), text_encoder=HashTextEncoder(),
                  samples_per_shard=12)
    torch.manual_seed(0)
    vae = VideoVAE(VAE)
    cache = build_latent_cache(root / "data", PixelSequenceEncoder(vae), root / "latents", augment=True,
                               augment_views=2, dtype="float32",
                               batch_size=5, progress=False)
    return root, vae, cache


def _module(vae) -> CosmosPolicyModule:
    torch.manual_seed(0)
    m = CosmosPolicyModule(embodiment=TOY_EMBODIMENT, text_dim=HashTextEncoder.dim, vae=VAE,
                           image_log_every_n_steps=0)
    m.vae = vae  # the very weights the cache was built with
    m.configure_model()
    return m


def _dm(root, cache: bool, **kw) -> CosmosDataModule:
    extra = dict(latent_cache=True, vae="unused: the cache exists", latent_dir=str(root / "latents"),
                 latent_views=2, latent_dtype="float32") if cache else {}
    return CosmosDataModule(str(root / "data"), num_workers=0, batch_size=4, val_batch_size=6, **extra, **kw)


def _held_out_batches(dm):
    dm.setup("validate")
    return list(dm.val_dataloader())


def test_cached_latents_equal_online_encoding(toy):
    root, vae, _ = toy
    m = _module(vae)
    online, cached = _held_out_batches(_dm(root, False)), _held_out_batches(_dm(root, True))
    assert len(online) == len(cached) > 0
    for a, b in zip(online, cached):
        assert a["episode"] == b["episode"] and torch.equal(a["step"], b["step"])
        assert "latents" in b and "images" not in b
        ea, eb = m.encode_batch(a), m.encode_batch(b)
        assert ea.shape == eb.shape
        torch.testing.assert_close(eb, ea, rtol=1e-5, atol=1e-5)


def test_training_views_are_augmented_and_test_view_is_centre_crop(toy):
    root, vae, cache = toy
    manifest = read_cache_manifest(cache)
    assert manifest["status"] == "complete" and manifest["views"] == {"train": 3, "validation": 1}
    layout = SequenceLayout.from_embodiment(toy_embodiment())
    assert manifest["frames"] == kept_frames(layout) == [0, 2, 3, 6, 7]
    import webdataset as wds

    train = next(iter(wds.DataPipeline(wds.SimpleShardList([str(cache / "train-000000.tar")]),
                                       wds.tarfile_to_samples())))
    views = np.load(__import__("io").BytesIO(train[LATENTS]))
    assert views.shape == (3, 16, 5, 4, 4) and views.dtype == np.float32
    # three different pictures of the same step, each a real encoding (finite, not constant)
    assert np.isfinite(views).all()
    assert not np.allclose(views[0], views[1]) and not np.allclose(views[1], views[2])
    # the blank first frame does not depend on the images
    np.testing.assert_allclose(views[0, :, 0], views[2, :, 0], atol=1e-6)
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(
        e["name"] for e in manifest["shards"])


def test_one_training_step_from_the_cache_gives_the_online_loss(toy):
    root, vae, _ = toy
    online, cached = _held_out_batches(_dm(root, False))[0], _held_out_batches(_dm(root, True))[0]
    losses = []
    for batch in (online, cached):
        m = _module(vae)
        m.train()
        _, _, loss, _ = m._noised_step(batch)
        loss.backward()
        losses.append((loss.item(), m.dit.proj_out.weight.grad.clone()
                       if hasattr(m.dit, "proj_out") else next(m.dit.parameters()).grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-4, atol=1e-6)


def test_training_stream_reads_latent_batches(toy):
    root, _, _ = toy
    dm = _dm(root, True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (4, 16, 9, 4, 4) and batch["latents"].dtype == torch.float32
    # vector frames are left for the model to inject
    for name in ("proprio", "action", "future_proprio", "value"):
        assert batch["latents"][:, :, SequenceLayout.from_embodiment(dm.embodiment).index(name)].abs().sum() == 0


def test_a_cache_with_another_fingerprint_is_refused_in_one_line(toy):
    root, vae, cache = toy
    with pytest.raises(DataError) as info:
        build_latent_cache(root / "data", PixelSequenceEncoder(vae), cache, augment=True, augment_views=1,
                           dtype="float32", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "augment_views (cache 2, expected 1)" in msg and str(cache) in msg
    with pytest.raises(DataError) as info:
        build_latent_cache(root / "data", PixelSequenceEncoder(VideoVAE(OTHER_VAE)), cache, augment=True, augment_views=2,
                           dtype="float32", progress=False)
    assert "vae (cache 'sha256:" in str(info.value) and "\n" not in str(info.value)


def test_the_model_refuses_a_cache_of_another_vae(toy):
    root, vae, cache = toy
    manifest = read_cache_manifest(cache)
    layout = SequenceLayout.from_embodiment(toy_embodiment())
    check_cache_matches_model(manifest, cache, vae.weights_fingerprint(), layout)  # same VAE: accepted
    with pytest.raises(DataError, match="latents were encoded by VAE .* but the model's VAE is") as info:
        check_cache_matches_model(manifest, cache, VideoVAE(OTHER_VAE).weights_fingerprint(), layout)
    assert "\n" not in str(info.value)
    other = SequenceLayout.from_embodiment(toy_embodiment(name="other", cameras=[{"name": "front", "role": "primary"}]))
    with pytest.raises(DataError, match="another sequence layout"):
        check_cache_matches_model(manifest, cache, vae.weights_fingerprint(), other)


def test_vae_fingerprint_is_about_weights_not_paths(tmp_path):
    torch.manual_seed(0)
    a = VideoVAE(VAE)
    a.vae.save_pretrained(tmp_path / "one")
    a.vae.save_pretrained(tmp_path / "two")
    assert VideoVAE(str(tmp_path / "one")).weights_fingerprint() == VideoVAE(str(tmp_path / "two")).weights_fingerprint()
    torch.manual_seed(1)
    assert VideoVAE(VAE).weights_fingerprint() != a.weights_fingerprint()


def test_an_interrupted_cache_resumes_and_gives_the_same_shards(toy, tmp_path):
    root, vae, cache = toy
    out = tmp_path / "again"
    args = dict(augment=True, augment_views=2, dtype="float32", batch_size=5, progress=False)
    build_latent_cache(root / "data", PixelSequenceEncoder(vae), out, **args)
    # Simulate a run killed after its first shard: the manifest lists one shard, status incomplete.
    manifest = json.loads((out / S.MANIFEST).read_text())
    first = manifest["shards"][0]["name"]
    for e in manifest["shards"][1:]:
        (out / e["name"]).unlink()
    manifest["shards"], manifest["status"] = manifest["shards"][:1], "incomplete"
    (out / S.MANIFEST).write_text(json.dumps(manifest))
    before = (out / first).stat().st_mtime_ns
    build_latent_cache(root / "data", PixelSequenceEncoder(vae), out, **args)
    assert (out / first).stat().st_mtime_ns == before  # kept, not re-encoded
    for p in cache.glob("*.tar"):  # same batches as the fixture's build: byte-identical shards
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert read_cache_manifest(out)["status"] == "complete"


def test_float16_cache_is_within_half_precision(toy, tmp_path):
    root, vae, cache = toy
    half = build_latent_cache(root / "data", PixelSequenceEncoder(vae), tmp_path / "half", augment=True, augment_views=2,
                              dtype="float16", progress=False)
    import webdataset as wds

    def first(path):
        return np.load(__import__("io").BytesIO(next(iter(wds.DataPipeline(
            wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())))[LATENTS]))

    a, b = first(cache / "validation-000000.tar"), first(half / "validation-000000.tar")
    assert b.dtype == np.float16
    np.testing.assert_allclose(b.astype(np.float32), a, rtol=2e-3, atol=2e-3)
