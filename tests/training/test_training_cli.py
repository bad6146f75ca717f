"""LightningCLI fit / test end to end on CPU, every shipped recipe and datamodule YAML through the real
parser, the 2B recipes on the meta device, and resuming a killed run from ``last``."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.embodiment import Embodiment
from cosmos_policy_lightning.model.vae import VideoVAE
from cosmos_policy_lightning.model.module import CHECKPOINT_KEY, CosmosPolicyModule
from cosmos_policy_lightning.training.cli import CosmosPolicyCLI

from ..conftest import REPO
from ..fixtures.checkpoint_factory import TINY_VAE
from ..fixtures.cli_config import cli_override
from ..fixtures.shard_factory import HashTextEncoder, standard_episodes, write_dataset

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DATAMODULES = sorted((REPO / "datamodules").glob("*.yaml"))
TWO_B = ["libero", "robocasa", "aloha"]


def _scalars_and_images(logdir: Path) -> tuple[set, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for f in glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True):
        ea = EventAccumulator(f, size_guidance={"images": 0, "scalars": 0})
        ea.Reload()
        scalars |= set(ea.Tags()["scalars"])
        images |= set(ea.Tags()["images"])
    return scalars, images


def _recipe_on_cpu(recipe: Path, tmp_path: Path, *extra: str) -> CosmosPolicyCLI:
    """A 2B recipe instantiated (not run) on this CPU: no GPU, no hub here, so a CPU trainer, a random DiT of
    the recipe's config and the tiny VAE, on the data written to ``tmp_path / "data"``."""
    return CosmosPolicyCLI(CosmosPolicyModule, CosmosDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, args=[
                               "--config", str(recipe), "--data.init_args.data_dir", str(tmp_path / "data"),
                               "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
                               "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path),
                               "--model.init_args.pretrained_transformer", "null",
                               "--model.init_args.vae", json.dumps(TINY_VAE), *extra])


def _recipe_data(recipe: Path) -> Path:
    """The data config a recipe names: every recipe has ``data: ../datamodules/<name>.yaml`` (one way)."""
    data = yaml.safe_load(recipe.read_text()).get("data")
    assert isinstance(data, str) and data.startswith("../datamodules/"), \
        f"{recipe.name}: data must name a datamodules/ file (data: ../datamodules/<name>.yaml), got {data!r}"
    assert f"data: {data}   # relative to this file" in recipe.read_text(), recipe.name
    path = (recipe.parent / data).resolve()
    assert path.is_file(), f"{recipe.name}: {data} not found"
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_through_the_cli(recipe, capsys):
    datamodule = yaml.safe_load(_recipe_data(recipe).read_text())
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"].endswith("CosmosPolicyModule")
    assert cfg["data"]["class_path"] == datamodule["class_path"]
    for key, value in datamodule["init_args"].items():  # the recipe's data is its datamodules/ file
        assert cfg["data"]["init_args"][key] == value, key


def test_data_on_the_command_line_overrides_the_recipes(capsys):
    libero = yaml.safe_load((REPO / "datamodules" / "libero.yaml").read_text())["init_args"]
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "recipes" / "aloha.yaml"), "--data",
              str(REPO / "datamodules" / "libero.yaml"), "--print_config"])
    assert info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert (data["data_dir"], data["embodiment"]) == (libero["data_dir"], libero["embodiment"])


@pytest.mark.parametrize("datamodule", DATAMODULES, ids=lambda p: p.stem)
def test_every_datamodule_yaml_parses(datamodule, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--data", str(datamodule),
              "--print_config"])
    assert info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    emb = Embodiment.from_yaml(REPO / cfg["data"]["init_args"]["embodiment"])
    assert emb.name in datamodule.stem


class _T5Sized(HashTextEncoder):
    identity, dim = "test:hash-words-1024", 1024


@pytest.mark.parametrize("name", TWO_B)
def test_2b_recipe_instantiates_on_meta_device(name, tmp_path):
    emb = Embodiment.from_yaml(REPO / "embodiments" / f"{name}.yaml")
    write_dataset(tmp_path / "data", standard_episodes(1, 1, 1, 1, length=2), embodiment=emb,
                  text_encoder=_T5Sized())
    cli = _recipe_on_cpu(REPO / "recipes" / f"{name}.yaml", tmp_path,  # data: datamodules/<name>.yaml
                         "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto")
    model = cli.model
    assert model.hparams.transformer == "cosmos-predict2-2b" and model.hparams.activation_checkpointing
    assert model.layout.num_latent_frames == {"libero": 9, "robocasa": 11, "aloha": 11}[name]
    with torch.device("meta"):
        model.configure_model()
    n = sum(p.numel() for p in model.dit.parameters())
    assert abs(n - 1.96e9) / 1.96e9 < 0.01, n
    assert all(p.is_meta for p in model.dit.parameters())
    assert cli.datamodule.batch_size * 8 * cli.trainer.num_nodes >= 1  # per-GPU batch from the datamodule YAML


def test_fit_then_test_on_cpu(toy_data, tmp_path, capsys):
    over = cli_override(tmp_path, toy_data, max_steps=6)
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    extra = saved[CHECKPOINT_KEY]
    assert extra["embodiment"]["name"] == "toy" and extra["layout"]["num_latent_frames"] == 9
    assert extra["stats"]["fingerprint"] and extra["text_encoder"] == "test:hash-words"
    assert not any(k.startswith("vae.") for k in saved["state_dict"])
    scalars, images = _scalars_and_images(tmp_path / "run")
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/l1/policy/action", "train/l1/policy/value",
                "train/l1/world_model/future_image_front", "train/l1/value/value", "val/loss",
                "val/l1/policy/action", "val/l1/world_model/future_proprio", "train/device/samples_per_sec",
                "train/device/flops_per_sec"):
        assert tag in scalars, tag
    assert {"train/future_frames", "val/future_frames"} <= images
    capsys.readouterr()
    assert main(["test", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over),
                 "--ckpt_path", "last", "--model.init_args.test_num_steps", "2"]) == 0
    out = capsys.readouterr().out
    for metric in ("test/action_mae", "test/future_proprio_mae", "test/value_mae", "test/value_auroc",
                   "test/l1/policy/action", "test/action_mae_mean_baseline", "test/action_skill",
                   "test/action_mae_normalized", "test/future_proprio_skill", "test/action_skill_robot_units",
                   "test/value_ece_per_task_mean", "test/value_ece/"):
        assert metric in out, metric
    # the held-out value's reliability diagram (model/value_report.py) goes to TensorBoard
    assert "test/value_reliability" in _scalars_and_images(tmp_path / "run")[1]


def test_fit_and_test_from_the_latent_cache(toy_data, tmp_path, capsys):
    """The quickstart's path: the data module builds the cache with the model's (linked) VAE on first use,
    trains and tests from it; the metrics carry the baselines and the skill."""
    torch.manual_seed(0)
    VideoVAE(TINY_VAE).vae.save_pretrained(tmp_path / "vae")
    over = cli_override(tmp_path, toy_data, max_steps=3, vae=str(tmp_path / "vae"))
    cfg = yaml.safe_load(over.read_text())
    cfg["data"]["init_args"].update(latent_cache=True, latent_views=1, latent_dir=str(tmp_path / "latents"))
    over.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]) == 0
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["views"] == {"train": 2, "validation": 1}
    assert manifest["fingerprint"]["vae"] == VideoVAE(str(tmp_path / "vae")).weights_fingerprint()
    _, images = _scalars_and_images(tmp_path / "run")
    assert {"train/future_frames", "val/future_frames"} <= images  # decoded from the cached latents
    capsys.readouterr()
    assert main(["test", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over),
                 "--ckpt_path", "last", "--model.init_args.test_num_steps", "2"]) == 0
    out = capsys.readouterr().out
    for metric in ("test/action_skill", "test/action_mae_mean_baseline", "test/future_proprio_skill"):
        assert metric in out, metric
    # another VAE than the cache's: refused in one line before any step
    torch.manual_seed(1)
    VideoVAE(TINY_VAE).vae.save_pretrained(tmp_path / "other_vae")
    capsys.readouterr()
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over),
                 "--model.init_args.vae", str(tmp_path / "other_vae")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "latents were encoded by VAE" in err[-1]


def test_killed_fit_resumes_from_last(toy_data, tmp_path):
    over = cli_override(tmp_path, toy_data, max_steps=1000, every=2)
    cmd = [sys.executable, "-m", "cosmos_policy_lightning.cli", "fit", "--config",
           str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (last.exists() and torch.load(
                last, map_location="cpu", weights_only=False)["global_step"] >= 4):
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 4
    # run again into the same directory, resuming: it continues from the saved step
    subprocess.run(cmd + ["--ckpt_path", "last", "--trainer.max_steps", str(step + 2)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == step + 2


def test_model_parallel_two_processes_then_resume_on_one(toy_data, tmp_path):
    """FSDP2 (ModelParallelStrategy, gloo) over 2 CPU processes writes a sharded checkpoint that a
    1-process run resumes (distributed checkpoints reshard on load)."""
    over = cli_override(tmp_path, toy_data, max_steps=4, every=2)
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(yaml.safe_dump({"trainer": {"devices": 2, "strategy": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"save_distributed_checkpoint": True, "process_group_backend": "gloo"}}}}))
    cmd = [sys.executable, "-m", "cosmos_policy_lightning.cli", "fit", "--config",
           str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over), "--config", str(fsdp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(last / "meta.pt", map_location="cpu", weights_only=False)
    assert meta["global_step"] == 4 and meta[CHECKPOINT_KEY]["stats"]["fingerprint"]
    run = subprocess.run(cmd + ["--trainer.devices", "1", "--trainer.max_steps", "6", "--ckpt_path", "last"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Restored all states" in run.stdout + run.stderr
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == 6


@pytest.mark.parametrize("name", ["libero_lora", "so101_lora"])
def test_one_gpu_lora_recipe_instantiates_on_meta_device(name, tmp_path):
    """The one-GPU 2B recipes: LoRA rank 16 through peft on the meta device (23.2 M trainable of 1.956 B),
    bf16 base, activation checkpointing, and the effective batch of the header (micro-batch x accumulation)."""
    recipe = REPO / "recipes" / f"{name}.yaml"
    data = yaml.safe_load(_recipe_data(recipe).read_text())["init_args"]
    emb = Embodiment.from_yaml(REPO / data["embodiment"])
    write_dataset(tmp_path / "data", standard_episodes(1, 1, 1, 1, length=2), embodiment=emb,
                  text_encoder=_T5Sized())
    cli = _recipe_on_cpu(recipe, tmp_path, "--data.init_args.convert_from", "null",
                         "--data.init_args.latent_cache", "false")
    model = cli.model
    assert model.hparams.transformer == "cosmos-predict2-2b" and model.hparams.activation_checkpointing
    assert model.lora_settings.rank == 16 and model.lora_settings.base_dtype == "bfloat16"
    with torch.device("meta"):
        model.configure_model()
    trainable = sum(p.numel() for p in model.dit.parameters() if p.requires_grad)
    assert trainable == 23_216_128, trainable
    assert {p.dtype for p in model.dit.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert cli.datamodule.batch_size * cli.trainer.accumulate_grad_batches == 200
    text = recipe.read_text()
    for micro, accum in ((50, 4), (100, 2)):  # the 48 and 80 GB lines keep the effective batch
        assert f"--data.init_args.batch_size {micro} --trainer.accumulate_grad_batches {accum}" in text
        assert micro * accum == 200


def test_metaworld_lora_recipe_at_tiny_scale(toy_data, tmp_path, capsys):
    """recipes/metaworld_lora.yaml on the toy data: LoRA on top of a trained tiny base (init_from_checkpoint),
    a checkpoint holding the adapter only, then its commands: export (merged) and a policy of each."""
    import numpy as np

    from cosmos_policy_lightning.inference.policy import CosmosPolicy
    from cosmos_policy_lightning.model.lora import LORA_CHECKPOINT_KEY

    from ..fixtures.checkpoint_factory import make_checkpoint

    base = make_checkpoint(tmp_path / "base", text_encoder=HashTextEncoder())
    over = cli_override(tmp_path, toy_data, max_steps=4, every=2, transformer="tiny",
                        init_from_checkpoint=str(base), lora={"rank": 4, "alpha": 4},
                        vae=str(base.parent / "tiny_vae"))  # a saved VAE: an inline config is random per load
    recipe = REPO / "recipes" / "metaworld_lora.yaml"
    assert main(["fit", "--config", str(recipe), "--config", str(over), "--trainer.max_time", "null",
                 "--trainer.val_check_interval", "2"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert raw[LORA_CHECKPOINT_KEY]["base"]["source"] == str(base) and raw["global_step"] == 4
    assert all(".lora_" in k or ".modules_to_save." in k for k in raw["state_dict"] if k.startswith("dit."))
    assert sorted(raw[CHECKPOINT_KEY]["text_embeddings"])  # fit stored the instructions' embeddings
    # resume: the adapter run continues from its own last checkpoint (base rebuilt, adapter and AdamW loaded)
    assert main(["fit", "--config", str(recipe), "--config", str(over), "--trainer.max_time", "null",
                 "--trainer.val_check_interval", "2", "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 6
    merged = tmp_path / "merged.ckpt"
    assert main(["export", str(ckpt), "--output", str(merged)]) == 0
    print(f"\nmetaworld_lora tiny: adapter checkpoint {ckpt.stat().st_size / 1e6:.2f} MB, merged "
          f"{merged.stat().st_size / 1e6:.2f} MB, base {base.stat().st_size / 1e6:.2f} MB")
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in ("wrist", "front")},
           "proprio": rng.uniform(-1, 1, 3), "instruction": "push the block"}
    a = CosmosPolicy.from_checkpoint(ckpt).predict(obs, num_steps=2, seed=0, decode_images=False).actions
    b = CosmosPolicy.from_checkpoint(merged).predict(obs, num_steps=2, seed=0, decode_images=False).actions
    np.testing.assert_allclose(a, b, atol=1e-5)
