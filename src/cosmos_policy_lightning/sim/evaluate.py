"""``cosmos-policy evaluate SIMULATOR``: closed-loop evaluation in a simulator (docs/method.md §3, §5).

Generic over simulators: it talks only to the :class:`~.env.SimEnv` protocol (an env built by the
adapter class registered in :data:`~.env.SIMULATORS`, today ``metaworld``) and to a :data:`Controller`
that chooses the actions. The policy is called once per action chunk; the first ``execute_steps``
actions of the chunk are executed (the embodiment's value unless overridden), then the policy is
called again on the new observation. An episode ends at the first success or after ``max_steps``
steps. The same command evaluates the simulator's expert (``--policy expert``, e.g. Meta-World's
scripted policies on privileged state) and a uniformly random policy (``--policy random``) as
reference points, and a policy behind ``cosmos-policy serve`` (``--server ws://HOST:PORT``): every
call carries its seed, so the rollouts equal the in-process ones.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..atomic import ensure_writable_dir
from ..errors import CosmosPolicyError
from ..normalization import write_json_atomic
from .env import Observation, SimEnv
from .env import simulator as simulator_class
from .recording import Rollout, plot_values, save_gif, write_rollout_hdf5

#: z of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% by default).

    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = successes / n``; unlike the
    normal approximation it stays inside [0, 1] and is informative at 0 / n and n / n.

    Returns:
        ``(low, high)`` in [0, 1]; ``(0, 1)`` when ``n == 0``.

    Raises:
        CosmosPolicyError: ``successes`` outside [0, n].
    """
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise CosmosPolicyError(f"wilson_interval: successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def latency_summary(seconds: list[float]) -> dict[str, float | int]:
    """``{"calls", "mean_s", "p50_s", "p95_s"}`` of per-chunk policy latencies (empty: calls 0)."""
    if not seconds:
        return {"calls": 0}
    arr = np.asarray(seconds)
    return {"calls": int(arr.size), "mean_s": float(arr.mean()), "p50_s": float(np.percentile(arr, 50)),
            "p95_s": float(np.percentile(arr, 95))}


#: What chooses the next action chunk: ``controller(env, observation, seed) -> (actions (n, A), value or None)``,
#: ``actions`` in robot units (clipped to ``env.action_bounds`` before they are executed), ``value`` the
#: predicted value in [0, 1] of the chosen chunk (None: the controller predicts none). ``seed`` is this
#: call's seed: a function of (evaluation seed, episode, call index) only, so rollouts are reproducible.
Controller = Callable[[SimEnv, Observation, int], tuple[np.ndarray, "float | None"]]


def expert_controller(env: SimEnv, obs: Observation, seed: int) -> tuple[np.ndarray, None]:
    """The simulator's expert, one action per call: ``((1, A), None)``.

    Raises:
        CosmosPolicyError: the simulator has no expert (:meth:`~.env.SimEnv.expert` returned None).
    """
    action = env.expert()
    if action is None:
        raise CosmosPolicyError(f"--policy expert: the simulator of {env.task!r} has no expert")
    return np.asarray(action, dtype=np.float32)[None], None


def random_controller(env: SimEnv, obs: Observation, seed: int) -> tuple[np.ndarray, None]:
    """Uniform actions inside ``env.action_bounds``, one per call: ``((1, A), None)``; seeded per call, so an
    episode's random actions depend on (seed, episode, step) only."""
    low, high = (np.asarray(b, dtype=np.float64) for b in env.action_bounds)
    return np.random.default_rng(seed).uniform(low, high, (1, low.shape[0])).astype(np.float32), None


def policy_controller(policy, num_steps: int, decoding: str) -> Controller:
    """The direct policy: :meth:`CosmosPolicy.predict <cosmos_policy_lightning.inference.policy.CosmosPolicy.predict>`
    (or any object with that method) on the observation, the whole chunk ``(K, A)`` and its value."""
    def control(env: SimEnv, obs: Observation, seed: int) -> tuple[np.ndarray, float]:
        out = policy.predict(obs, num_steps=num_steps, seed=seed, decoding=decoding, decode_images=False)
        return out.actions, float(out.value)
    return control


def planner_controller(planner) -> Controller:
    """Best-of-N planning (``inference/planning.py``, docs/method.md §3): the chosen chunk and its value."""
    def control(env: SimEnv, obs: Observation, seed: int) -> tuple[np.ndarray, float]:
        plan = planner.plan(obs, seed=seed)
        return plan.actions, plan.value
    return control


def remote_controller(client) -> Controller:
    """A policy behind ``cosmos-policy serve`` (:class:`~cosmos_policy_lightning.client.PolicyClient`): the
    server samples with this call's seed, so it returns the same chunk as the in-process policy."""
    def control(env: SimEnv, obs: Observation, seed: int) -> tuple[np.ndarray, float]:
        reply = client.infer({**obs, "seed": seed})
        return np.asarray(reply["actions"]), float(reply["value"])
    return control


def call_seed(seed: int, episode: int, call: int) -> int:
    """The seed of policy call ``call`` of ``episode`` in an evaluation seeded ``seed``."""
    return seed * 1_000_003 + episode * 1_000 + call


def run_rollout(env: SimEnv, controller: Controller, episode: int, execute_steps: int, record_images: bool,
                seed: int, record_latency: bool = True) -> Rollout:
    """One episode from initial state ``episode``: query a chunk, execute ``execute_steps`` of it, repeat,
    until the env reports success or truncation.

    Args:
        env: any :class:`~.env.SimEnv`.
        controller: chooses each chunk (:data:`Controller`).
        episode: initial-state index passed to ``env.reset``.
        execute_steps: actions executed per chunk (at most the chunk's length are).
        record_images: keep the camera frames (for GIFs / HDF5).
        seed: the evaluation seed (per-call seeds: :func:`call_seed`).
        record_latency: record the seconds of every controller call in ``Rollout.latencies``.

    Returns:
        the :class:`Rollout` (images kept only when ``record_images``); its actions are the executed ones
        (clipped to ``env.action_bounds``).
    """
    low, high = env.action_bounds
    obs = env.reset(episode)
    r = Rollout(env.task, episode, env.instruction, images={c: [] for c in env.cameras} if record_images else {})
    call = 0
    while True:
        start = time.perf_counter()
        chunk, value = controller(env, obs, call_seed(seed, episode, call))
        seconds = time.perf_counter() - start
        call += 1
        if record_latency:
            r.latencies.append(seconds)
        if value is not None:
            r.values.append((r.length, value))
        for action in chunk[:execute_steps]:
            action = np.clip(np.asarray(action, dtype=np.float32), low, high)
            if record_images:
                for cam, img in obs["images"].items():
                    r.images[cam].append(img)
            r.proprio.append(np.asarray(obs["proprio"], dtype=np.float32))
            r.actions.append(action)
            obs, _, success, truncated, _ = env.step(action)
            if success:
                r.success, r.success_step = True, r.length - 1
                return r
            if truncated:
                return r


def evaluate(
    simulator: str,
    checkpoint: Path | None = None,
    *,
    tasks: list[str] | str | None = None,
    episodes: int = 10,
    seed: int = 1000,
    policy: Literal["model", "expert", "random"] = "model",
    planning: bool = False,
    planning_checkpoint: Path | None = None,
    num_proposals: int = 8,
    num_futures: int = 3,
    num_values: int = 5,
    aggregation: Literal["majority_mean", "mean", "lcb"] = "majority_mean",
    num_steps: int = 5,
    world_model_steps: int | None = None,
    value_steps: int | None = None,
    ensemble_steps: Literal["linspace", "equal"] = "linspace",
    decoding: Literal["parallel", "autoregressive"] = "parallel",
    execute_steps: int | None = None,
    max_steps: int = 200,
    output: Path = Path("runs/evaluate"),
    record_hdf5: bool = False,
    videos: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    embodiment: Path | None = None,
    server: str | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Run a checkpoint (or the simulator's expert, or a random policy) closed-loop in a simulator.

    Reports per task the success rate with a Wilson 95% interval, the mean episode length and the
    policy latency per action chunk (mean, p50, p95; a warm-up call before the first episode, which
    loads the text encoder, is reported apart as ``warmup_s``). Writes into ``output``: ``results.json``,
    ``videos/<task>-epNNN.gif`` for the first ``videos`` episodes of each task, ``values-<task>.png``
    (predicted value over each episode) and, with ``record_hdf5``, ``rollouts/<task>/<task>-epNNN.hdf5`` per episode (per-episode
    rollout layout with a ``success`` attribute, for ``cosmos-policy convert --format episode_hdf5``).

    Args:
        simulator: registered simulator name (``sim/env.py`` ``SIMULATORS``), e.g. ``metaworld``.
        checkpoint: ``.ckpt`` of ``cosmos-policy fit`` (needed for ``--policy model``).
        tasks: the simulator's task names, e.g. ``[drawer-open-v3,reach-v3]`` or ``drawer-open-v3``
            (a comma-separated string also works); default: the simulator's ``default_task``.
        episodes: episodes per task; episode ``i`` starts from the simulator's initial state ``i`` of ``seed``.
        seed: seeds the initial states (Meta-World: ``metaworld.MT1(task, seed)``) and the sampling noise;
            pick one other than the demonstrations' (``collect`` defaults to 0) to test on unseen placements.
        policy: ``model`` (the checkpoint), ``expert`` (the simulator's expert, e.g. Meta-World's scripted
            policy on privileged state; one action per step) or ``random`` (uniform actions inside the
            env's action bounds).
        planning: best-of-N planning instead of the direct policy (docs/method.md §3, ``inference/planning.py``).
        planning_checkpoint: checkpoint predicting futures and values (dual deployment); default: the
            policy checkpoint itself.
        num_proposals: N, action chunks proposed per planning step (docs/method.md §5: 8).
        num_futures: F, future states predicted per proposal (docs/method.md §5: 3).
        num_values: V, values predicted per future state (docs/method.md §5: 5).
        aggregation: majority_mean (reference), mean or lcb.
        num_steps: denoising steps of the policy (docs/method.md §3: 5).
        world_model_steps: denoising steps of the planning future-state stage (default ``num_steps``).
        value_steps: denoising steps of the planning value stage (default ``num_steps``).
        ensemble_steps: ``linspace`` (the reference: ensemble member i of a stage gets
            ``linspace(1, steps, members)[i]`` steps and seed + i) or ``equal`` (every member all steps).
        decoding: parallel (one run) or autoregressive (action, future state, value) for the direct policy.
        execute_steps: actions executed per chunk (default: the embodiment's ``action.execute_steps``).
        max_steps: episode time limit in steps (capped at the simulator's own limit: Meta-World's is 500).
        output: output directory (created).
        record_hdf5: save every rollout as a per-episode HDF5.
        videos: GIF strips saved per task (the first episodes).
        device: torch device of the model(s), e.g. cpu or cuda.
        dtype: float32 or bfloat16 (GPU).
        embodiment: embodiment YAML for ``expert`` / ``random`` (default: the checkpoint's or the
            simulator's ``default_embodiment``, for Meta-World ``embodiments/metaworld.yaml``).
        server: ``ws://HOST:PORT`` of ``cosmos-policy serve``: run the policy there instead of loading
            ``checkpoint`` (the server's sampling and planning options apply; the embodiment comes
            from its metadata). Each call sends its seed, so the same seeds give the same rollouts
            as in-process.
        api_key: the server's API key (default: the ``COSMOS_POLICY_API_KEY`` environment variable).

    Returns:
        the results dict written to ``results.json``.

    Raises:
        CosmosPolicyError: unknown simulator, bad arguments, unknown task, missing checkpoint, a simulator
            that cannot run (e.g. no offscreen OpenGL), ``--policy expert`` for a simulator without expert.
    """
    sim = simulator_class(simulator)
    name = f"evaluate {simulator}"
    if tasks is None:
        tasks = sim.default_task
    task_list = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not task_list:
        raise CosmosPolicyError(f"{name}: --tasks is empty")
    if episodes < 1 or max_steps < 1 or videos < 0:
        raise CosmosPolicyError(f"{name}: need episodes >= 1, max_steps >= 1, videos >= 0; got "
                                f"{episodes}, {max_steps}, {videos}")
    if policy not in ("model", "expert", "random"):
        raise CosmosPolicyError(f"{name}: --policy must be model, expert or random, got {policy!r}")
    if server is not None and (checkpoint is not None or policy != "model" or planning):
        raise CosmosPolicyError(f"{name}: --server runs the server's policy: give no --checkpoint and no "
                                "--planning (start the server with `cosmos-policy serve --planning true` instead)")
    if policy == "model" and checkpoint is None and server is None:
        raise CosmosPolicyError(f"{name}: --checkpoint is required with --policy model (or --server "
                                "ws://HOST:PORT of `cosmos-policy serve`)")
    if planning and policy != "model":
        raise CosmosPolicyError(f"{name}: --planning needs --policy model")
    for task in task_list:  # before any model loads: a typo or a missing renderer fails in seconds
        sim.check_task(task)

    remote = None
    if server is not None:
        from ..client import PolicyClient
        from ..embodiment import Embodiment

        remote = PolicyClient(server, api_key=api_key, timeout=600.0)
        meta = remote.metadata
        emb = Embodiment.from_dict(meta["embodiment_config"], source=server)
        sampling = meta.get("sampling", {})
        num_steps, decoding = sampling.get("num_steps", num_steps), sampling.get("decoding", decoding)
        device, dtype = sampling.get("device", device), sampling.get("dtype", dtype)
        controller = remote_controller(remote)
    elif policy == "model":
        from ..dtypes import dtype_from_name
        from ..inference.policy import CosmosPolicy

        model = CosmosPolicy.from_checkpoint(checkpoint, device=device, dtype=dtype_from_name(dtype))
        emb = model.embodiment
        controller = policy_controller(model, num_steps, decoding)
        if planning:
            from ..inference.planning import Planner

            judge = model if planning_checkpoint is None else CosmosPolicy.from_checkpoint(
                planning_checkpoint, device=device, dtype=dtype_from_name(dtype))
            controller = planner_controller(Planner(
                model, judge, num_proposals=num_proposals, num_futures=num_futures, num_values=num_values,
                aggregation=aggregation, policy_steps=num_steps, world_model_steps=world_model_steps or num_steps,
                value_steps=value_steps or num_steps, ensemble_steps=ensemble_steps))
    else:
        from ..embodiment import load_embodiment

        emb = load_embodiment(embodiment or sim.default_embodiment)
        controller = expert_controller if policy == "expert" else random_controller
    execute = execute_steps or emb.action.execute_steps
    if policy == "model" and not 1 <= execute <= emb.action.chunk_size:
        raise CosmosPolicyError(f"{name}: execute_steps must be in [1, {emb.action.chunk_size}], got {execute}")
    if policy != "model":
        execute = 1  # the baselines act step by step

    output = ensure_writable_dir(output, "--output")  # now, not after the episodes have run
    from tqdm import tqdm

    label = "planning" if planning or (remote is not None and remote.metadata.get("planning")) else policy
    results: dict[str, Any] = {"config": {
        "simulator": simulator,
        "checkpoint": None if checkpoint is None else str(checkpoint), "planning_checkpoint":
            None if planning_checkpoint is None else str(planning_checkpoint), "policy": label, "tasks": task_list,
        "episodes": episodes, "seed": seed, "num_steps": num_steps, "decoding": decoding, "execute_steps": execute,
        "max_steps": max_steps, "device": device, "dtype": dtype, "embodiment": emb.name,
        **({"num_proposals": num_proposals, "num_futures": num_futures, "num_values": num_values,
            "aggregation": aggregation, "world_model_steps": world_model_steps or num_steps,
            "value_steps": value_steps or num_steps, "ensemble_steps": ensemble_steps} if planning else {})},
        "tasks": {}, "episodes": []}
    if remote is not None:  # what the server runs
        meta = remote.metadata
        results["config"].update({"server": server, "checkpoint": meta.get("checkpoint"),
                                  "planning_checkpoint": meta.get("planning_checkpoint"),
                                  **(meta.get("planning") or {})})
    warmup: float | None = None
    latencies: list[float] = []
    bar = tqdm(total=episodes * len(task_list), unit="episode", desc=f"evaluate {label}", dynamic_ncols=True)
    try:
        for task in task_list:
            rollouts: list[Rollout] = []
            with contextlib.ExitStack() as stack:
                envs: dict[bool, SimEnv] = {}

                def env_for(render: bool) -> SimEnv:
                    # The baselines need camera frames only for GIFs / HDF5: a non-rendering env (same
                    # seed, same initial states) runs those episodes faster (Meta-World: about 50x).
                    if render not in envs:
                        envs[render] = sim.create(task, emb, seed=seed, max_steps=max_steps, render=render)
                        stack.callback(envs[render].close)
                    return envs[render]

                for ep in range(episodes):
                    t0 = time.perf_counter()
                    images = record_hdf5 or ep < videos
                    env = env_for(images or policy == "model")
                    if warmup is None and policy == "model":
                        # One call outside the statistics: loads the text encoder, allocates buffers.
                        # Calls are seeded individually, so it changes no episode.
                        start = time.perf_counter()
                        controller(env, env.reset(0), 0)
                        warmup = time.perf_counter() - start
                    r = run_rollout(env, controller, ep, execute, record_images=images, seed=seed,
                                    record_latency=policy == "model")
                    rollouts.append(r)
                    latencies += r.latencies
                    if ep < videos:
                        save_gif(output / "videos" / f"{task}-ep{ep:03d}.gif", r)
                    if record_hdf5:
                        write_rollout_hdf5(output / "rollouts" / task / f"{task}-ep{ep:03d}.hdf5", r, attrs={
                            "seed": seed, "policy": label, "checkpoint": str(checkpoint or "")})
                    r.images = {}  # free the frames
                    results["episodes"].append({"task": task, "episode": ep, "success": r.success, "length": r.length,
                                                "seconds": time.perf_counter() - t0,
                                                "values": [[s, v] for s, v in r.values]})
                    bar.update(1)
                    bar.set_postfix(task=task, successes=sum(x.success for x in rollouts), refresh=False)
            if any(r.values for r in rollouts):
                plot_values(output / f"values-{task}.png", rollouts, f"{task}: predicted value ({label})")
            n_succ = sum(r.success for r in rollouts)
            lo, hi = wilson_interval(n_succ, len(rollouts))
            results["tasks"][task] = {
                "episodes": len(rollouts), "successes": n_succ, "success_rate": n_succ / len(rollouts),
                "ci95": [lo, hi], "mean_length": float(np.mean([r.length for r in rollouts])),
                "latency": latency_summary([s for r in rollouts for s in r.latencies]),
            }
    finally:
        bar.close()
        if remote is not None:
            remote.close()
    total = sum(t["episodes"] for t in results["tasks"].values())
    succ = sum(t["successes"] for t in results["tasks"].values())
    lo, hi = wilson_interval(succ, total)
    results["overall"] = {"episodes": total, "successes": succ, "success_rate": succ / total, "ci95": [lo, hi],
                          "mean_length": float(np.mean([e["length"] for e in results["episodes"]])),
                          "latency": latency_summary(latencies), "warmup_s": warmup}
    write_json_atomic(output / "results.json", results)
    _print_table(results, output)
    return results


def _print_table(results: dict[str, Any], output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['config']['simulator']} closed loop: {results['config']['policy']}",
                  caption=f"results: {output}/results.json")
    for col in ("task", "success", "95% CI", "mean length", "latency/chunk mean", "p50", "p95"):
        table.add_column(col, justify="left" if col == "task" else "right")
    rows = list(results["tasks"].items()) + [("overall", results["overall"])]
    for name, t in rows:
        lat = t["latency"]
        fmt = lambda k: f"{lat[k]:.3f} s" if k in lat else "-"  # noqa: E731
        table.add_row(name, f"{t['successes']}/{t['episodes']} ({100 * t['success_rate']:.0f}%)",
                      f"[{100 * t['ci95'][0]:.0f}%, {100 * t['ci95'][1]:.0f}%]", f"{t['mean_length']:.1f}",
                      fmt("mean_s"), fmt("p50_s"), fmt("p95_s"))
    Console(width=140).print(table)


__all__ = ["Controller", "evaluate", "expert_controller", "latency_summary", "planner_controller", "policy_controller",
           "random_controller", "remote_controller", "run_rollout", "wilson_interval"]
