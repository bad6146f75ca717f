"""Sharing policies on the Hugging Face Hub: ``cosmos-policy push-to-hub --local_dir`` writes the folder
(diffusers DiT, config, statistics, text embeddings, model card), and ``CosmosPolicy.from_pretrained``
loads it back -- from the folder, and by Hub id from a pre-filled Hub cache with ``HF_HUB_OFFLINE=1``
in a fresh process -- predicting exactly what the original checkpoint predicts. Nothing is uploaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from cosmos_policy_lightning.checkpoints.policy_folder import read_text_embeddings
from cosmos_policy_lightning.checkpoints.importer import import_checkpoint
from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.model.dit import build_transformer

from ..fixtures.checkpoint_factory import make_checkpoint, tiny_vae_dir
from ..conftest import REPO
from ..fixtures.reference_factory import write_reference_checkpoint, write_reference_stats, write_t5_pickle
from ..fixtures.shard_factory import TOY_EMBODIMENT, HashTextEncoder, toy_observation as observation
from ..fixtures.hub_cache import write_hub_cache

INSTRUCTIONS = ["push the block", "open the top drawer slowly"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hub_ckpt"), text_encoder=HashTextEncoder())


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub_folder") / "toy-policy"
    assert main(["push-to-hub", str(trained), "someone/toy-policy", "--local_dir", str(out),
                 "--datasets", '["someone/toy-demos"]']) == 0
    return out


def _predict(policy, instruction):
    out = policy.predict(observation(3, instruction), num_steps=2, seed=7, decode_images=False)
    return np.concatenate([out.actions.ravel(), out.future_proprio.ravel(), np.ravel(out.value)])


def test_folder_has_the_dit_config_statistics_embeddings_and_card(trained, folder):
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["README.md", "config.json", "statistics.json", "text_embeddings.safetensors",
                     "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # a local VAE is copied in
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "cosmos-policy-lightning" and config["embodiment"]["name"] == "toy"
    assert config["layout"]["num_latent_frames"] == 9 and config["normalization"] == {"action": "minmax",
                                                                                      "proprio": "minmax"}
    assert config["text_encoder"] == "test:hash-words" and config["vae"] == "vae"
    dit_config = json.loads((folder / "transformer" / "config.json").read_text())
    assert dit_config["_class_name"] == "CosmosTransformer3DModel" and dit_config["in_channels"] == 18
    identity, texts = read_text_embeddings(folder / "text_embeddings.safetensors")
    assert identity == "test:hash-words" and sorted(texts) == sorted(INSTRUCTIONS)
    assert texts["push the block"].shape == (4, 8)  # 3 words + end token, 8-d
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "robotics" and front["license"] == "apache-2.0"
    assert front["datasets"] == ["someone/toy-demos"] and front["library_name"] == "cosmos-policy-lightning"
    assert "CosmosPolicy.from_pretrained(\"someone/toy-policy\")" in card


def test_round_trip_through_the_folder_predicts_what_the_checkpoint_predicts(trained, folder):
    original = CosmosPolicy.from_checkpoint(trained, text_encoder=HashTextEncoder())
    loaded = CosmosPolicy.from_pretrained(folder)   # no text encoder: the folder's embeddings are used
    for instruction in INSTRUCTIONS:
        np.testing.assert_array_equal(_predict(loaded, instruction), _predict(original, instruction))
    assert loaded.center_crop == original.center_crop and loaded.module.hparams.test_num_steps == 5
    for key, value in original.module.dit.state_dict().items():
        assert torch.equal(loaded.module.dit.state_dict()[key], value), key


def test_round_trip_by_hub_id_from_a_prefilled_cache_offline(trained, folder, tmp_path):
    cache = tmp_path / "hub"
    write_hub_cache(cache, "someone/toy-policy", {str(p.relative_to(folder)): p for p in folder.rglob("*")
                                                      if p.is_file()})
    script = ("import json, sys, numpy as np\n"
              "from cosmos_policy_lightning.inference.policy import CosmosPolicy\n"
              "from tests.checkpoints.test_policy_folder import _predict\n"
              "policy = CosmosPolicy.from_pretrained('someone/toy-policy')\n"
              "print(json.dumps(_predict(policy, 'open the top drawer slowly').tolist()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    remote = np.asarray(json.loads(run.stdout.strip().splitlines()[-1]), dtype=np.float32)
    original = CosmosPolicy.from_checkpoint(trained, text_encoder=HashTextEncoder())
    np.testing.assert_array_equal(remote, _predict(original, "open the top drawer slowly"))
    # a repository the cache does not hold: one line
    run = subprocess.run([sys.executable, "-c", "from cosmos_policy_lightning.inference.policy import CosmosPolicy\n"
                          "CosmosPolicy.from_pretrained('someone/other-policy')"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "CosmosPolicyError: someone/other-policy: cannot fetch the policy" in run.stderr


def test_imported_reference_checkpoint_shares_its_base_model_licence_and_t5_embeddings(tmp_path):
    torch.manual_seed(0)
    tiny = {"base": "tiny", "text_embed_dim": 16}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(TOY_EMBODIMENT))
    pt = write_reference_checkpoint(tmp_path / "p.pt", build_transformer(tiny))
    write_reference_stats(tmp_path / "dataset_statistics.json", 2, 3)
    write_t5_pickle(tmp_path / "t5.pkl", {"stack the cups": 3}, 16)
    ckpt = import_checkpoint(str(pt), tmp_path / "toy.yaml", tmp_path / "imported.ckpt", transformer=tiny,
                             stats=tmp_path / "dataset_statistics.json", t5_embeddings=tmp_path / "t5.pkl",
                             vae=str(tiny_vae_dir(tmp_path)))["output"]
    out = tmp_path / "folder"
    assert main(["push-to-hub", ckpt, "me/toy", "--local_dir", str(out),
                 "--base_model", "nvidia/Cosmos-Policy-Toy"]) == 0
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model"] == "nvidia/Cosmos-Policy-Toy" and front["license"] == "other"
    assert front["license_name"] == "nvidia-open-model-license"
    identity, texts = read_text_embeddings(out / "text_embeddings.safetensors")
    assert identity == "t5:google-t5/t5-11b" and texts["stack the cups"].shape == (3, 16)
    policy = CosmosPolicy.from_pretrained(out)
    assert policy.module.text_encoder_identity == "t5:google-t5/t5-11b"
    act = policy.predict(observation(1, "stack the cups"), num_steps=1, seed=0, decode_images=False).actions
    assert act.shape == (4, 2) and np.isfinite(act).all()


def test_bad_inputs_fail_in_one_line(trained, tmp_path, capsys):
    assert main(["push-to-hub", str(trained), "no-slash", "--local_dir", str(tmp_path / "x")]) == 2
    assert "repo_id must be <user or org>/<name>" in capsys.readouterr().err
    assert main(["push-to-hub", str(tmp_path / "missing.ckpt"), "a/b", "--local_dir", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "notapolicy").mkdir()
    (tmp_path / "notapolicy" / "config.json").write_text("{}")
    with pytest.raises(CosmosPolicyError, match="not a Cosmos Policy folder"):
        CosmosPolicy.from_pretrained(tmp_path / "notapolicy")


def test_the_instruction_embeddings_come_from_the_checkpoint_not_the_data_folder(trained, tmp_path):
    import shutil

    raw = torch.load(trained, map_location="cpu", weights_only=False)
    assert sorted(raw["cosmos_policy"]["text_embeddings"]) == sorted(INSTRUCTIONS)  # fit stored them
    copy = tmp_path / "alone.ckpt"
    shutil.copyfile(trained, copy)
    raw["datamodule_hyper_parameters"] = {"data_dir": str(tmp_path / "nowhere")}
    torch.save(raw, copy)
    assert main(["push-to-hub", str(copy), "someone/toy", "--local_dir", str(tmp_path / "f")]) == 0
    _, texts = read_text_embeddings(tmp_path / "f" / "text_embeddings.safetensors")
    assert sorted(texts) == sorted(INSTRUCTIONS)


def test_a_lora_checkpoint_shares_merged_with_its_peft_adapter(tmp_path):
    from ..fixtures.checkpoint_factory import make_lora_checkpoint

    base = make_checkpoint(tmp_path / "base")
    adapted = make_lora_checkpoint(tmp_path / "lora", base, steps=2)
    out = tmp_path / "folder"
    assert main(["push-to-hub", str(adapted), "someone/toy-lora", "--local_dir", str(out)]) == 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                   "cosmos_policy_base.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["settings"]["rank"] == 4 and config["lora"]["merged_into_transformer"]
    for path in out.rglob("*.json"):
        assert str(tmp_path) not in path.read_text(), f"{path.name} names a local path"
    obs = observation(2, "")
    obs["images"]["front"] = obs["images"]["front"][:32, :32]
    want = CosmosPolicy.from_checkpoint(adapted).predict(obs, num_steps=2, seed=1, decode_images=False).actions
    import shutil

    shutil.rmtree(tmp_path / "base")  # the base is not needed: transformer/ is merged
    got = CosmosPolicy.from_pretrained(out).predict(obs, num_steps=2, seed=1, decode_images=False).actions
    np.testing.assert_allclose(got, want, atol=1e-5)
