"""Every data-setup error under ``fit`` / ``validate`` / ``test`` reaches the user as our one line with exit
status 2, not as a jsonargparse traceback; so do bad checkpoints, a non-UTF-8 embodiment, a closed pipe,
read-only output folders and non-numeric proprio at inference (issue 14, item 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.errors import CosmosPolicyError

from ..fixtures.checkpoint_factory import TINY_VAE, make_checkpoint
from ..fixtures.factories import write_embodiment
from ..fixtures.shard_factory import TOY_EMBODIMENT, HashTextEncoder, standard_episodes, toy_embodiment, write_dataset
from .faults import REPO, cli_command, one_line_error, run_with_faults

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A converted toy dataset (``data/``) and its embodiment YAML (``toy.yaml``)."""
    root = tmp_path_factory.mktemp("toy")
    write_dataset(root / "data", standard_episodes(3, 2, 1, 1, length=6), text_encoder=HashTextEncoder())
    (root / "toy.yaml").write_text(yaml.safe_dump(TOY_EMBODIMENT))
    return root


def _config(tmp: Path, data_dir: Path, embodiment: Path, **data) -> Path:
    cfg = {
        "trainer": {"max_steps": 1, "limit_val_batches": 1, "limit_test_batches": 1, "logger": False,
                    "enable_progress_bar": False, "enable_checkpointing": False, "callbacks": [],
                    "default_root_dir": str(tmp / "run")},
        "model": {"init_args": {"vae": TINY_VAE, "image_log_every_n_steps": 0, "test_num_steps": 1}},
        "data": {"init_args": {"data_dir": str(data_dir), "embodiment": str(embodiment), "convert_from": None,
                               "num_workers": 0, "batch_size": 2, "latent_cache": False, "shuffle_buffer": 8,
                               **data}},
    }
    path = tmp / "override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _damage(case: str, toy: Path, tmp: Path) -> tuple[Path, Path, dict, str]:
    """A copy of the toy dataset broken as ``case`` says: ``(data_dir, embodiment, data options, expected
    fragment of the message)``."""
    data, emb = tmp / "data", toy / "toy.yaml"
    shutil.copytree(toy / "data", data)
    manifest = json.loads((data / "manifest.json").read_text())
    options: dict = {}
    if case == "missing stats.json":
        (data / "stats.json").unlink()
        return data, emb, options, "stats.json: statistics file not found"
    if case == "fingerprint mismatch":
        stats = json.loads((data / "stats.json").read_text())
        stats["fingerprint"] = "0123456789abcdef"
        (data / "stats.json").write_text(json.dumps(stats))
        return data, emb, options, "fingerprint 0123456789abcdef does not match"
    if case == "embodiment mismatch":
        other = tmp / "other.yaml"
        other.write_text(yaml.safe_dump({**TOY_EMBODIMENT, "action": {"dim": 2, "chunk_size": 8}}))
        return data, other, options, "action.chunk_size = 4"
    if case == "unfinished conversion":
        manifest["status"] = "in_progress"
        (data / "manifest.json").write_text(json.dumps(manifest))
        return data, emb, options, "conversion not finished"
    if case == "missing text_embeddings":
        shutil.rmtree(data / "text_embeddings")
        return data, emb, options, "text-embedding index not found"
    if case == "batch_size 0":
        return data, emb, {"batch_size": 0}, "batch_size must be a positive integer, got 0"
    if case == "negative objective weight":
        return data, emb, {"objective_mix": {"policy": -1.0, "value": 1.0}}, "objective_mix.policy must be a finite"
    if case == "zero objective mix":
        return data, emb, {"objective_mix": {"policy": 0.0, "value": 0.0}}, "all weights are zero"
    if case == "unknown objective":
        return data, emb, {"objective_mix": {"jump": 1.0}}, "unknown objective 'jump'"
    if case == "failing convert_from":
        shutil.rmtree(data)
        return data, write_embodiment(tmp / "robot"), \
            {"convert_from": {"source": str(tmp / "nowhere.hdf5"), "text_encoder": "none"}}, "nowhere.hdf5: file not found"
    if case == "batch larger than the dataset":
        return data, emb, {"batch_size": 500}, "batch_size 500 is larger than the training split"
    raise AssertionError(case)


DATA_CASES = ["missing stats.json", "fingerprint mismatch", "embodiment mismatch", "unfinished conversion",
              "missing text_embeddings", "batch_size 0", "negative objective weight", "zero objective mix",
              "unknown objective", "failing convert_from", "batch larger than the dataset"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_setup_errors_are_one_line_under_fit(case, toy, tmp_path, capsys):
    data, emb, options, fragment = _damage(case, toy, tmp_path)
    config = _config(tmp_path, data, emb, **options)
    assert main(["fit", "--config", str(QUICKSTART), "--config", str(config)]) == 2
    one_line_error(capsys.readouterr().err, fragment)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
@pytest.mark.parametrize("case", [c for c in DATA_CASES if c != "batch larger than the dataset"])
def test_data_setup_errors_are_one_line_under_validate_and_test(subcommand, case, toy, tmp_path, capsys):
    """(Held-out batches may be partial, so a batch larger than the validation split is fine there.)"""
    data, emb, options, fragment = _damage(case, toy, tmp_path)
    config = _config(tmp_path, data, emb, **options)
    assert main([subcommand, "--config", str(QUICKSTART), "--config", str(config)]) == 2
    one_line_error(capsys.readouterr().err, fragment)


def test_truncated_shard_found_in_a_loader_worker_is_one_line(toy, tmp_path, capsys):
    """A shard that breaks while a data-loader worker reads it: PyTorch re-raises the worker's DataError with
    the worker's traceback in its message; the CLI still prints our one line."""
    data = tmp_path / "data"
    shutil.copytree(toy / "data", data)
    for shard in data.glob("train-*.tar"):  # the toy manifest records no sizes: found while reading
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    config = _config(tmp_path, data, toy / "toy.yaml", num_workers=1)
    assert main(["fit", "--config", str(QUICKSTART), "--config", str(config)]) == 2
    one_line_error(capsys.readouterr().err, "train-00000", ".tar: truncated")


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A real checkpoint of the toy robot, the same truncated, and one of a robot with proprio dim 5."""
    root = tmp_path_factory.mktemp("ckpts")
    good = make_checkpoint(root / "toy")
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    other = make_checkpoint(root / "other", embodiment=toy_embodiment(proprio={"dim": 5}))
    return {"good": good, "truncated": truncated, "other": other, "data": root / "toy" / "data"}


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_truncated_checkpoint_is_one_line(subcommand, checkpoints, toy, tmp_path, capsys):
    config = _config(tmp_path, checkpoints["data"], toy / "toy.yaml")
    code = main([subcommand, "--config", str(QUICKSTART), "--config", str(config),
                 "--ckpt_path", str(checkpoints["truncated"])])
    assert code == 2
    one_line_error(capsys.readouterr().err, "truncated.ckpt: not a readable checkpoint", "truncated or corrupt")


def test_truncated_last_checkpoint_is_one_line(checkpoints, toy, tmp_path, capsys):
    """``--ckpt_path last`` resolves to the ModelCheckpoint folder's last.ckpt, which is checked too."""
    config = _config(tmp_path, checkpoints["data"], toy / "toy.yaml")
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(checkpoints["truncated"], folder / "last.ckpt")
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"enable_checkpointing": True, "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder), "save_last": True}}]}}))
    assert main(["fit", "--config", str(QUICKSTART), "--config", str(config), "--config", str(callbacks),
                 "--ckpt_path", "last"]) == 2
    one_line_error(capsys.readouterr().err, "last.ckpt: not a readable checkpoint")


def test_checkpoint_of_another_robot_is_refused_before_test_step(checkpoints, toy, tmp_path, capsys):
    config = _config(tmp_path, checkpoints["data"], toy / "toy.yaml")
    code = main(["test", "--config", str(QUICKSTART), "--config", str(config),
                 "--ckpt_path", str(checkpoints["other"])])
    assert code == 2
    one_line_error(capsys.readouterr().err, "other/model.ckpt: trained for embodiment 'toy' with proprio.dim = 5",
                   "proprio.dim = 3")


def test_intact_checkpoint_still_tests(checkpoints, toy, tmp_path, capsys):
    """The checks refuse only what is broken: the intact checkpoint of the same robot tests."""
    config = _config(tmp_path, checkpoints["data"], toy / "toy.yaml")
    assert main(["test", "--config", str(QUICKSTART), "--config", str(config),
                 "--ckpt_path", str(checkpoints["good"])]) == 0
    assert "test/value_mae" in capsys.readouterr().out


def test_predict_into_a_read_only_folder_is_refused_before_predicting(checkpoints, toy, tmp_path):
    config = _config(tmp_path, checkpoints["data"], toy / "toy.yaml")
    out = tmp_path / "predictions"
    writer = tmp_path / "writer.yaml"
    writer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "cosmos_policy_lightning.training.callbacks.PredictionWriter",
         "init_args": {"output_dir": str(out)}}]}}))
    run = run_with_faults(cli_command(["predict", "--config", QUICKSTART, "--config", config, "--config", writer,
                                       "--ckpt_path", checkpoints["good"]]), read_only=(out,))
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run.stderr, str(out), "not writable")
    assert "Predicting" not in run.stdout + run.stderr


# ------------------------------------------------------------------------------------ tools
def test_non_utf8_embodiment_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(TOY_EMBODIMENT).replace("toy", "caf\xe9").encode("latin-1"))
    assert main(["layout", str(path)]) == 2
    one_line_error(capsys.readouterr().err, "latin1.yaml: not UTF-8 text")


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "table"])
def test_layout_into_a_closed_pipe_is_quiet(json_output):
    """``cosmos-policy layout --json | head`` with the reader gone before the first write: stdout is a pipe
    whose read end is closed before the command starts (deterministic, unlike racing ``| true``): no
    BrokenPipeError traceback, a non-zero exit status."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(cli_command(["layout", REPO / "embodiments" / "aloha.yaml",
                                          *(["--json"] if json_output else [])]),
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO)
    finally:
        os.close(write_end)
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    # JSON: our handler, 128 + SIGPIPE; the table: rich's console handles the closed pipe itself (exit 1)
    assert run.returncode == (141 if json_output else 1)


def test_evaluate_into_a_read_only_folder_is_refused_before_the_episodes(tmp_path):
    out = tmp_path / "eval"
    run = run_with_faults(cli_command(["evaluate", "metaworld", "--policy", "random", "--tasks", "reach-v3",
                                       "--episodes", "1", "--max_steps", "2", "--output", out]), read_only=(out,))
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run.stderr, str(out), "--output directory is not writable")


def test_non_numeric_proprio_at_inference_is_one_line():
    from cosmos_policy_lightning.processor import normalize_proprio
    from cosmos_policy_lightning.normalization import Normalizer, Stats

    norm = Normalizer(Stats.compute(np.random.default_rng(0).normal(size=(50, 3))))
    with pytest.raises(CosmosPolicyError, match=r"observation 0: proprio must be numbers .*'abc'"):
        normalize_proprio(["abc"], norm, 3)
    with pytest.raises(CosmosPolicyError, match="observation 0: proprio must be numbers"):
        normalize_proprio([[1.0, None, object()]], norm, 3)
    assert normalize_proprio([[0.1, 0.2, 0.3]], norm, 3).shape == (1, 3)


def test_non_numeric_proprio_through_the_policy(checkpoints):
    """The real policy object, as a robot program calls it."""
    from cosmos_policy_lightning.inference.policy import CosmosPolicy

    policy = CosmosPolicy.from_checkpoint(checkpoints["good"])
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(CosmosPolicyError, match="proprio must be numbers"):
        policy({"images": {"wrist": frame, "front": frame}, "proprio": "abc", "instruction": "push the block"})
    del policy
    torch.set_num_threads(1)
