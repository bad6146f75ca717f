"""LoRA fine-tuning through peft (``model/lora.py``, ``model.lora``), on the tiny DiT with a real Lightning
Trainer and real checkpoint files: only the adapters and the declared ``modules_to_save`` change; the
checkpoint holds only them and the base's identity; the merged export samples the same actions; a
resume continues; a checkpoint on another base (or a full one on a LoRA model) is refused in one line."""

from __future__ import annotations

import shutil

import lightning as L
import numpy as np
import pytest
import torch

from cosmos_policy_lightning.checkpoints.export import export
from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.model import lora as Lr
from cosmos_policy_lightning.model.dit import build_transformer
from cosmos_policy_lightning.model.module import CosmosPolicyModule

from ..fixtures.checkpoint_factory import make_checkpoint, make_lora_checkpoint

PREFIX = "dit.transformer."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lora_base"), steps=1)


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    return make_lora_checkpoint(tmp_path_factory.mktemp("lora_run"), base, steps=3)


def _observation(seed=0):
    rng = np.random.default_rng(seed)
    return {"images": {"wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       "front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
            "proprio": rng.uniform(-1, 1, 3), "instruction": ""}


def test_settings_defaults_counts_and_one_line_errors():
    s = Lr.LoraSettings.from_value(True)
    assert (s.rank, s.alpha, s.dropout) == (16, 16.0, 0.0)
    assert s.targets == ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    assert s.modules_to_save == ("patch_embed.proj", "proj_out")
    assert Lr.LoraSettings.from_value(None) is None and Lr.LoraSettings.from_value(False) is None
    for bad, word in (({"rnak": 4}, "unknown key"), ({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"),
                      ({"base_dtype": "int8"}, "base_dtype")):
        with pytest.raises(CosmosPolicyError, match=word) as info:
            Lr.LoraSettings.from_value(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(CosmosPolicyError, match="to_qq"):
        Lr.add_lora(build_transformer("tiny"), Lr.LoraSettings.from_value({"targets": ["to_qq"]}))
    # the counting (no adapters built) is what peft builds
    dit = build_transformer("tiny")
    counts = Lr.count_lora_parameters(dit, s)
    assert Lr.add_lora(dit, s)["trainable"] == counts.trainable
    # the 2B, on the meta device: rank 16 on attention + MLP is 22.9 M adapter parameters (1.2 %)
    with torch.device("meta"):
        big = build_transformer("cosmos-predict2-2b")
    c2b = Lr.count_lora_parameters(big, s)
    assert round(c2b.adapter / 1e6, 1) == 22.9 and c2b.modules_to_save == 72 * 2048 + 2048 * 64
    assert c2b.base == 1_956_413_440


def test_only_adapters_and_declared_modules_change_and_the_checkpoint_holds_only_them(base, adapted):
    raw = torch.load(adapted, map_location="cpu", weights_only=False)
    keys = [k for k in raw["state_dict"] if k.startswith("dit.")]
    assert keys and all(".lora_" in k or ".modules_to_save." in k for k in keys), keys[:3]
    entry = raw[Lr.LORA_CHECKPOINT_KEY]
    assert entry["settings"]["rank"] == 4 and entry["base"]["source"] == str(base)
    assert entry["base"]["revision"] is None  # a local base; a Hub one records its cached commit
    assert adapted.stat().st_size < base.stat().st_size / 2  # tiny model: adapter + 2 layers vs all

    base_state = {k[len(PREFIX):]: v for k, v in torch.load(base, map_location="cpu", weights_only=False)
                  ["state_dict"].items() if k.startswith(PREFIX)}
    module = CosmosPolicy.from_checkpoint(adapted).module
    state = module.dit.transformer.state_dict()
    changed, unchanged = set(), set()
    for key, value in state.items():
        if ".lora_A." in key:
            continue  # random init, then trained
        plain = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        if ".lora_B." in key:
            (changed if value.abs().max() > 0 else unchanged).add(key)  # peft starts B at zero
        elif ".modules_to_save." in key:
            (changed if not torch.equal(value, base_state[plain.replace(".modules_to_save.default.", ".")])
             else unchanged).add(key)
        else:
            assert torch.equal(value, base_state[plain]), f"frozen base tensor {key} changed"
    # a text-free dataset gives cross-attention one zero token: its adapters get no gradient; all others train
    assert unchanged and all(".attn2." in k for k in unchanged), sorted(unchanged)[:3]
    assert any(".attn1." in k for k in changed) and any(".ff." in k for k in changed)
    assert any("proj_out.modules_to_save" in k for k in changed) and \
        any("patch_embed.proj.modules_to_save" in k for k in changed)


def test_merged_export_samples_the_same_actions_as_the_adapter(adapted, tmp_path, capsys):
    merged = tmp_path / "merged.ckpt"
    assert main(["export", str(adapted), "--output", str(merged)]) == 0
    raw = torch.load(merged, map_location="cpu", weights_only=False)
    assert Lr.LORA_CHECKPOINT_KEY not in raw and raw["hyper_parameters"]["lora"] is None
    assert not any(".lora_" in k or "base_layer" in k for k in raw["state_dict"])
    a = CosmosPolicy.from_checkpoint(adapted).predict(_observation(), num_steps=2, seed=3, decode_images=False)
    b = CosmosPolicy.from_checkpoint(merged).predict(_observation(), num_steps=2, seed=3, decode_images=False)
    np.testing.assert_allclose(a.actions, b.actions, atol=1e-5)
    np.testing.assert_allclose(a.value, b.value, atol=1e-5)
    # peft's adapter format, with the base named
    folder = tmp_path / "adapter"
    assert main(["export", str(adapted), "--output", str(folder), "--merge", "false"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "cosmos_policy_base.json"]
    from peft import LoraConfig

    assert LoraConfig.from_pretrained(str(folder)).r == 4


def test_resume_from_a_lora_checkpoint_continues(base, adapted, tmp_path):
    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):
            self.state = {k: v.clone() for k, v in module.state_dict().items() if ".lora_" in k}

    raw = torch.load(adapted, map_location="cpu", weights_only=False)
    dm = CosmosDataModule(str(adapted.parent / "data"), batch_size=2, num_workers=0, shuffle_buffer=8,
                          augment=False, objective_mix={"policy": 0.5, "world_model": 0.25, "value": 0.25})
    module = CosmosPolicyModule(**{**raw["hyper_parameters"], "inference_record": dm.inference_record()})
    snap = Snapshot()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path), callbacks=[snap])
    trainer.fit(module, datamodule=dm, ckpt_path=str(adapted))
    assert trainer.global_step == 5
    saved = {k: v for k, v in raw["state_dict"].items() if ".lora_" in k}
    assert saved.keys() == snap.state.keys() and all(torch.equal(saved[k], snap.state[k]) for k in saved)
    assert trainer.optimizers[0].state  # AdamW moments came back with the checkpoint


def test_a_lora_checkpoint_on_another_base_is_refused_in_one_line(base, adapted, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(adapted.parent, moved, ignore=shutil.ignore_patterns("data"))
    other = make_checkpoint(tmp_path / "other", steps=1, seed=5)
    raw = torch.load(moved / "lora.ckpt", map_location="cpu", weights_only=False)
    raw["hyper_parameters"]["init_from_checkpoint"] = str(other)  # the recorded base now holds other weights
    torch.save(raw, moved / "lora.ckpt")
    with pytest.raises(CosmosPolicyError) as info:
        CosmosPolicy.from_checkpoint(moved / "lora.ckpt")
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(moved / "lora.ckpt")) and "fingerprint" in message
    assert raw[Lr.LORA_CHECKPOINT_KEY]["base"]["fingerprint"] in message
    # through the CLI too: export refuses it the same way, exit 2, one line
    assert main(["export", str(moved / "lora.ckpt"), "--output", str(tmp_path / "m.ckpt")]) == 2


def test_full_and_lora_checkpoints_are_not_mixed_up(base, adapted):
    hp = torch.load(base, map_location="cpu", weights_only=False)["hyper_parameters"]
    lora_model = CosmosPolicyModule(**{**hp, "lora": {"rank": 4, "alpha": 4}, "init_from_checkpoint": str(base)})
    lora_model.configure_model()
    full = torch.load(base, map_location="cpu", weights_only=False)
    with pytest.raises(CosmosPolicyError, match="a full checkpoint .* model.init_from_checkpoint"):
        lora_model.on_load_checkpoint(full)
    plain = CosmosPolicyModule(**hp)
    plain.configure_model()
    with pytest.raises(CosmosPolicyError, match="a LoRA checkpoint .* cosmos-policy export"):
        plain.on_load_checkpoint(torch.load(adapted, map_location="cpu", weights_only=False))
    with pytest.raises(CosmosPolicyError, match="not a LoRA checkpoint"):
        export(base, base.parent / "x.ckpt")
    other_rank = CosmosPolicyModule(**{**hp, "lora": {"rank": 8}, "init_from_checkpoint": str(base)})
    other_rank.configure_model()
    with pytest.raises(CosmosPolicyError, match="does not fit model.lora"):
        other_rank.on_load_checkpoint(torch.load(adapted, map_location="cpu", weights_only=False))


def test_bf16_base_trains_under_bf16_mixed(base, tmp_path):
    hp = torch.load(base, map_location="cpu", weights_only=False)["hyper_parameters"]
    dm = CosmosDataModule(str(base.parent / "data"), batch_size=2, num_workers=0, shuffle_buffer=8, augment=False)
    module = CosmosPolicyModule(**{**hp, "lora": {"rank": 4, "base_dtype": "bfloat16"}, "init_from_checkpoint":
                                   str(base), "inference_record": dm.inference_record(), "warmup_steps": 1})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        precision="bf16-mixed", default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    dtypes = {p.dtype for p in module.dit.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16} and {p.dtype for p in module.dit.parameters() if p.requires_grad} == \
        {torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # without autocast a bf16 base is refused in one line, before any step
    module = CosmosPolicyModule(**{**hp, "lora": {"rank": 4, "base_dtype": "bfloat16"}, "init_from_checkpoint":
                                   str(base), "inference_record": dm.inference_record()})
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    with pytest.raises(CosmosPolicyError, match="needs trainer.precision bf16-mixed"):
        trainer.fit(module, datamodule=dm)
    # a policy of it in bf16: every parameter is cast, adapters included
    policy = CosmosPolicy(module, dtype=torch.bfloat16)
    assert {p.dtype for p in policy.module.dit.parameters()} == {torch.bfloat16}


def test_lora_is_the_one_gpu_path_and_refuses_fsdp(base):
    hp = torch.load(base, map_location="cpu", weights_only=False)["hyper_parameters"]
    module = CosmosPolicyModule(**{**hp, "lora": True, "init_from_checkpoint": str(base)})
    module._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(CosmosPolicyError, match="one-GPU path"):
        module.configure_model()


@pytest.mark.sim
def test_evaluate_takes_a_lora_checkpoint(metaworld_checkpoint, tmp_path):
    from cosmos_policy_lightning.embodiment import Embodiment

    from ..conftest import EMBODIMENTS

    adapted = make_lora_checkpoint(tmp_path, metaworld_checkpoint, steps=1,
                                   embodiment=Embodiment.from_yaml(EMBODIMENTS / "metaworld.yaml"))
    assert main(["evaluate", "metaworld", "--checkpoint", str(adapted), "--tasks", "reach-v3", "--episodes", "1",
                 "--max-steps", "8", "--num-steps", "1", "--videos", "0", "--output", str(tmp_path / "eval")]) == 0
