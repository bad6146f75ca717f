"""Shared test set-up: one thread per process (two threads fighting over two cores turn a 20 ms step
into seconds), offscreen MuJoCo, no hub access, and paths to the repository's shipped files."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EMBODIMENTS = REPO / "embodiments"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def embodiments_dir() -> Path:
    return EMBODIMENTS
