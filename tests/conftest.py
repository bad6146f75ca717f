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


#: CI sets this (``.ci/run``): the simulator tests must run there, so Meta-World missing or MuJoCo unable to
#: render offscreen fails them instead of skipping them. Elsewhere (a laptop without EGL) they skip, with the reason.
REQUIRE_SIM = "COSMOS_POLICY_REQUIRE_SIM"


def sim_unavailable(reason: str, module_level: bool = False):
    """Skip the calling simulator test (or module) for ``reason``; fail it instead when ``$COSMOS_POLICY_REQUIRE_SIM``
    is set to anything but ``""`` / ``0``."""
    if os.environ.get(REQUIRE_SIM, "") not in ("", "0"):
        pytest.fail(f"{reason} ({REQUIRE_SIM}={os.environ[REQUIRE_SIM]}: the simulator tests must run)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_rendering() -> str:
    """The MuJoCo GL backend, after a real offscreen render in a subprocess (MuJoCo binds its backend at
    import, so the probe cannot run in this process); :func:`sim_unavailable` when there is none."""
    import subprocess
    import sys

    from cosmos_policy_lightning.errors import CosmosPolicyError
    from cosmos_policy_lightning.sim import rendering

    try:
        backend = rendering.select_gl_backend()
    except CosmosPolicyError as err:
        sim_unavailable(f"MuJoCo cannot render offscreen: {err}")
    probe = subprocess.run([sys.executable, "-c", rendering.RENDER_PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        sim_unavailable(f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {last}")
    return backend


@pytest.fixture(scope="session")
def gl() -> str:
    """The MuJoCo GL backend for tests that render (see :func:`require_rendering`)."""
    return require_rendering()


@pytest.fixture(scope="session")
def metaworld_checkpoint(tmp_path_factory) -> Path:
    """A tiny Meta-World checkpoint trained with the real Trainer (after the render probe), shared by the
    closed-loop tests (in-process and through the server)."""
    require_rendering()
    from cosmos_policy_lightning.embodiment import Embodiment

    from .fixtures.checkpoint_factory import make_checkpoint

    emb = Embodiment.from_yaml(EMBODIMENTS / "metaworld.yaml")
    return make_checkpoint(tmp_path_factory.mktemp("metaworld_checkpoint"), embodiment=emb)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """The toy robot's converted dataset and embodiment YAML for short CLI runs (``fixtures/cli_config.py``)."""
    from .fixtures.cli_config import write_toy_data

    return write_toy_data(tmp_path_factory.mktemp("toy"))
