"""``cosmos-policy evaluate metaworld --server``: the closed loop in real MuJoCo with the policy behind a
real ``cosmos-policy serve`` server on 127.0.0.1 gives the very rollouts of the in-process policy with the
same seeds (same successes, lengths, values and executed actions)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.inference.server import PolicyServer
from cosmos_policy_lightning.inference.service import PolicyService

pytestmark = [pytest.mark.sim, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ckpt(metaworld_checkpoint):
    return metaworld_checkpoint


def rollouts(out):
    res = json.loads((out / "results.json").read_text())
    actions = []
    for ep in range(len(res["episodes"])):
        with h5py.File(out / "rollouts" / "reach-v3" / f"reach-v3-ep{ep:03d}.hdf5") as f:
            actions.append(f["action"][()])
    return res, actions


def test_evaluate_through_the_server_equals_in_process(ckpt, tmp_path):
    args = ["--tasks", "reach-v3", "--episodes", "2", "--max-steps", "12", "--record-hdf5", "true", "--videos", "0"]
    assert main(["evaluate", "metaworld", "--checkpoint", str(ckpt), "--num-steps", "1", *args,
                 "--output", str(tmp_path / "local")]) == 0
    server = PolicyServer(PolicyService(CosmosPolicy.from_checkpoint(ckpt), num_steps=1, checkpoint=str(ckpt)), port=0)
    with server.running_in_thread() as url:
        assert main(["evaluate", "metaworld", "--server", url, *args, "--output", str(tmp_path / "remote")]) == 0
    local, local_actions = rollouts(tmp_path / "local")
    remote, remote_actions = rollouts(tmp_path / "remote")
    assert remote["config"]["server"] == url and remote["config"]["checkpoint"] == str(ckpt)
    assert remote["config"]["num_steps"] == 1 and remote["config"]["execute_steps"] == 8
    assert remote["overall"]["success_rate"] == local["overall"]["success_rate"]
    for a, b in zip(local["episodes"], remote["episodes"]):
        assert (a["success"], a["length"], a["values"]) == (b["success"], b["length"], b["values"])
    for a, b in zip(local_actions, remote_actions):
        assert a.shape == (12, 4)
        np.testing.assert_array_equal(a, b)
    assert remote["overall"]["latency"]["calls"] == local["overall"]["latency"]["calls"] == 4
    # 4 calls in the episodes and the warm-up call, each one request
    assert server.stats["requests"] == 5 and server.stats["bad_requests"] == 0


def test_server_and_checkpoint_together_are_refused(ckpt, tmp_path, capsys):
    assert main(["evaluate", "metaworld", "--server", "ws://127.0.0.1:1", "--checkpoint", str(ckpt),
                 "--output", str(tmp_path)]) == 2
    assert "--server runs the server's policy" in capsys.readouterr().err


def test_unreachable_server_is_a_one_line_error(gl, free_port, tmp_path, capsys):
    assert main(["evaluate", "metaworld", "--server", f"ws://127.0.0.1:{free_port}", "--tasks", "reach-v3",
                 "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "cosmos-policy serve" in err and err.count("\n") == 1


@pytest.fixture
def free_port():
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
