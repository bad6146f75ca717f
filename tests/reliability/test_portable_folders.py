"""Issue 22 finding 9: policy folders are portable. ``push-to-hub --local_dir`` never writes a path of the
machine that wrote it (the local VAE is copied in, a local text encoder is refused unless named on the Hub);
a folder written on one machine loads on another: write, move, delete the first machine's folder, load."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.inference.policy import CosmosPolicy

from ..fixtures.checkpoint_factory import make_checkpoint
from ..fixtures.shard_factory import HashTextEncoder, toy_observation as observation

INSTRUCTIONS = ["push the block", "open the top drawer slowly"]


def _predict(policy, instruction):
    out = policy.predict(observation(3, instruction), num_steps=2, seed=7, decode_images=False)
    return np.concatenate([out.actions.ravel(), out.future_proprio.ravel(), np.ravel(out.value)])


def _text_files(folder):
    return {p: p.read_text() for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".md")}


def test_a_folder_written_on_one_machine_loads_on_another(tmp_path):
    """Issue 22 finding 9: write, move, load. The checkpoint's machine (its data, its VAE folder, the
    checkpoint itself) is gone when the moved folder is loaded; no file of the folder names a path of it."""
    machine = tmp_path / "machine_a"
    ckpt = make_checkpoint(machine, text_encoder=HashTextEncoder())
    assert main(["push-to-hub", str(ckpt), "someone/toy", "--local_dir", str(machine / "folder")]) == 0
    before = CosmosPolicy.from_checkpoint(ckpt, text_encoder=HashTextEncoder())
    expected = {t: _predict(before, t) for t in INSTRUCTIONS}
    for path, text in _text_files(machine / "folder").items():
        assert str(tmp_path) not in text and "/tmp" not in text, f"{path.name} names a local path"
    moved = tmp_path / "machine_b" / "toy"
    moved.parent.mkdir()
    os.rename(machine / "folder", moved)
    shutil.rmtree(machine)  # data folder, VAE folder and checkpoint: gone
    policy = CosmosPolicy.from_pretrained(moved)  # no text encoder either: the folder's embeddings
    for instruction in INSTRUCTIONS:
        np.testing.assert_array_equal(_predict(policy, instruction), expected[instruction])


def test_local_vae_and_text_encoder_paths_never_enter_a_folder(tmp_path, capsys):
    trained = make_checkpoint(tmp_path / "machine", text_encoder=HashTextEncoder())
    raw = torch.load(trained, map_location="cpu", weights_only=False)
    raw["hyper_parameters"]["vae"] = str(tmp_path / "gone" / "vae")
    torch.save(raw, tmp_path / "novae.ckpt")
    assert main(["push-to-hub", str(tmp_path / "novae.ckpt"), "a/b", "--local_dir", str(tmp_path / "x")]) == 2
    assert "is not on this machine; pass --vae" in capsys.readouterr().err
    assert main(["push-to-hub", str(tmp_path / "novae.ckpt"), "a/b", "--local_dir", str(tmp_path / "x"),
                 "--vae", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]) == 0
    assert json.loads((tmp_path / "x" / "config.json").read_text())["vae"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    raw = torch.load(trained, map_location="cpu", weights_only=False)
    raw["cosmos_policy"]["text_encoder"] = f"t5:{tmp_path / 't5-local'}"
    raw["cosmos_policy"]["text_embeddings"] = {}
    torch.save(raw, tmp_path / "t5.ckpt")
    assert main(["push-to-hub", str(tmp_path / "t5.ckpt"), "a/b", "--local_dir", str(tmp_path / "y")]) == 2
    assert "is a folder of this machine; pass --text_encoder" in capsys.readouterr().err
    assert main(["push-to-hub", str(tmp_path / "t5.ckpt"), "a/b", "--local_dir", str(tmp_path / "y"),
                 "--text_encoder", "t5:google-t5/t5-11b"]) == 0
    assert json.loads((tmp_path / "y" / "config.json").read_text())["text_encoder"] == "t5:google-t5/t5-11b"

