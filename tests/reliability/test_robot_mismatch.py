"""A robot mismatch is named as such (issue 22, findings 7 and 11): ``evaluate --embodiment`` with a
checkpoint is refused when it describes another robot (it was ignored silently); a checkpoint of another
robot names both embodiments and the field; an unknown camera is refused by the Python API and the
server alike; a missing instruction on a text-conditioned model is refused in Python as on the server."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.client import packb
from cosmos_policy_lightning.embodiment import load_embodiment
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.inference.service import BadRequest, PolicyService
from cosmos_policy_lightning.sim import env as sim_env

from ..conftest import EMBODIMENTS
from ..fixtures.checkpoint_factory import make_checkpoint
from ..fixtures.shard_factory import HashTextEncoder
from .faults import one_line_error


class Line1D:
    """The smallest simulator: a point on a line (proprio (1,), action (1,)), one camera ``top``."""

    default_embodiment = "<set by the test>"
    default_task = "line"

    def __init__(self, embodiment, max_steps):
        self.embodiment = load_embodiment(embodiment)
        self.task, self.instruction, self.max_steps, self.success = "line", "go right", max_steps, False
        self.cameras = {c.name: "strip" for c in self.embodiment.cameras}
        self.action_bounds = (np.full(1, -1.0, np.float32), np.full(1, 1.0, np.float32))

    @classmethod
    def create(cls, task, embodiment, *, seed, max_steps, render):
        return cls(embodiment, max_steps)

    @staticmethod
    def check_task(task):
        if task != "line":
            raise CosmosPolicyError(f"unknown task {task!r}")

    def _obs(self):
        h, w = self.embodiment.image_size
        return {"images": {c: np.zeros((h, w, 3), np.uint8) for c in self.cameras},
                "proprio": np.zeros(1, np.float32), "instruction": self.instruction}

    def reset(self, episode):
        return self._obs()

    def step(self, action):
        return self._obs(), 0.0, False, True, {}

    def expert(self):
        return np.zeros(1, np.float32)

    def close(self):
        pass


@pytest.fixture
def line(monkeypatch, tmp_path):
    monkeypatch.setitem(sim_env.SIMULATORS, "line1d", f"{__name__}:Line1D")
    data = yaml.safe_load((EMBODIMENTS / "metaworld.yaml").read_text())
    data.update(name="line1d", image_size=[16, 32])
    data["cameras"] = [{"name": "top", "role": "primary"}]
    data["proprio"] = {"dim": 1}
    data["action"] = {**data["action"], "dim": 1, "names": None, "keys": {}}
    path = tmp_path / "line1d.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(Line1D, "default_embodiment", str(path))
    return path


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    """The toy robot (cameras wrist + front, proprio 3, actions 2), without text."""
    return make_checkpoint(tmp_path_factory.mktemp("toyckpt"))


def _evaluate(ckpt, out, *extra):
    return main(["evaluate", "line1d", "--checkpoint", str(ckpt), "--episodes", "1", "--max_steps", "2",
                 "--num_steps", "1", "--output", str(out), *map(str, extra)])


def test_evaluate_refuses_an_embodiment_of_another_robot_given_with_a_checkpoint(line, toy_ckpt, tmp_path, capsys):
    """Finding 7: ``--embodiment`` was ignored silently when a checkpoint was given."""
    assert _evaluate(toy_ckpt, tmp_path / "e", "--embodiment", line) == 2
    one_line_error(capsys.readouterr().err, "embodiment 'line1d' has cameras = ['top'], but the policy",
                   "was trained for embodiment 'toy' with cameras = ['wrist', 'front']")


def test_evaluate_names_both_embodiments_for_a_checkpoint_of_another_robot(line, toy_ckpt, tmp_path, capsys):
    """Finding 11: a checkpoint of another robot said "expected proprio of shape (3,), got (1,)" mid-episode."""
    assert _evaluate(toy_ckpt, tmp_path / "e") == 2
    one_line_error(capsys.readouterr().err, "embodiment 'toy' has proprio.dim = 3, but the line1d simulator's "
                                            "embodiment 'line1d'", "has proprio.dim = 1")


def _observation(**images):
    frames = {"wrist": np.zeros((32, 32, 3), np.uint8), "front": np.zeros((32, 32, 3), np.uint8), **images}
    return {"images": frames, "proprio": np.zeros(3, np.float32)}


def test_an_unknown_camera_is_refused_by_the_python_api_and_the_server(toy_ckpt):
    """Finding 7: an extra (or misnamed) camera was ignored silently by the server and the Python API."""
    policy = CosmosPolicy.from_checkpoint(toy_ckpt)
    obs = _observation(side=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(CosmosPolicyError, match=r"observation 0: camera 'side' is not a camera of embodiment 'toy' "
                                                r"\(cameras wrist, front\)"):
        policy.predict(obs, num_steps=1)
    service = PolicyService(policy, num_steps=1)
    with pytest.raises(BadRequest, match=r"bad request: images.side: not a camera of embodiment 'toy'"):
        service.parse(packb(obs))
    # another robot's proprio names the policy's robot and the field
    with pytest.raises(CosmosPolicyError, match=r"expected proprio of shape \(3,\), got 4 values .*this policy's "
                                                r"embodiment 'toy' has proprio.dim = 3"):
        policy.predict({**_observation(), "proprio": np.zeros(4)}, num_steps=1)
    with pytest.raises(BadRequest, match=r"embodiment 'toy' has proprio.dim = 3"):
        service.parse(packb({**_observation(), "proprio": np.zeros(4)}))


def test_a_missing_instruction_is_refused_in_python_as_on_the_server(tmp_path):
    """Finding 7: the Python API took a missing instruction as '' on a text-conditioned model, while the
    server refused it."""
    policy = CosmosPolicy.from_checkpoint(make_checkpoint(tmp_path, text_encoder=HashTextEncoder()))
    with pytest.raises(CosmosPolicyError, match=r"observation 0: instruction missing; this model is conditioned "
                                                r"on text \(test:hash-words\)"):
        policy.predict(_observation(), num_steps=1)
    with pytest.raises(BadRequest, match=r"bad request: instruction: missing; this model is conditioned on text"):
        PolicyService(policy, num_steps=1).parse(packb(_observation()))
