"""Training noise differs between ranks (paper §5, data-parallel training): a real 2-process DDP fit over
gloo on CPU records, per rank, the sigma its first training steps draw. Ranks differ; a rerun draws the
same values; and the generator advances by exactly one sigma draw and one noise tensor per step, so
these are the values the step used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from cosmos_policy_lightning.model import diffusion
from cosmos_policy_lightning.model.rng import rank_generator, rank_seed

from ..fixtures.checkpoint_factory import tiny_vae_dir
from ..conftest import REPO
from ..fixtures.cli_config import cli_override


class SigmaRecorder(Callback):
    """Before each training step: the sigma the rank's noise generator is about to draw (from a copy of
    its state). After it: whether the generator advanced by exactly sigma + noise of the batch's shape.
    Each rank writes ``rank<r>.json`` into ``directory`` at the end of fit."""

    def __init__(self, directory: str, latent_shape: list[int]):
        self.directory, self.latent_shape = Path(directory), latent_shape
        self.records: list[dict] = []
        self._before = None

    def _copy(self, gen: torch.Generator) -> torch.Generator:
        return torch.Generator(device=gen.device).set_state(gen.get_state())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        gen = pl_module.noise_generator(torch.device("cpu"))
        self._before = gen.get_state()
        b = len(batch["objective"])
        sigma = diffusion.sample_sigma(b, self.latent_shape[1], generator=self._copy(gen))
        self.records.append({"rank": trainer.global_rank, "step": trainer.global_step, "sigma": sigma.tolist()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        replay = torch.Generator().set_state(self._before)
        b = len(batch["objective"])
        diffusion.sample_sigma(b, self.latent_shape[1], generator=replay)
        torch.randn((b, *self.latent_shape), generator=replay)
        after = pl_module.noise_generator(torch.device("cpu")).get_state()
        self.records[-1]["used_by_the_step"] = bool(torch.equal(replay.get_state(), after))

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def _fit_two_ranks(tmp: Path, data: Path, out: Path) -> dict[int, list[dict]]:
    tmp.mkdir(parents=True)
    over = cli_override(tmp, data, max_steps=2, every=100)
    cfg = yaml.safe_load(over.read_text())
    cfg["trainer"]["limit_val_batches"] = 0
    cfg["model"]["init_args"]["vae"] = str(tiny_vae_dir(tmp))  # a saved tiny VAE (a path, like the recipes)
    cfg["trainer"]["devices"] = 2
    cfg["trainer"]["strategy"] = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                  "init_args": {"process_group_backend": "gloo"}}
    # toy robot: 9 latent frames of 16 x 4 x 4 (32 x 32 images)
    cfg["trainer"]["callbacks"].append({"class_path": "tests.model.test_rank_noise.SigmaRecorder",
                                        "init_args": {"directory": str(out), "latent_shape": [16, 9, 4, 4]}})
    over.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "cosmos_policy_lightning.cli", "fit", "--config",
           str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow
def test_ranks_draw_different_sigma_and_reruns_repeat_them(toy_data, tmp_path):
    first = _fit_two_ranks(tmp_path / "a", toy_data, tmp_path / "sigma_a")
    for rank in (0, 1):
        assert [r["step"] for r in first[rank]] == [0, 1]
        assert all(r["used_by_the_step"] for r in first[rank])
    for step in (0, 1):
        assert first[0][step]["sigma"] != first[1][step]["sigma"]     # different noise on every rank
    # the values derive from the run's seed (the recipe's seed_everything: 0) and the rank alone
    for rank in (0, 1):
        expected = diffusion.sample_sigma(4, 9, generator=rank_generator(0, rank, "cpu"))
        assert first[rank][0]["sigma"] == pytest.approx(expected.tolist(), rel=1e-6)
    again = _fit_two_ranks(tmp_path / "b", toy_data, tmp_path / "sigma_b")
    assert again == first


def test_rank_seeds_differ_by_rank_seed_and_step():
    seeds = {rank_seed(s, r, k) for s in (0, 1) for r in range(8) for k in (0, 1000)}
    assert len(seeds) == 32 and all(0 <= x < 2**63 for x in seeds)
    assert rank_seed(0, 1) != rank_seed(1, 0)  # not seed + rank: neighbouring runs do not share streams
    assert rank_seed(7, 3, 5) == rank_seed(7, 3, 5)
