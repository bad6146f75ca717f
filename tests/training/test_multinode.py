"""Multi-node training, launched for real: two "nodes" on localhost through ``torchrun`` (gloo, tiny model).

The 2B recipes run FSDP2 / HSDP through Lightning's ``ModelParallelStrategy`` over ``num_nodes x devices``
processes (recipes/libero.yaml). Here each node is a ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank i``
process pair meeting at 127.0.0.1, the way a cluster launches it; Lightning reads torchrun's environment.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ..fixtures.cli_config import cli_override

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], tmp: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run ``cosmos-policy <args>`` as two torchrun nodes of one process each; both must exit 0."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        log = open(tmp / f"node{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "cosmos_policy_lightning.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    for proc, log in procs:
        rc = proc.wait(timeout=timeout)
        log.close()
        text = Path(log.name).read_text()
        assert rc == 0, text[-3000:]
        out.append(subprocess.CompletedProcess(proc.args, rc, text, ""))
    return out


def _val_loss(text: str) -> float:
    match = re.search(r"val/loss\s*│\s*([0-9.eE+-]+)", text)
    assert match, text[-2000:]
    return float(match.group(1))


@pytest.mark.slow
def test_two_nodes_train_checkpoint_resume_and_validate_like_one_process(toy_data, tmp_path):
    over = cli_override(tmp_path, toy_data, max_steps=4, every=2)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"trainer": {"devices": 1, "num_nodes": 2, "strategy": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"save_distributed_checkpoint": True, "process_group_backend": "gloo"}}}}))
    base = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]

    # 1. train 4 steps on 2 nodes: HSDP mesh (2 nodes replicate, 1 process per node shards); sharded checkpoint
    _two_nodes(["fit", *base, "--config", str(nodes)], tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == 4

    # 2. resume on the 2 nodes: continues from step 4
    runs = _two_nodes(["fit", *base, "--config", str(nodes), "--trainer.max_steps", "6", "--ckpt_path", "last"],
                      tmp_path)
    assert "Restored all states" in runs[0].stdout
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == 6

    # 3. the same checkpoint scores the same validation loss on 2 nodes and on 1 process (held-out noise is
    #    per sample, model/rng.py; the loss is a sample-weighted mean synced over the ranks)
    every_batch = ["--trainer.limit_val_batches", "1.0", "--ckpt_path", "last"]
    two = _val_loss(_two_nodes(["validate", *base, "--config", str(nodes), *every_batch], tmp_path)[0].stdout)
    one = subprocess.run([sys.executable, "-m", "cosmos_policy_lightning.cli", "validate", *base, "--config", str(nodes),
                          "--trainer.num_nodes", "1", *every_batch],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert _val_loss(one.stdout + one.stderr) == pytest.approx(two, rel=1e-5)


SLURM = REPO / "tools" / "cluster" / "slurm_fit.sh"


@pytest.mark.parametrize("recipe,nodes,devices", [("libero", 8, 8), ("robocasa", 4, 8), ("aloha", 1, 8)])
def test_slurm_launch_of_the_2b_recipes(recipe, nodes, devices, tmp_path):
    """tools/cluster/slurm_fit.sh: the dry run prints the sbatch line the recipe needs; inside a matching
    allocation it execs srun (a stand-in srun on PATH records its arguments); another allocation is
    refused in one line before anything starts."""
    path = f"recipes/{recipe}.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    dry = subprocess.run([str(SLURM), path, "--trainer.max_steps", "10"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "COSMOS_POLICY_DRY_RUN": "1"})
    assert dry.returncode == 0, dry.stderr
    assert f"--nodes {nodes} --ntasks-per-node {devices} --gpus-per-node {devices}" in dry.stdout
    assert f"srun --kill-on-bad-exit=1 cosmos-policy fit --config {path} --trainer.max_steps 10" in dry.stdout

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "srun_args"}\n')
    (fake / "srun").chmod(0o755)
    inside = {**env, "PATH": f"{fake}:{env['PATH']}", "SLURM_NNODES": str(nodes),
              "SLURM_NTASKS_PER_NODE": f"{devices}(x{nodes})"}
    run = subprocess.run([str(SLURM), path], cwd=REPO, capture_output=True, text=True, env=inside)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "srun_args").read_text().split() == ["--kill-on-bad-exit=1", "cosmos-policy", "fit",
                                                            "--config", path]
    wrong = subprocess.run([str(SLURM), path], cwd=REPO, capture_output=True, text=True,
                           env={**inside, "SLURM_NNODES": str(nodes + 1)})
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert f"wants trainer.num_nodes {nodes} x trainer.devices {devices}" in wrong.stderr
    outside = subprocess.run([str(SLURM), path], cwd=REPO, capture_output=True, text=True, env=env)
    assert outside.returncode != 0 and "not inside a SLURM allocation" in outside.stderr
