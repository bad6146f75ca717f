"""Recipe files and the end of a run (issue 22, findings 5, 6, 13, 14): a non-UTF-8 recipe and a key given
twice are one line naming the file and line; ``test --ckpt_path last`` without a checkpoint is refused;
``val_check_interval`` longer than the shard "epoch" validates across epochs; a run that stops between
two saves (``max_steps``, ``max_time``) writes a final ``last.ckpt`` that ``--ckpt_path last`` resumes."""

from __future__ import annotations

import yaml

import torch

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.training.cli import run_lightning_cli

from ..conftest import REPO
from ..fixtures.cli_config import cli_override
from .faults import one_line_error

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def test_non_utf8_recipe_is_one_line_naming_file_and_line(tmp_path, capsys):
    """Finding 13: a latin-1 recipe was a 25-frame UnicodeDecodeError traceback."""
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("trainer:\n  max_steps: 3\n# r\xe9glage\n".encode("latin-1"))
    assert main(["fit", "--config", QUICKSTART, "--config", str(bad)]) == 2
    one_line_error(capsys.readouterr().err, "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 27, line 3)")


def test_duplicate_key_in_a_recipe_or_the_file_it_names_is_refused(tmp_path, capsys):
    """Finding 6: the last of two equal keys won silently (embodiment YAMLs refused them)."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("trainer:\n  max_steps: 3\n  log_every_n_steps: 1\n  max_steps: 5\n")
    assert main(["fit", "--config", QUICKSTART, "--config", str(dup)]) == 2
    one_line_error(capsys.readouterr().err, "dup.yaml: line 4: key 'max_steps' appears twice in one mapping")
    # the data-module file a recipe names (data: dm.yaml, relative to the recipe) is read the same way
    (tmp_path / "dm.yaml").write_text("init_args:\n  batch_size: 2\n  batch_size: 4\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: dm.yaml   # relative to this file\n")
    assert main(["fit", "--config", QUICKSTART, "--config", str(recipe)]) == 2
    one_line_error(capsys.readouterr().err, "dm.yaml: line 3: key 'batch_size' appears twice")


def test_ckpt_path_last_without_a_checkpoint_is_refused(toy_data, tmp_path, capsys):
    """Finding 5: ``test --ckpt_path last`` with no checkpoint scored an untrained model with exit 0."""
    over = cli_override(tmp_path, toy_data, max_steps=2)
    for sub in ("test", "validate"):
        assert main([sub, "--config", QUICKSTART, "--config", str(over), "--ckpt_path", "last"]) == 2
        one_line_error(capsys.readouterr().err, "--ckpt_path last: no last checkpoint found (looked in",
                       f"{sub} needs a trained model")


def _override(tmp_path, toy_data, **trainer):
    over = cli_override(tmp_path, toy_data, max_steps=5)
    cfg = yaml.safe_load(over.read_text())
    cfg["trainer"].update(trainer)
    cfg["data"]["init_args"]["samples_per_epoch"] = 8  # a shard "epoch" of 2 batches
    over.write_text(yaml.safe_dump(cfg))
    return over


def test_val_check_interval_longer_than_the_shard_epoch_validates_across_epochs(toy_data, tmp_path):
    """Finding 13: ``val_check_interval`` larger than a small dataset's shard epoch was a 62-line Lightning
    traceback (the stream is endless: the epoch is an artefact). It now counts global steps."""
    over = _override(tmp_path, toy_data, val_check_interval=3, max_steps=4, num_sanity_val_steps=0)
    cli = run_lightning_cli(["fit", "--config", QUICKSTART, "--config", str(over)])
    assert cli.trainer.global_step == 4 and cli.trainer.current_epoch >= 1
    assert "val/loss" in cli.trainer.callback_metrics  # validated at step 3, in the second "epoch"


def _step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_a_run_that_ends_between_two_saves_writes_a_final_last_checkpoint(toy_data, tmp_path):
    """Finding 14: a stop between two ``every_n_train_steps`` saves left ``last.ckpt`` at the previous save
    (the three-task recipe lost its last ~400 of ~2,400 steps to ``max_time``). Ending at ``max_steps`` 5
    with saves every 3 steps goes through the same end of training as a ``max_time`` stop."""
    over = _override(tmp_path, toy_data, max_steps=5)
    cli = run_lightning_cli(["fit", "--config", QUICKSTART, "--config", str(over)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert cli.trainer.global_step == 5 and _step(last) == 5


def test_a_max_time_stop_writes_last_and_resumes_from_it(toy_data, tmp_path):
    """Finding 14 with a real ``max_time``: ``last.ckpt`` holds the step training reached, and
    ``--ckpt_path last`` continues from it."""
    over = _override(tmp_path, toy_data, max_steps=100000, max_time="00:00:00:06")
    cli = run_lightning_cli(["fit", "--config", QUICKSTART, "--config", str(over)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    reached = cli.trainer.global_step
    assert 0 < reached < 100000 and _step(last) == reached
    cli = run_lightning_cli(["fit", "--config", QUICKSTART, "--config", str(over), "--ckpt_path", "last",
                             "--trainer.max_steps", str(reached + 1), "--trainer.max_time", "null"])
    assert cli.trainer.global_step == reached + 1 and _step(last) == reached + 1


def test_sigterm_writes_a_final_last_checkpoint_that_resumes(toy_data, tmp_path):
    """Finding 14 for a pre-empted job: SIGTERM (Lightning stops at the next batch boundary) wrote nothing when
    no periodic save had happened yet; now ``last.ckpt`` holds the step reached and resumes."""
    import os
    import signal
    import subprocess
    import time

    from .faults import cli_command

    over = _override(tmp_path, toy_data, max_steps=100000, log_every_n_steps=1)
    cfg = yaml.safe_load(over.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100000  # no periodic save
    over.write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", QUICKSTART, "--config", over]
    proc = subprocess.Popen(cli_command(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    events = tmp_path / "run" / "tb"
    deadline = time.time() + 240
    # a training step logged (not just the run's hyper-parameters: on a loaded machine those come well before)
    while time.time() < deadline and not any(b"train/loss" in p.read_bytes() for p in events.rglob("events.out.tfevents.*")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file(), err[-2000:]
    step = _step(last)
    assert step >= 1
    cli = run_lightning_cli(["fit", "--config", QUICKSTART, "--config", str(over), "--ckpt_path", "last",
                             "--trainer.max_steps", str(step + 1)])
    assert cli.trainer.global_step == step + 1
