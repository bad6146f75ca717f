"""Loss goldens per CPU recipe (issue 22, item 9; as NVIDIA's cosmos framework keeps them): the training
losses of the first 10 steps of every CPU recipe, from its fixed seed (``seed_everything: 0``), on the
bundled data (``samples/metaworld``), compared with ``goldens/loss_goldens.json``. A change to the maths,
the masks, the noise or the data order fails the test with the recipe's name.

Tolerance: ``RTOL`` relative (float32 on CPU, one thread: runs on one machine agree to ~1e-7; other CPUs
and BLAS builds differ in summation order, which ten AdamW steps amplify to ~1e-5).

Each recipe runs as written (model, optimiser, schedule, objective mix, augmentation, seed) except what
the bundled data and a short test need: ``data_dir`` is the bundled sample converted once (no text
encoder: ``--text_encoder none``), batches of 4 encoded online (no latent cache), no loader workers, no
validation, logger or checkpoints, and no ``init_from_checkpoint`` (the planning recipe starts from the
recipe's seed instead of a trained model). Recipes left out: ``aloha_sim`` (no bundled data of that robot)
and ``metaworld_lora`` (needs a trained base checkpoint).

Regenerate after an intended change (and say why in the commit)::

    COSMOS_POLICY_REGENERATE_GOLDENS=1 OMP_NUM_THREADS=1 python -m pytest -q tests/reliability/test_loss_goldens.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.training.cli import run_lightning_cli

from ..conftest import REPO

GOLDENS = Path(__file__).parent / "goldens" / "loss_goldens.json"
RECIPES = ["quickstart", "metaworld", "metaworld_mt3", "metaworld_planning"]
STEPS = 10
RTOL = 1e-4
REGENERATE = os.environ.get("COSMOS_POLICY_REGENERATE_GOLDENS") == "1"


class LossRecorder(Callback):
    """Keeps the training loss of every optimiser step (``training_step``'s returned loss)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("goldens") / "metaworld_sample"
    convert(str(REPO / "samples" / "metaworld"), output=str(out),
            embodiment=str(REPO / "embodiments" / "metaworld.yaml"), val_fraction=0.15, text_encoder="none", progress=False)
    return out


def _override(tmp: Path, data: Path) -> Path:
    cfg = {
        "trainer": {"max_steps": STEPS, "max_time": None, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "val_check_interval": None, "check_val_every_n_epoch": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp / "run"),
                    "callbacks": [{"class_path": f"{__name__}.LossRecorder"}]},
        "model": {"init_args": {"init_from_checkpoint": None, "image_log_every_n_steps": 0}},
        "data": {"init_args": {"data_dir": str(data), "embodiment": str(REPO / "embodiments" / "metaworld.yaml"),
                               "convert_from": None, "latent_cache": False, "num_workers": 0, "batch_size": 4,
                               "samples_per_epoch": None}},
    }
    path = tmp / "golden_override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(recipe: str, data: Path, tmp: Path) -> list[float]:
    torch.set_num_threads(1)
    cli = run_lightning_cli(["fit", "--config", str(REPO / "recipes" / f"{recipe}.yaml"),
                             "--config", str(_override(tmp, data))])
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder))
    assert len(recorder.losses) == STEPS, recipe
    return recorder.losses


@pytest.mark.parametrize("recipe", RECIPES)
def test_first_losses_of_every_cpu_recipe_match_their_golden(recipe, sample_data, tmp_path):
    losses = _losses(recipe, sample_data, tmp_path)
    goldens = json.loads(GOLDENS.read_text()) if GOLDENS.is_file() else {"recipes": {}}
    if REGENERATE:
        goldens["recipes"][recipe] = losses
        goldens.update(steps=STEPS, rtol=RTOL, torch=torch.__version__,
                       regenerate="COSMOS_POLICY_REGENERATE_GOLDENS=1 OMP_NUM_THREADS=1 python -m pytest -q "
                                  "tests/reliability/test_loss_goldens.py")
        GOLDENS.write_text(json.dumps(goldens, indent=1) + "\n")
        return
    want = goldens["recipes"].get(recipe)
    assert want is not None, f"{recipe}: no loss golden in {GOLDENS}; regenerate (see the module docstring)"
    assert losses == pytest.approx(want, rel=RTOL), (
        f"recipes/{recipe}.yaml: the first {STEPS} losses changed (golden {want}, now {losses}); if the change is "
        f"intended, regenerate the goldens (see tests/reliability/test_loss_goldens.py)")


def test_every_cpu_recipe_has_a_golden_or_a_stated_reason():
    """A new CPU recipe must get a golden (or be named in the module docstring with its reason)."""
    left_out = {"aloha_sim", "metaworld_lora"}
    cpu = {p.stem for p in (REPO / "recipes").glob("*.yaml")
           if (yaml.safe_load(p.read_text()).get("trainer") or {}).get("accelerator") == "cpu"}
    assert cpu - left_out == set(RECIPES)
