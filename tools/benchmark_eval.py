"""Closed-loop evaluation throughput in LIBERO: episodes per hour with 1 and N simulator workers (``evaluate --num_envs``).

Runs the released-checkpoint chain on a tiny model: a reference-named tiny state dict (the one the tests build,
``tests/fixtures/reference_factory.py``) goes through ``import-checkpoint`` with ``embodiments/libero.yaml``, the
reference's statistics and T5-pickle formats, then ``cosmos-policy evaluate libero`` runs it with each
``--num_envs``, from a fresh output folder each time. Reports per setting: wall time, episodes per hour, seconds
per simulated step, the mean batch of the policy calls, and the projected hours of a whole 500-episode suite
(50 trials x 10 tasks) at the suite's step limit (an upper bound: every episode runs to the limit), next to the
reference's figure of about six hours per suite (NVlabs/cosmos-policy issue 23, one GPU, no batching). It also
checks that every ``--num_envs`` gives the same per-episode results (success, length, value steps) as 1.

Episodes are cut at ``--max_steps`` (default 32: two chunks of 16) so that the measurement fits a CPU session;
the per-step cost and the per-episode reset (env.reset, initial state, 10 wait steps) are what the projection
scales. The 2B model needs a GPU: without one this prints that its rows were not measured.

Usage::

    OMP_NUM_THREADS=1 MUJOCO_GL=egl python tools/benchmark_eval.py                     # tiny, num_envs 1 and 2
    python tools/benchmark_eval.py --num_envs '[1, 2, 4]' --episodes 4 --max_steps 64
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: The reference's time for one suite (500 episodes) with its evaluation script (NVlabs/cosmos-policy issue 23).
REFERENCE_SUITE_HOURS = 6.0
TINY = {"base": "tiny", "text_embed_dim": 64}


def tiny_libero_checkpoint(root: Path, instructions: list[str]) -> Path:
    """import-checkpoint of a tiny reference-named state dict with the LIBERO embodiment (the tests' chain)."""
    from cosmos_policy_lightning.checkpoints.importer import import_checkpoint
    from cosmos_policy_lightning.model.dit import build_transformer
    from tests.fixtures.checkpoint_factory import tiny_vae_dir
    from tests.fixtures.reference_factory import write_reference_checkpoint, write_reference_stats, write_t5_pickle

    torch.manual_seed(1)
    pt = write_reference_checkpoint(root / "libero_tiny.pt", build_transformer(TINY))
    write_reference_stats(root / "stats.json", 7, 9)
    write_t5_pickle(root / "t5.pkl", {text: 12 for text in instructions}, TINY["text_embed_dim"])
    out = root / "libero_tiny.ckpt"
    import_checkpoint(str(pt), REPO / "embodiments" / "libero.yaml", out, transformer=TINY,
                      stats=str(root / "stats.json"), t5_embeddings=str(root / "t5.pkl"), vae=str(tiny_vae_dir(root)))
    return out


def run(suite: str = "libero_spatial", tasks: list[int] | None = None, episodes: int = 2, max_steps: int = 32,
        num_envs: list[int] | None = None, num_steps: int = 5, output: Path = Path("runs/benchmark_eval")) -> list[dict]:
    """Measure ``evaluate libero`` with a tiny imported checkpoint at each ``num_envs``; print the table.

    Args:
        suite: LIBERO suite; tasks: indices into it (default ``[0]``); episodes: per task.
        max_steps: policy steps per episode (cut short of the suite's limit to fit a CPU session).
        num_envs: the settings compared (default ``[1, 2]``); the first is the reference for equality.
        num_steps: denoising steps per chunk (the reference's 5).
        output: folder for the checkpoint and each run's results (replaced).

    Returns:
        one row per setting.
    """
    from cosmos_policy_lightning.sim.evaluate import evaluate
    from cosmos_policy_lightning.sim.libero import TASK_MAX_STEPS, LiberoEnv, _benchmark

    tasks = [0] if tasks is None else list(tasks)
    num_envs = [1, 2] if num_envs is None else list(num_envs)
    output = Path(output)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    bench = _benchmark(suite)
    names = LiberoEnv.resolve_tasks(suite, [str(t) for t in tasks])
    ckpt = tiny_libero_checkpoint(output, [str(bench.get_task(t).language) for t in tasks])
    rows, reference = [], None
    for n in num_envs:
        start = time.perf_counter()
        res = evaluate("libero", ckpt, suite=suite, tasks=[str(t) for t in tasks], episodes=episodes,
                       max_steps=max_steps, num_envs=n, num_steps=num_steps, videos=0, output=output / f"envs{n}")
        wall = time.perf_counter() - start
        steps = sum(e["length"] for e in res["episodes"])
        n_eps = len(res["episodes"])
        per_episode = [(e["task"], e["episode"], e["success"], e["length"], [s for s, _ in e["values"]])
                       for e in res["episodes"]]
        values = np.array([v for e in res["episodes"] for _, v in e["values"]])
        if reference is None:
            reference = (per_episode, values)
        same = per_episode == reference[0]
        # projection: a whole suite, every episode to the limit, at this setting's cost per step (resets included)
        limit = TASK_MAX_STEPS[suite]
        suite_hours = 500 * limit * (wall / steps) / 3600
        rows.append({"num_envs": n, "episodes": n_eps, "steps": steps, "wall_s": wall,
                     "episodes_per_hour": n_eps / wall * 3600, "s_per_step": wall / steps,
                     "mean_batch": res["overall"]["mean_batch"], "policy_call_mean_s": res["overall"]["latency"].get("mean_s"),
                     "projected_suite_hours": suite_hours, "same_as_first": same,
                     "max_value_diff": float(np.abs(values - reference[1]).max()) if len(values) == len(reference[1])
                     and len(values) else None})
    _print(rows, suite, names, max_steps)
    (output / "benchmark_eval.json").write_text(json.dumps(rows, indent=2))
    return rows


def _print(rows: list[dict], suite: str, tasks: list[str], max_steps: int) -> None:
    from rich.console import Console
    from rich.table import Table

    cpu = os.cpu_count()
    table = Table(title=f"evaluate libero, tiny imported checkpoint, {', '.join(tasks)}, episodes cut at {max_steps} "
                        f"steps, CPU ({cpu} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
                  caption=f"projected: 500 episodes of {suite} at its step limit; the reference takes about "
                          f"{REFERENCE_SUITE_HOURS:.0f} h per suite (one GPU, 2B model)")
    for col in ("num_envs", "episodes", "wall", "episodes/hour", "s/step", "mean batch", "policy call",
                "projected suite", "same episodes as first"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["num_envs"]), str(r["episodes"]), f"{r['wall_s']:.0f} s", f"{r['episodes_per_hour']:.1f}",
                      f"{r['s_per_step']:.2f}", f"{r['mean_batch']:.2f}",
                      "-" if r["policy_call_mean_s"] is None else f"{r['policy_call_mean_s']:.2f} s",
                      f"{r['projected_suite_hours']:.1f} h",
                      f"{'yes' if r['same_as_first'] else 'NO'} (values +-{r['max_value_diff'] or 0:.1e})")
    console = Console(width=160)
    console.print(table)
    if not torch.cuda.is_available():
        console.print("no GPU in this session: the 2B LIBERO model at num_envs 1, 8 and 16 was not measured")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(run)
