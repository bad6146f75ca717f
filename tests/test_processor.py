"""The inference record and the one pre/post-processing path shared by training and deployment
(``inference_record.py``, ``processor.py``): what a checkpoint carries, and that a deployed policy turns
an observation into exactly the normalised proprio and text tokens a held-out training batch holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.inference_record import InferenceRecord
from cosmos_policy_lightning.processor import PolicyProcessor
from cosmos_policy_lightning.text import pad_text_batch

from .fixtures.checkpoint_factory import make_checkpoint
from .fixtures.shard_factory import HashTextEncoder, standard_episodes, write_dataset

MIX = {"policy": 0.1, "world_model": 0.45, "value_future_state": 0.45}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained with a planning-style mix, 5 text tokens and augmentation, with
    ``datamodule_hyper_parameters`` removed from the file: the record alone must carry the facts."""
    root = tmp_path_factory.mktemp("record")
    path = make_checkpoint(root, text_encoder=HashTextEncoder(), objective_mix=MIX, max_text_tokens=5)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert raw.pop("datamodule_hyper_parameters")["max_text_tokens"] == 5
    torch.save(raw, path)
    return root, path


@pytest.fixture(scope="module")
def toy_record(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_record")
    write_dataset(root, standard_episodes(2, 1, 1, 1, length=5), text_encoder=HashTextEncoder())
    return CosmosDataModule(str(root), num_workers=0, max_text_tokens=7, objective_mix=MIX).inference_record()


def test_the_record_round_trips_and_says_what_inference_needs(toy_record):
    rec = toy_record
    assert rec.max_text_tokens == 7 and rec.text_encoder == HashTextEncoder.identity
    assert rec.test_transform == "center_crop" and rec.center_crop
    assert rec.objectives == ("policy", "world_model", "value_future_state")
    back = InferenceRecord.from_dict(rec.to_dict())
    assert back.to_dict() == rec.to_dict()
    assert back.layout.to_dict() == rec.layout.to_dict()


def test_a_record_written_before_the_typed_fields_reads_with_defaults(toy_record):
    legacy = {k: v for k, v in toy_record.to_dict().items()
              if k not in ("max_text_tokens", "objective_mix", "test_transform")}
    legacy["center_crop"] = True
    rec = InferenceRecord.from_dict(legacy)
    assert rec.max_text_tokens == 512 and rec.objective_mix == {} and rec.test_transform == "center_crop"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("stats"), "lacks 'stats'"),
    (lambda d: d["layout"]["slots"].reverse(), "stored sequence layout differs"),
    (lambda d: d.update(test_transform="flip"), "test_transform must be one of center_crop, none"),
    (lambda d: d.update(objective_mix={"jump": 1.0}), "unknown objective 'jump'"),
    (lambda d: d.update(max_text_tokens=0), "max_text_tokens must be an integer >= 1"),
    (lambda d: d["stats"].pop("all"), "malformed statistics"),
])
def test_bad_records_are_refused_in_one_line(toy_record, change, message):
    data = toy_record.to_dict()
    change(data)
    with pytest.raises(CosmosPolicyError) as err:
        InferenceRecord.from_dict(data, "ckpt.ckpt")
    assert message in str(err.value) and str(err.value).startswith("ckpt.ckpt") and "\n" not in str(err.value)


def test_a_checkpoint_without_data_module_settings_still_deploys_as_trained(trained):
    _, path = trained
    policy = CosmosPolicy.from_checkpoint(path, text_encoder=HashTextEncoder())
    assert policy.text.max_tokens == 5 and policy.record.objective_mix == pytest.approx(MIX)
    assert policy.value_objective == "value_future_state"  # chosen from the recorded mix
    assert policy.center_crop


def test_deployment_normalises_and_tokenises_exactly_like_a_training_batch(trained):
    """The same held-out sample, as the data module batches it and as a robot would send it: the policy's
    processor gives the batch's normalised proprio and its text tokens (cut to the recorded 5)."""
    root, path = trained
    policy = CosmosPolicy.from_checkpoint(path, text_encoder=HashTextEncoder())
    dm = CosmosDataModule(str(root / "data"), num_workers=0, val_batch_size=4, max_text_tokens=5, objective_mix=MIX)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    robot = policy.processor.to_robot({"proprio": batch["proprio"], "actions": batch["actions"]}, clamp=False)
    instructions = ["push the red block to the left corner"] * 4  # 8 tokens: cut to 5 like training
    prepared = policy.prepare([{"images": {c: batch["images"][i, n].numpy() for n, c in
                                           enumerate(policy.embodiment.camera_names)},
                                "proprio": robot["proprio"][i].numpy(), "instruction": text}
                               for i, text in enumerate(instructions)])
    torch.testing.assert_close(prepared.proprio, batch["proprio"], atol=1e-6, rtol=1e-6)
    emb = policy.text.get(instructions[0])
    assert emb.shape == (5, HashTextEncoder.dim) and prepared.text.shape == (4, 5, HashTextEncoder.dim)
    expected = torch.from_numpy(HashTextEncoder().encode(instructions[:1])[0][:5].astype(np.float16).astype(np.float32))
    torch.testing.assert_close(prepared.text[0], expected)
    assert prepared.text_mask.all()
    # robot units and back: the action normaliser of training, inverted by the processor
    again = policy.processor.normalize_actions(robot["actions"])
    torch.testing.assert_close(again, batch["actions"], atol=1e-5, rtol=1e-5)


def test_outputs_are_clamped_and_the_value_mapped_to_unit_range(toy_record):
    proc = PolicyProcessor(toy_record)
    norm = proc.action_normalizer
    x = torch.tensor([[[-3.0, 0.0], [0.5, 4.0], [1.0, -1.0], [0.0, 0.0]]])
    out = proc.to_robot({"actions": x, "value": torch.tensor([-2.0, -1.0, 0.0, 1.0])})
    torch.testing.assert_close(out["actions"], norm.unnormalize(x.clamp(-1, 1).double()).float())
    torch.testing.assert_close(out["value"], torch.tensor([0.0, 0.0, 0.5, 1.0]))
    with pytest.raises(KeyError):
        proc.to_robot({"latents": x})


def test_text_padding_is_one_rule():
    text, mask = pad_text_batch([torch.ones(2, 3), torch.ones(4, 3), torch.ones(1, 3)])
    assert text.shape == (3, 4, 3) and mask.sum(1).tolist() == [2, 4, 1]
    assert text[0, 2:].abs().sum() == 0 and bool(mask[1].all())
    empty, empty_mask = pad_text_batch([torch.zeros(0, 0)] * 2)
    assert empty.shape == (2, 0, 0) and empty_mask.shape == (2, 0)
