"""Success rates of Meta-World's scripted experts, clean and with correlated action noise.

Runs the exact episodes ``cosmos-policy collect metaworld`` would record (same placements, same noise
generator per (seed, task, episode)) without rendering, so hundreds of episodes take about a minute.
Used to choose the noise settings of ``samples/metaworld`` (figures in docs/metaworld.md).

    OMP_NUM_THREADS=1 python tools/metaworld_success_rates.py \\
        --tasks '[drawer-open-v3,reach-v3,button-press-topdown-v3,push-v3]' --episodes 50 \\
        --noise_std '[0.0,0.3]' --max_steps '[120,500]'
"""

from __future__ import annotations

import time

from jsonargparse import CLI


def success_rates(*, tasks: list[str], episodes: int = 50, noise_std: list[float] = [0.0, 0.3],
                  noise_theta: float = 0.1, max_steps: list[int] = [120, 500], seed: int = 0) -> None:
    """Print the expert's success rate per task, noise level and time limit.

    Args:
        tasks: Meta-World v3 task names.
        episodes: episodes per (task, noise level); episode i starts from placement i.
        noise_std: noise levels to compare (0 = clean expert).
        noise_theta: mean reversion of the Ornstein-Uhlenbeck noise per step.
        max_steps: time limits (steps) at which success is counted; episodes run to the largest.
        seed: the collection seed (placements and noise).
    """
    from rich.console import Console
    from rich.table import Table

    from cosmos_policy_lightning.sim.metaworld import MetaWorldEnv
    from cosmos_policy_lightning.sim.noise import CorrelatedActionNoise, noise_rng

    limits = sorted(max_steps)
    table = Table(title=f"scripted expert success, {episodes} episodes each, noise theta {noise_theta}, seed {seed}")
    for col in ["task", "noise std"] + [f"<= {m} steps" for m in limits] + ["median steps to success"]:
        table.add_column(col, justify="left" if col == "task" else "right")
    started, total_steps = time.perf_counter(), 0
    for task in tasks:
        with MetaWorldEnv(task, seed=seed, max_steps=limits[-1], render=False) as env:
            expert = env.expert_policy()
            for std in noise_std:
                firsts = []
                for i in range(episodes):
                    noise = CorrelatedActionNoise(4, std, noise_theta, noise_rng(seed, task, i)) if std > 0 else None
                    env.reset(i)
                    first = None
                    for t in range(limits[-1]):
                        action = expert()
                        if noise is not None:
                            action = (action + noise()).clip(-1, 1)
                        _, _, success, _, _ = env.step(action)
                        total_steps += 1
                        if success:
                            first = t + 1
                            break
                    firsts.append(first)
                done = sorted(f for f in firsts if f is not None)
                cells = [f"{sum(f is not None and f <= m for f in firsts)}/{episodes}" for m in limits]
                table.add_row(task, f"{std:g}", *cells, str(done[len(done) // 2]) if done else "-")
    Console(width=140).print(table)
    print(f"{total_steps} simulated steps in {time.perf_counter() - started:.0f} s (no rendering)")


if __name__ == "__main__":
    CLI(success_rates)
