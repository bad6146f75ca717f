"""Batched, parallel evaluation (``evaluate --num_envs N``) and resuming, on real Meta-World with a tiny checkpoint:
N spawned simulator workers, one batched policy call per round, the same per-episode results as one env in
this process; an interrupted run picks up where it stopped, and never mixes in episodes of other settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim.evaluate import evaluate

pytestmark = pytest.mark.sim

RUN = dict(tasks=["reach-v3", "drawer-open-v3"], episodes=2, max_steps=20, num_steps=1, videos=1, seed=5)


@pytest.fixture(scope="module")
def single(metaworld_checkpoint, tmp_path_factory):
    """The reference run: one env in this process."""
    out = tmp_path_factory.mktemp("single")
    return evaluate("metaworld", metaworld_checkpoint, num_envs=1, output=out, **RUN), out


def _episodes(res):
    return [(e["task"], e["episode"], e["success"], e["length"]) for e in res["episodes"]]


def test_two_workers_give_the_same_episodes_with_batched_calls(single, metaworld_checkpoint, tmp_path):
    one, _ = single
    two = evaluate("metaworld", metaworld_checkpoint, num_envs=2, output=tmp_path, **RUN)
    assert _episodes(two) == _episodes(one)
    for a, b in zip(one["episodes"], two["episodes"]):
        assert [s for s, _ in a["values"]] == [s for s, _ in b["values"]]   # chunks at the same steps
        # the same seeds; a batch of two may reassociate float sums (batched kernels), nothing more
        np.testing.assert_allclose([v for _, v in a["values"]], [v for _, v in b["values"]], atol=1e-4)
    # 4 episodes of 20 steps, chunks of 8 executed: 3 calls each. One env: 12 calls of 1; two envs: 6 of 2.
    assert one["overall"]["latency"]["calls"] == 12 and one["overall"]["mean_batch"] == 1.0
    assert two["overall"]["latency"]["calls"] == 6 and two["overall"]["mean_batch"] == 2.0
    assert two["tasks"]["reach-v3"]["latency"]["calls"] == 6           # per episode: its 3 calls
    assert two["config"]["num_envs"] == 2
    for task in RUN["tasks"]:
        assert (tmp_path / "videos" / f"{task}-ep000.gif").is_file() and (tmp_path / f"values-{task}.png").is_file()
        assert not (tmp_path / "videos" / f"{task}-ep001.gif").exists()


def test_an_interrupted_run_resumes_and_other_settings_are_refused(single, metaworld_checkpoint, tmp_path, capsys):
    one, _ = single
    # "interrupted" after the first task: its episode files are what a killed run leaves behind
    evaluate("metaworld", metaworld_checkpoint, num_envs=1, output=tmp_path, **{**RUN, "tasks": ["reach-v3"]})
    assert sorted(p.name for p in (tmp_path / "episodes").iterdir()) == ["reach-v3-ep000.json", "reach-v3-ep001.json"]
    res = evaluate("metaworld", metaworld_checkpoint, num_envs=2, output=tmp_path, **RUN)
    assert res["overall"]["resumed_episodes"] == 2 and _episodes(res) == _episodes(one)
    assert res["overall"]["latency"]["calls"] == 3                      # only drawer-open's 2 episodes ran
    assert res["tasks"]["reach-v3"]["successes"] == one["tasks"]["reach-v3"]["successes"]
    with pytest.raises(CosmosPolicyError, match=r"reach-v3-ep000.json: this output holds episodes run with other "
                                                r"settings \(num_steps\); use another --output, or --resume false"):
        evaluate("metaworld", metaworld_checkpoint, output=tmp_path, **{**RUN, "num_steps": 2})
    assert main(["evaluate", "metaworld", "--checkpoint", str(metaworld_checkpoint), "--tasks", "reach-v3",
                 "--episodes", "1", "--max-steps", "8", "--num-steps", "1", "--videos", "0", "--resume", "false",
                 "--num-envs", "0", "--output", str(tmp_path)]) == 2
    assert "num_envs >= 1" in capsys.readouterr().err


def test_baselines_run_whole_episodes_in_the_workers(tmp_path, gl):
    res = {n: evaluate("metaworld", policy="expert", tasks=["reach-v3"], episodes=3, max_steps=60, videos=0,
                       num_envs=n, output=tmp_path / str(n)) for n in (1, 2)}
    assert _episodes(res[1]) == _episodes(res[2]) and res[1]["tasks"]["reach-v3"]["successes"] == 3
    assert all(e["seconds"] > 0 for n in (1, 2) for e in res[n]["episodes"])
    noop = json.loads(json.dumps(evaluate("metaworld", policy="noop", tasks=["reach-v3"], episodes=1, max_steps=5,
                                          videos=0, output=tmp_path / "noop")))
    assert noop["episodes"][0]["length"] == 5 and noop["config"]["policy"] == "noop"


def test_a_killed_run_resumes_where_it_stopped(tmp_path, gl):
    """SIGKILL in the middle of an evaluation (no clean-up runs), then the same command: the finished episodes
    are kept, the rest run, and the whole equals an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["evaluate", "metaworld", "--policy", "random", "--tasks", "reach-v3", "--episodes", "12",
            "--max-steps", "60", "--videos", "12", "--num-envs", "2"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_policy_lightning.cli", *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((out / "episodes").glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its simulator workers
    proc.wait()
    kept = len(list((out / "episodes").glob("*.json")))
    assert 2 <= kept < 12 and not (out / "results.json").exists()
    assert main([*args, "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["overall"]["resumed_episodes"] == kept
    clean = evaluate("metaworld", policy="random", tasks=["reach-v3"], episodes=12, max_steps=60, videos=0,
                     output=tmp_path / "clean")
    assert _episodes(res) == _episodes(clean)
