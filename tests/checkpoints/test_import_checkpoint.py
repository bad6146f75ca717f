"""``cosmos-policy import-checkpoint``: tiny whole-model ``.pt`` files written in the reference's naming
(``tests/fixtures/reference_factory.py``) are imported, and the imported DiT computes exactly what diffusers
computes with the same weights loaded directly. The output works with ``CosmosPolicy.from_checkpoint``
(statistics and T5 embeddings of the reference files), a ``fit`` started with ``init_from_checkpoint``,
a Hub source read from a pre-filled Hub cache offline, and the 2B recipes' ``pretrained_transformer``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.checkpoints.importer import import_checkpoint
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.embodiment import Embodiment
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.model.dit import VideoDiT, build_transformer
from cosmos_policy_lightning.model.module import CHECKPOINT_KEY, CosmosPolicyModule
from cosmos_policy_lightning.model.reference_weights import is_reference_checkpoint
from cosmos_policy_lightning.text import TextEmbeddingCache

from ..conftest import EMBODIMENTS, REPO, require_rendering
from ..fixtures.checkpoint_factory import tiny_vae_dir
from ..fixtures.hub_cache import write_hub_cache
from ..fixtures.reference_factory import write_reference_checkpoint, write_reference_stats, write_t5_pickle
from ..fixtures.shard_factory import TOY_EMBODIMENT, HashTextEncoder, standard_episodes, write_dataset

TINY = {"base": "tiny", "text_embed_dim": 64}
T5_DIM = 64
INSTRUCTIONS = {"push the block": 4, "open the drawer slowly": 6}


def _rounded(model, dtype=torch.bfloat16):
    """A diffusers model holding ``model``'s weights as the reference file stores them (bf16), in fp32."""
    out = build_transformer(TINY)
    out.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    return out.eval()


def _inputs(batch=2, frames=9, size=4, text_len=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, size, size, generator=g)
    cond = torch.zeros(batch, frames, dtype=torch.bool)
    cond[:, :3] = True
    t = torch.where(cond, torch.zeros(batch, frames), torch.rand(batch, frames, generator=g))
    text = torch.zeros(batch, text_len, T5_DIM)
    text[:, :5] = torch.randn(batch, 5, T5_DIM, generator=g)
    return x, t, cond, text


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny DiT (and a different EMA copy) written as a reference ``.pt``, with statistics and T5 files."""
    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    net = build_transformer(TINY)
    ema = build_transformer(TINY)
    emb = Embodiment.from_dict(TOY_EMBODIMENT)
    (root / "toy.yaml").write_text(yaml.safe_dump(TOY_EMBODIMENT))
    return {
        "root": root, "net": net, "ema": ema, "embodiment": root / "toy.yaml",
        "pt": write_reference_checkpoint(root / "Cosmos-Policy-Toy.pt", net, ema),
        "stats": write_reference_stats(root / "dataset_statistics.json", emb.action.dim, emb.proprio.dim),
        "t5": write_t5_pickle(root / "t5_embeddings.pkl", INSTRUCTIONS, T5_DIM),
        "vae": str(tiny_vae_dir(root)),
    }


@pytest.fixture(scope="module")
def imported(reference):
    root = reference["root"]
    summary = import_checkpoint(str(reference["pt"]), reference["embodiment"], root / "toy.ckpt", transformer=TINY,
                                stats=root / "dataset_statistics.json", t5_embeddings=root / "t5_embeddings.pkl",
                                vae=reference["vae"], test_num_steps=2)
    return Path(summary["output"]), summary


def test_imported_dit_computes_what_diffusers_computes_with_the_same_weights(reference, imported):
    path, summary = imported
    assert summary["weights"] == len(reference["net"].state_dict()) and summary["instructions"] == 2
    policy = CosmosPolicy.from_checkpoint(path)
    direct = VideoDiT(transformer=_rounded(reference["net"]))
    x, t, cond, text = _inputs()
    with torch.no_grad():
        ours = policy.module.dit(x, t, cond, text, None)
        theirs = direct(x, t, cond, text, None)
    assert torch.equal(ours, theirs)
    # and not the EMA copy, which differs
    with torch.no_grad():
        ema_out = VideoDiT(transformer=_rounded(reference["ema"]))(x, t, cond, text, None)
    assert not torch.allclose(ours, ema_out)


def test_ema_weights_on_request(reference, tmp_path):
    out = import_checkpoint(str(reference["pt"]), reference["embodiment"], tmp_path / "ema.ckpt", transformer=TINY,
                            ema=True, vae=reference["vae"])["output"]
    saved = torch.load(out, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["test_num_steps"] == 5          # no recipe named after the toy robot
    state = saved["state_dict"]
    expected = reference["ema"].state_dict()
    for key, value in expected.items():
        assert torch.equal(state[f"dit.transformer.{key}"], value.to(torch.bfloat16)), key


def test_statistics_and_t5_embeddings_become_ours(reference, imported):
    path, summary = imported
    policy = CosmosPolicy.from_checkpoint(path)
    stats = reference["stats"]
    np.testing.assert_allclose(policy.action_normalizer.low, stats["actions_min"])
    np.testing.assert_allclose(policy.action_normalizer.high, stats["actions_max"])
    np.testing.assert_allclose(policy.proprio_normalizer.high, stats["proprio_max"])
    assert policy.module.text_encoder_identity == "t5:google-t5/t5-11b" and policy.center_crop
    # the text cache: the real tokens only, as our converter stores them
    cache = TextEmbeddingCache(summary["text_cache"])
    assert cache.identity == "t5:google-t5/t5-11b" and cache.dim == T5_DIM
    for text, n in INSTRUCTIONS.items():
        got = cache.get(text)
        assert got.shape == (n, T5_DIM)
        np.testing.assert_allclose(got, reference["t5"][text][0, :n].float().numpy(), rtol=1e-3, atol=1e-3)
    # inference on a known instruction needs no T5-11B (it is not here): the embedded embeddings are used,
    # padded back to 512 tokens with no mask, exactly the reference's input
    seen = []
    handle = policy.module.dit.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"], kw.get("attention_mask"))), with_kwargs=True)
    rng = np.random.default_rng(0)
    obs = {"images": {"wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                      "front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
           "proprio": rng.uniform(-1, 1, 3), "instruction": "open the drawer slowly"}
    try:
        out = policy.predict(obs, num_steps=2, seed=0, decode_images=False)
    finally:
        handle.remove()
    assert out.actions.shape == (4, 2) and np.isfinite(out.actions).all()
    text, mask = seen[0]
    assert tuple(text.shape) == (1, 512, T5_DIM) and mask is None
    torch.testing.assert_close(text[0, :6], reference["t5"]["open the drawer slowly"][0, :6].float())
    assert torch.count_nonzero(text[0, 6:]) == 0


def test_missing_unexpected_and_misshapen_weights_fail_in_one_line(reference, tmp_path):
    net = reference["net"]
    cases = [
        (dict(drop=["net.blocks.1.self_attn.q_proj.weight"]),
         "missing weight 'transformer_blocks.1.attn1.to_q.weight'"),
        (dict(add={"net.blocks.2.mlp.layer1.weight": torch.zeros(512, 128)}),
         "unexpected weight 'transformer_blocks.2.ff.net.0.proj.weight'"),
        (dict(add={"net.x_embedder.proj.1.weight": torch.zeros(128, 68)}),
         "weight 'patch_embed.proj.weight' has shape (128, 68)"),
    ]
    for i, (change, message) in enumerate(cases):
        pt = write_reference_checkpoint(tmp_path / f"bad{i}.pt", net, **change)
        with pytest.raises(CosmosPolicyError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            import_checkpoint(str(pt), reference["embodiment"], tmp_path / f"bad{i}.ckpt", transformer=TINY,
                              vae=reference["vae"])
        assert "\n" not in str(err.value)
        assert not (tmp_path / f"bad{i}.ckpt").exists()
    # the wrong configuration: a 3-block model for a 2-block file
    with pytest.raises(CosmosPolicyError, match="missing weight 'transformer_blocks.2"):
        import_checkpoint(str(reference["pt"]), reference["embodiment"], tmp_path / "x.ckpt",
                          transformer={**TINY, "num_layers": 3}, vae=reference["vae"])
    with pytest.raises(CosmosPolicyError, match="no 'net_ema.\\*' weights"):
        pt = write_reference_checkpoint(tmp_path / "no_ema.pt", net)
        import_checkpoint(str(pt), reference["embodiment"], tmp_path / "x.ckpt", transformer=TINY, ema=True)


def test_side_files_that_do_not_fit_the_embodiment_are_refused(reference, tmp_path):
    root = reference["root"]
    stats = json.loads((root / "dataset_statistics.json").read_text())
    stats["actions_min"] = stats["actions_min"][:-1]
    (tmp_path / "s.json").write_text(json.dumps(stats))
    with pytest.raises(CosmosPolicyError, match="actions_min has shape \\(1,\\), the embodiment 'toy' expects \\(2,\\)"):
        import_checkpoint(str(reference["pt"]), reference["embodiment"], tmp_path / "x.ckpt", transformer=TINY,
                          stats=tmp_path / "s.json")
    write_t5_pickle(tmp_path / "wide.pkl", {"a": 3}, dim=32)
    with pytest.raises(CosmosPolicyError, match="embedding of 'a' has shape"):
        import_checkpoint(str(reference["pt"]), reference["embodiment"], tmp_path / "x.ckpt", transformer=TINY,
                          t5_embeddings=tmp_path / "wide.pkl")
    # a pickle with anything but tensors is not unpickled
    import pickle

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"a": Path("/")}, f)
    with pytest.raises(CosmosPolicyError, match="refusing to unpickle pathlib"):
        import_checkpoint(str(reference["pt"]), reference["embodiment"], tmp_path / "x.ckpt", transformer=TINY,
                          t5_embeddings=tmp_path / "evil.pkl")


def test_cli_prints_one_line_errors(reference, tmp_path, capsys):
    rc = main(["import-checkpoint", str(tmp_path / "nope.pt"), "--embodiment", str(reference["embodiment"]),
               "--output", str(tmp_path / "x.ckpt"), "--transformer", json.dumps(TINY)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "nope.pt" in err


def test_hub_source_from_a_prefilled_cache_offline(reference, imported, tmp_path):
    cache = tmp_path / "hub"
    root = reference["root"]
    write_hub_cache(cache, "nvidia/Cosmos-Policy-Toy", {"Cosmos-Policy-Toy.pt": reference["pt"],
                                                          "toy_dataset_statistics.json": root / "dataset_statistics.json",
                                                          "toy_t5_embeddings.pkl": root / "t5_embeddings.pkl"})
    source = "nvidia/Cosmos-Policy-Toy/Cosmos-Policy-Toy.pt"
    assert is_reference_checkpoint(source)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "cosmos_policy_lightning.cli", "import-checkpoint", source,
                          "--embodiment", str(reference["embodiment"]), "--output", str(tmp_path / "hub.ckpt"),
                          "--transformer", json.dumps(TINY), "--vae", reference["vae"],
                          "--stats", "nvidia/Cosmos-Policy-Toy/toy_dataset_statistics.json",
                          "--t5_embeddings", "nvidia/Cosmos-Policy-Toy/toy_t5_embeddings.pkl"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = torch.load(tmp_path / "hub.ckpt", map_location="cpu", weights_only=False)
    local = torch.load(imported[0], map_location="cpu", weights_only=False)
    assert ours[CHECKPOINT_KEY]["imported_from"]["source"] == source
    assert ours[CHECKPOINT_KEY]["stats"]["meta"]["source"] == "nvidia/Cosmos-Policy-Toy/toy_dataset_statistics.json"
    assert ours[CHECKPOINT_KEY]["stats"]["all"] == local[CHECKPOINT_KEY]["stats"]["all"]
    assert sorted(ours[CHECKPOINT_KEY]["text_embeddings"]) == sorted(INSTRUCTIONS)
    for key, value in local["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    # a file the cache does not hold: one line, no traceback
    run = subprocess.run([sys.executable, "-m", "cosmos_policy_lightning.cli", "import-checkpoint",
                          "nvidia/Cosmos-Policy-Toy/other.pt", "--embodiment", str(reference["embodiment"]),
                          "--output", str(tmp_path / "x.ckpt")], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1


def test_fit_starts_from_the_imported_weights(reference, imported, tmp_path):
    class Words64(HashTextEncoder):
        identity, dim = "test:hash-words-64", T5_DIM

    write_dataset(tmp_path / "data", standard_episodes(2, 1, 1, 1, length=5), text_encoder=Words64())
    dm = CosmosDataModule(str(tmp_path / "data"), batch_size=2, num_workers=0, shuffle_buffer=4)
    module = CosmosPolicyModule(embodiment=dm.embodiment.to_dict(), text_dim=dm.text_dim, transformer=TINY,
                                vae=reference["vae"], image_log_every_n_steps=0, warmup_steps=1,
                                init_from_checkpoint=str(imported[0]))
    module.configure_model()
    start = {k: v.clone() for k, v in module.dit.state_dict().items()}
    for key, value in _rounded(reference["net"]).state_dict().items():
        assert torch.equal(start[f"transformer.{key}"], value), key
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    moved = [k for k, v in module.dit.state_dict().items() if not torch.equal(v, start[k])]
    assert moved  # the optimizer step changed the imported weights


def test_denoising_steps_follow_the_recipe_of_the_embodiment(reference, tmp_path):
    # ALOHA: the reference samples (and plans) with 10 steps, recipes/aloha.yaml too
    out = import_checkpoint(str(reference["pt"]), EMBODIMENTS / "aloha.yaml", tmp_path / "aloha.ckpt",
                            transformer=TINY, vae=reference["vae"])["output"]
    assert torch.load(out, map_location="cpu", weights_only=False)["hyper_parameters"]["test_num_steps"] == 10


def test_2b_recipes_start_from_the_base_models_pt_through_the_same_path(reference, tmp_path):
    for name in ("libero", "robocasa", "aloha"):
        init = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())["model"]["init_args"]
        assert init["pretrained_transformer"] == "nvidia/Cosmos-Predict2-2B-Video2World/model-480p-16fps.pt"
        assert is_reference_checkpoint(init["pretrained_transformer"])
    # the same loading path, on a local file: VideoDiT(pretrained=<.pt>) holds the file's weights (fp32)
    dit = VideoDiT(TINY, pretrained=str(reference["pt"]))
    for key, value in _rounded(reference["net"]).state_dict().items():
        assert dit.transformer.state_dict()[key].dtype == torch.float32
        assert torch.equal(dit.transformer.state_dict()[key], value), key


@pytest.mark.sim
def test_evaluate_runs_an_imported_checkpoint(tmp_path):
    require_rendering()
    emb = Embodiment.from_yaml(EMBODIMENTS / "metaworld.yaml")
    torch.manual_seed(1)
    pt = write_reference_checkpoint(tmp_path / "mw.pt", build_transformer(TINY))
    write_reference_stats(tmp_path / "stats.json", emb.action.dim, emb.proprio.dim)
    write_t5_pickle(tmp_path / "t5.pkl", {"reach the goal position": 5}, T5_DIM)
    assert main(["import-checkpoint", str(pt), "--embodiment", str(EMBODIMENTS / "metaworld.yaml"),
                 "--output", str(tmp_path / "mw.ckpt"), "--transformer", json.dumps(TINY),
                 "--stats", str(tmp_path / "stats.json"), "--t5_embeddings", str(tmp_path / "t5.pkl"),
                 "--vae", str(tiny_vae_dir(tmp_path))]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "metaworld", "--checkpoint", str(tmp_path / "mw.ckpt"), "--tasks", "reach-v3",
                 "--episodes", "1", "--max-steps", "8", "--num-steps", "1", "--videos", "0",
                 "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["episodes"][0]["length"] == 8 and res["tasks"]["reach-v3"]["latency"]["calls"] == 1
