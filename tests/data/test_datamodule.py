"""CosmosDataModule over real tar shards: batch contract, objective mix, success balance, exact
validation passes, fingerprint / embodiment checks, normalisation, Lightning and jsonargparse."""

from __future__ import annotations

import collections
import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.augment import test_transform as centre_crop
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.data.dataset_info import read_dataset_info
from cosmos_policy_lightning.errors import CosmosPolicyError, DataError
from cosmos_policy_lightning.layout import OBJECTIVES

from ..fixtures.shard_factory import EpisodeSpec, HashTextEncoder, standard_episodes, toy_embodiment, write_dataset

POLICY = OBJECTIVES.index("policy")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Training split with 75% of samples from successes, so balancing to 50% has to act."""
    return write_dataset(tmp_path_factory.mktemp("toy"), standard_episodes(6, 2, 3, 2), samples_per_shard=20)


def _collect(loader, limit=None):
    batches = []
    for i, b in enumerate(loader):
        batches.append(b)
        if limit is not None and i + 1 >= limit:
            break
    return batches


def _cat(batches, key):
    if key == "episode":
        return [e for b in batches for e in b[key]]
    return torch.cat([b[key] for b in batches])


def test_batch_contract(toy):
    dm = CosmosDataModule(str(toy.root), batch_size=5, num_workers=0, shuffle_buffer=30)
    dm.setup("fit")
    assert dm.embodiment.camera_names == ("wrist", "front") and dm.text_dim == 8
    assert dm.text_encoder_identity == HashTextEncoder.identity
    assert dm.manifest["stats_fingerprint"] == dm.stats.fingerprint
    assert set(dm.normalizers) == {"action", "proprio"}
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        b = batch["images"].shape[0]
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (b, 2, 32, 32, 3)
        assert batch["future_images"].dtype == torch.uint8 and batch["future_images"].shape == (b, 2, 32, 32, 3)
        assert batch["proprio"].dtype == torch.float32 and batch["proprio"].shape == (b, 3)
        assert batch["future_proprio"].shape == (b, 3) and batch["actions"].shape == (b, 4, 2)
        assert batch["actions"].dtype == torch.float32
        for key, dtype in (("value", torch.float32), ("objective", torch.int64), ("success", torch.bool),
                           ("score", torch.float32), ("step", torch.int64)):
            assert batch[key].dtype == dtype and batch[key].shape == (b,), key
        assert batch["value"].abs().max() <= 1.0 and len(batch["episode"]) == b
        text, mask = batch["text"], batch["text_mask"]
        assert text.dtype == torch.float32 and mask.dtype == torch.bool and text.shape[:2] == mask.shape
        assert text.shape[2] == 8 and mask.any(1).all()
        # Padded to the longest instruction in the batch; padding rows are zero.
        assert mask.sum(1).max() == text.shape[1] and (text[~mask] == 0).all()
        for i, ep in enumerate(batch["episode"]):
            meta = toy.records[S.sample_key(ep, int(batch["step"][i]))]["meta"]
            assert int(mask[i].sum()) == len(meta["instruction"].split()) + 1
            assert bool(batch["success"][i]) == meta["success"]
            assert float(batch["value"][i]) == pytest.approx(meta["value"])


def test_objective_mix_and_success_balance(toy):
    dm = CosmosDataModule(str(toy.root), batch_size=16, num_workers=0, augment=False, shuffle_buffer=60,
                          samples_per_epoch=640, seed=1)
    batches = _collect(dm.train_dataloader())
    assert len(batches) == 40
    obj, success = _cat(batches, "objective"), _cat(batches, "success")
    n = len(obj)
    freq = {o: float((obj == i).sum()) / n for i, o in enumerate(OBJECTIVES)}
    assert freq["policy"] == pytest.approx(0.5, abs=0.07)
    assert freq["world_model"] == pytest.approx(0.25, abs=0.06) and freq["value"] == pytest.approx(0.25, abs=0.06)
    assert freq["value_future_state"] == 0 and freq["q_value"] == 0
    assert success[obj == POLICY].all()
    # The data holds 75% successes; non-policy samples are rebalanced to 50/50.
    non_policy = success[obj != POLICY].float()
    assert non_policy.mean().item() == pytest.approx(0.5, abs=0.09)
    # Samples are shuffled across episodes, not read in shard order.
    assert len(set(_cat(batches[:2], "episode"))) >= 4


def test_finetune_mix_by_configuration_only(toy):
    mix = {"policy": 0.1, "world_model": 0.45, "value_future_state": 0.45}
    dm = CosmosDataModule(str(toy.root), batch_size=16, num_workers=0, augment=False, shuffle_buffer=60,
                          samples_per_epoch=480, objective_mix=mix, seed=2)
    obj = _cat(_collect(dm.train_dataloader()), "objective")
    for name, weight in mix.items():
        assert float((obj == OBJECTIVES.index(name)).float().mean()) == pytest.approx(weight, abs=0.07), name
    assert not (obj == OBJECTIVES.index("value")).any()
    assert dm.objective_mix == pytest.approx(mix)


def test_without_failures_and_without_successes(tmp_path):
    only_success = write_dataset(tmp_path / "s", [EpisodeSpec(f"ep{i}", 8, True) for i in range(3)]
                                 + [EpisodeSpec("v0", 8, True, "validation")])
    dm = CosmosDataModule(str(only_success.root), batch_size=8, num_workers=0, augment=False, shuffle_buffer=10)
    with pytest.warns(UserWarning, match="no failed episodes"):
        dm.setup("fit")
    assert _cat(_collect(dm.train_dataloader(), 4), "success").all()

    only_failure = write_dataset(tmp_path / "f", [EpisodeSpec(f"ep{i}", 8, False) for i in range(3)])
    with pytest.raises(DataError, match="policy"):
        CosmosDataModule(str(only_failure.root), num_workers=0).setup("fit")
    # World-model / value training on failures alone is fine.
    dm = CosmosDataModule(str(only_failure.root), batch_size=8, num_workers=0, augment=False, shuffle_buffer=10,
                          objective_mix={"world_model": 1, "value": 1})
    batch = next(iter(dm.train_dataloader()))
    assert not batch["success"].any() and (batch["objective"] != POLICY).all()


def test_unknown_outcome_counts_fall_back_after_stall(tmp_path):
    """Without success/failure counts in the manifest, a missing class is detected from the stream."""
    ds = write_dataset(tmp_path, [EpisodeSpec(f"ep{i}", 8, True) for i in range(3)])
    manifest = json.loads((ds.root / S.MANIFEST).read_text())
    del manifest["counts"]
    (ds.root / S.MANIFEST).write_text(json.dumps(manifest))
    dm = CosmosDataModule(str(ds.root), batch_size=8, num_workers=0, augment=False, shuffle_buffer=5, seed=3)
    with pytest.warns(UserWarning, match="no failed sample"):
        batches = _collect(dm.train_dataloader(), 3)
    assert _cat(batches, "success").all()


def _val_pass(dm):
    batches = _collect(dm.val_dataloader())
    keys = [S.sample_key(e, int(s)) for b in batches for e, s in zip(b["episode"], b["step"])]
    return batches, keys


def test_validation_pass_is_exact_over_two_workers(toy):
    dm2 = CosmosDataModule(str(toy.root), batch_size=4, num_workers=2, shuffle_buffer=10)
    dm2.setup("validate")
    assert len(toy.shard_names["validation"]) >= 3
    batches, keys = _val_pass(dm2)
    assert collections.Counter(keys) == collections.Counter(toy.keys("validation"))  # each exactly once
    # Twice in a row (persistent workers) gives the same pass.
    assert sorted(_val_pass(dm2)[1]) == sorted(keys)
    obj2 = dict(zip(keys, _cat(batches, "objective").tolist()))
    # Objectives are a deterministic function of the sample, independent of the worker count.
    dm0 = CosmosDataModule(str(toy.root), batch_size=7, num_workers=0)
    batches0, keys0 = _val_pass(dm0)
    assert dict(zip(keys0, _cat(batches0, "objective").tolist())) == obj2
    success = _cat(batches0, "success")
    obj = _cat(batches0, "objective")
    assert success[obj == POLICY].all()
    counts = collections.Counter(obj.tolist())
    assert set(counts) == {OBJECTIVES.index(o) for o in ("policy", "world_model", "value")}
    assert min(counts.values()) >= len(keys0) // 5
    # Validation images are the deterministic centre crop of the stored JPEGs.
    b = batches0[0]
    rec = toy.records[S.sample_key(b["episode"][0], int(b["step"][0]))]
    stored = torch.from_numpy(np.stack(rec["images"]))
    assert (b["images"][0].float() - centre_crop(stored).float()).abs().mean() < 3.0  # JPEG q95 error only


def test_normalisation_matches_stats(toy):
    dm = CosmosDataModule(str(toy.root), batch_size=8, num_workers=0)
    dm.setup("validate")
    stats = json.loads((toy.root / S.STATS).read_text())
    lo, hi = np.array(stats["successful"]["action"]["min"]), np.array(stats["successful"]["action"]["max"])
    plo, phi = np.array(stats["successful"]["proprio"]["min"]), np.array(stats["successful"]["proprio"]["max"])
    for batch in _collect(dm.val_dataloader(), 3):
        for i, ep in enumerate(batch["episode"]):
            rec = toy.records[S.sample_key(ep, int(batch["step"][i]))]
            np.testing.assert_allclose(batch["actions"][i].numpy(), 2 * (rec["actions"] - lo) / (hi - lo) - 1,
                                       atol=1e-5)
            np.testing.assert_allclose(batch["proprio"][i].numpy(), 2 * (rec["proprio"] - plo) / (phi - plo) - 1,
                                       atol=1e-5)
            np.testing.assert_allclose(batch["future_proprio"][i].numpy(),
                                       2 * (rec["future_proprio"] - plo) / (phi - plo) - 1, atol=1e-5)


def test_stale_statistics_and_wrong_embodiment_are_refused(tmp_path, toy):
    ds = write_dataset(tmp_path / "d", standard_episodes(2, 1, 1, 0, length=6))
    stats = json.loads((ds.root / S.STATS).read_text())
    stats["fingerprint"] = "0123456789abcdef"
    (ds.root / S.STATS).write_text(json.dumps(stats))
    with pytest.raises(DataError) as err:
        CosmosDataModule(str(ds.root), num_workers=0).setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and str(ds.root / S.STATS) in msg and str(ds.root / S.MANIFEST) in msg
    assert "0123456789abcdef" in msg

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**toy_embodiment().to_dict(), "proprio": {"dim": 5}}))
    with pytest.raises(DataError, match="proprio.dim") as err:
        read_dataset_info(toy.root, other)
    assert "\n" not in str(err.value)
    renamed = tmp_path / "renamed.yaml"
    cams = toy_embodiment().to_dict()["cameras"]
    renamed.write_text(yaml.safe_dump({**toy_embodiment().to_dict(),
                                       "cameras": [cams[0], {**cams[1], "name": "side"}]}))
    with pytest.raises(DataError, match="cameras"):
        read_dataset_info(toy.root, renamed)
    # The same robot with cameras listed in another order is accepted: batches follow the given order.
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(yaml.safe_dump({**toy_embodiment().to_dict(), "cameras": cams[::-1]}))
    dm = CosmosDataModule(str(toy.root), embodiment=str(swapped), batch_size=2, num_workers=0, augment=False)
    dm_ref = CosmosDataModule(str(toy.root), batch_size=2, num_workers=0, augment=False)
    b, ref = next(iter(dm.val_dataloader())), next(iter(dm_ref.val_dataloader()))
    assert dm.embodiment.camera_names == ("front", "wrist")
    assert torch.equal(b["images"][:, 0], ref["images"][:, 1]) and torch.equal(b["images"][:, 1], ref["images"][:, 0])


def test_bad_arguments_are_one_line_errors(toy):
    for kwargs, match in (({"objective_mix": {"policyy": 1.0}}, "unknown objective"),
                          ({"objective_mix": {"policy": -1.0}}, "policy"),
                          ({"objective_mix": {"policy": 0.0}}, "zero"),
                          ({"success_fraction": 1.5}, "success_fraction"),
                          ({"batch_size": 0}, "batch_size")):
        with pytest.raises(CosmosPolicyError, match=match):
            CosmosDataModule(str(toy.root), **kwargs)
    with pytest.raises(DataError, match="not found"):
        CosmosDataModule(str(toy.root / "missing")).setup("fit")


def test_train_epochs_with_two_workers(toy):
    """Per-rank epoch length is exact whatever the worker count; persistent workers draw fresh samples."""
    dm = CosmosDataModule(str(toy.root), batch_size=4, num_workers=2, shuffle_buffer=20, samples_per_epoch=28)
    loader = dm.train_dataloader()
    assert len(loader) == 7 and dm.train_batches_per_epoch(world_size=2) == 3
    epochs = [_collect(loader) for _ in range(2)]
    assert [len(e) for e in epochs] == [7, 7]
    keys = [[(e, int(s)) for b in ep for e, s in zip(b["episode"], b["step"])] for ep in epochs]
    assert keys[0] != keys[1]
    assert all(b["images"].dtype == torch.uint8 for b in epochs[0])


class _ProbeModule(L.LightningModule):
    """Regresses the normalised action chunk from proprio; counts what it sees."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 8)
        self.seen = collections.Counter()

    def training_step(self, batch, _):
        self.seen["train"] += 1
        return torch.nn.functional.mse_loss(self.net(batch["proprio"]), batch["actions"].flatten(1))

    def validation_step(self, batch, _):
        self.seen["val_samples"] += len(batch["episode"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_and_jsonargparse(toy):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CosmosDataModule, "data")
    cfg = parser.parse_object({"data": {"data_dir": str(toy.root), "batch_size": 6, "num_workers": 0,
                                        "objective_mix": {"policy": 0.1, "world_model": 0.45, "value": 0.45},
                                        "samples_per_epoch": 30}})
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, CosmosDataModule) and dm.objective_weights[POLICY] == pytest.approx(0.1)
    model = _ProbeModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)
    assert model.seen["train"] == 2 * 5 and trainer.global_step == 10
    assert model.seen["val_samples"] == 2 * len(toy.keys("validation"))


def test_loads_a_real_conversion_of_robomimic_hdf5(tmp_path):
    """cosmos-policy convert (robomimic HDF5, failures included, no text encoder) -> the data module."""
    from cosmos_policy_lightning.data.convert import convert

    from ..fixtures import factories as F

    specs = [F.EpisodeSpec(7, 1), F.EpisodeSpec(6, 2, success=False), F.EpisodeSpec(9, 3), F.EpisodeSpec(5, 4),
             F.EpisodeSpec(6, 5, success=False), F.EpisodeSpec(8, 6)]
    emb = F.write_embodiment(tmp_path)
    src = F.write_robomimic(tmp_path / "demos.hdf5", specs, problem_instruction="stack the red block")
    out = tmp_path / "out"
    manifest = convert(str(src), output=str(out), embodiment=str(emb), format="robomimic", val_fraction=0.34,
                       shard_size_mb=0.05, text_encoder="none", progress=False)
    dm = CosmosDataModule(str(out), batch_size=4, num_workers=0, shuffle_buffer=20, samples_per_epoch=32)
    dm.setup("fit")
    assert dm.embodiment.to_dict() == manifest["embodiment"] and dm.text_dim == 0
    assert dm.text_encoder_identity == "none"

    # Validation: every held-out step exactly once, actions normalised by the training successes' range.
    val_eps = set(manifest["splits"]["validation"])
    batches = _collect(dm.val_dataloader())
    keys = [S.sample_key(e, int(s)) for b in batches for e, s in zip(b["episode"], b["step"])]
    expected = [S.sample_key(f"demo_{i}", t) for i, sp in enumerate(specs) if f"demo_{i}" in val_eps
                for t in range(sp.length)]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    train_success = [F.episode_arrays(sp)["actions"] for i, sp in enumerate(specs)
                     if sp.success and f"demo_{i}" not in val_eps]
    lo, hi = np.concatenate(train_success).min(0), np.concatenate(train_success).max(0)
    b = batches[0]
    for i, ep in enumerate(b["episode"]):
        raw = F.episode_arrays(specs[int(ep.split("_")[1])])["actions"]
        t = int(b["step"][i])
        chunk = np.concatenate([raw[t:t + F.K], np.repeat(raw[-1:], max(0, t + F.K - len(raw)), axis=0)])
        np.testing.assert_allclose(b["actions"][i].numpy(), 2 * (chunk - lo) / (hi - lo) - 1, atol=1e-4)
    assert b["text"].shape == (len(b["episode"]), 0, 0) and b["text_mask"].shape == (len(b["episode"]), 0)

    # Training: the policy samples come from the successful training episodes only.
    train = _collect(dm.train_dataloader())
    assert len(train) == 8
    obj, eps = _cat(train, "objective"), _cat(train, "episode")
    for o, e in zip(obj.tolist(), eps):
        assert e not in val_eps
        if o == POLICY:
            assert specs[int(e.split("_")[1])].success
