"""Resumed training continues its data stream (issue 14, item 2): ``fit --ckpt_path`` after a stop does not
replay the batches of steps 0, 1, 2... again, and two resumed halves see the episodes an uninterrupted
run sees. Real Trainer, real data module, a one-parameter module that records every batch it trains on
(the data stream is what is under test)."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cosmos_policy_lightning.data.datamodule import CosmosDataModule

from ..fixtures.recorder import Recorder
from ..fixtures.shard_factory import standard_episodes, write_dataset

HALF = 12  # steps before the stop; an epoch here is 21 batches, so the stop is mid-epoch
BATCH = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    write_dataset(root / "data", standard_episodes(6, 2, 1, 1, length=10))
    return root / "data"


def _fit(data: Path, root: Path, max_steps: int, workers: int, ckpt_path: str | None = None,
         save_every: int | None = None) -> Recorder:
    dm = CosmosDataModule(str(data), batch_size=BATCH, num_workers=workers, shuffle_buffer=16, seed=3)
    module = Recorder()
    callbacks = [ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, every_n_train_steps=save_every)] \
        if save_every else []
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                        enable_checkpointing=bool(save_every), callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def _episodes(batches) -> collections.Counter:
    return collections.Counter(episode for batch in batches for episode, _ in batch)


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_continues_the_stream(dataset, tmp_path, workers):
    whole = _fit(dataset, tmp_path / "a", 4 * HALF, workers).seen
    first = _fit(dataset, tmp_path / "b", HALF, workers, save_every=HALF).seen
    assert first == whole[:HALF]  # a fresh run is reproducible: the fix changes nothing there

    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == HALF
    # the loader's position is saved in the checkpoint (Lightning's combined-loader state)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["stream_start"] >= HALF

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = _fit(dataset, tmp_path / "b", 4 * HALF, workers, ckpt_path=str(ckpt)).seen
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert len(second) == 3 * HALF

    # after the resume: new batches, not those of steps 0, 1, 2... again
    assert not set(second) & set(first), "a resumed run replayed batches of the first run"
    assert second[:HALF] != whole[:HALF]
    samples = {key for batch in first + second for key in batch}
    assert len(samples) > len({key for batch in first for key in batch})

    # and the same distribution as the uninterrupted run: every training episode, similar frequencies
    resumed, straight = _episodes(first + second), _episodes(whole)
    assert set(resumed) == set(straight) == {f"train-ep{i:03d}" for i in range(8)}
    n = sum(straight.values())
    tv = 0.5 * sum(abs(resumed[e] - straight[e]) for e in straight) / n
    assert tv < 0.15, (tv, resumed, straight)
