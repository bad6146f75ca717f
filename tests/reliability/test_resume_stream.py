"""Resumed training continues its data stream (issue 14, item 2): ``fit --ckpt_path`` after a stop does not
replay the batches of steps 0, 1, 2... again, and two resumed halves see the episodes an uninterrupted
run sees. Real Trainer, real data module, a one-parameter module that records every batch it trains on
(the data stream is what is under test)."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import pytest
import torch


from ..fixtures.recorder import Recorder, fit_recorder
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
    return fit_recorder(data, root, max_steps, workers, ckpt_path, save_every, batch_size=BATCH)


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
