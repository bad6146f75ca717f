"""``cosmos-policy evaluate SIMULATOR``: closed-loop evaluation in a simulator (docs/method.md §3, §5).

Generic over simulators: it talks only to the :class:`~.env.SimEnv` protocol (an env built by the
adapter class registered in :data:`~.env.SIMULATORS`: ``metaworld``, ``aloha``, ``libero``) and to a
controller that chooses the actions. The policy is called once per action chunk; the first
``execute_steps`` actions of the chunk are executed (the embodiment's value unless overridden), then the
policy is called again on the new observation. An episode ends at the first success or after
``max_steps`` steps. The same command evaluates the simulator's expert (``--policy expert``), a uniformly
random policy (``--policy random``) and the simulator's no-op action (``--policy noop``) as reference
points, and a policy behind ``cosmos-policy serve`` (``--server ws://HOST:PORT``).

**Batched, parallel.** ``--num_envs N`` runs N simulator worker processes (spawned; ``N = 1`` runs the env
in this process). Every round, each env that needs a new chunk contributes its observation to *one*
batched policy call (:func:`batch_policy_controller`: ``CosmosPolicy.predict`` on the list with one seed
per observation); the workers then execute their chunks in parallel. Every call's seed is a function of
(evaluation seed, episode, call index) only (:func:`call_seed`), and the policy draws each observation's
noise from its own seed, so an episode's result does not depend on N or on what it was batched with (up
to floating-point reassociation in batched kernels; on CPU the tiny models give identical chunks).

**Resumable.** Each finished episode is written at once to ``episodes/<task>-epNNN.json`` (with the settings
that determine it); a rerun with the same ``--output`` and settings skips those episodes, so an
interrupted suite resumes where it stopped. ``results.json`` has the per-episode results, per task and
per suite (simulators with suites, e.g. LIBERO) and overall success rates with Wilson 95 % intervals.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..atomic import ensure_writable_dir, write_json_atomic
from ..errors import CosmosPolicyError, user_message
from ..inference.options import PolicyOptions, takes_policy_options
from .env import SIMULATORS, Observation, SimEnv
from .env import simulator as simulator_class
from ..value_calibration import reliability_figure
from .recording import Rollout, plot_values, save_figure, save_gif, write_rollout_hdf5
from .value_metrics import closed_loop_calibration, closed_loop_value_auroc, ranking_accuracy

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


def noop_controller(env: SimEnv, obs: Observation, seed: int) -> tuple[np.ndarray, None]:
    """The simulator's no-op action, one per call: ``((1, A), None)``: ``env.noop_action`` where the adapter
    defines one (LIBERO: ``[0, 0, 0, 0, 0, 0, -1]``, gripper open), else zeros clipped into the bounds."""
    action = getattr(env, "noop_action", None)
    if action is None:
        low, high = env.action_bounds
        action = np.clip(np.zeros_like(np.asarray(low, dtype=np.float32)), low, high)
    return np.asarray(action, dtype=np.float32).reshape(1, -1), None


#: What chooses the next chunks of several envs at once: ``controller(observations, seeds) -> [(actions (n, A),
#: value or None), ...]``, one entry per observation, in order (:data:`Controller` for one env).
BatchController = Callable[[Sequence[Observation], Sequence[int]], list[tuple[np.ndarray, "float | None"]]]


def batch_policy_controller(policy, num_steps: int, decoding: str) -> BatchController:
    """The direct policy on B observations in one call: :meth:`CosmosPolicy.predict
    <cosmos_policy_lightning.inference.policy.CosmosPolicy.predict>` with one seed per observation (each
    observation's noise comes from its own seed), returning each ``(K, A)`` chunk and its value."""
    def control(observations: Sequence[Observation], seeds: Sequence[int]) -> list[tuple[np.ndarray, float]]:
        out = policy.predict(list(observations), num_steps=num_steps, seed=[int(s) for s in seeds],
                             decoding=decoding, decode_images=False)
        return [(out.actions[b], float(out.value[b])) for b in range(len(observations))]
    return control


def per_observation(controller: Controller) -> BatchController:
    """A :data:`BatchController` calling a one-observation controller in turn (the planner, a policy server):
    the env argument is not available here, so ``controller`` must not use it."""
    def control(observations: Sequence[Observation], seeds: Sequence[int]) -> list[tuple[np.ndarray, Any]]:
        return [controller(None, obs, int(s)) for obs, s in zip(observations, seeds)]  # type: ignore[arg-type]
    return control


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


def best_score(score: float | None, info: Any) -> float | None:
    """The best partial progress so far: ``max(score, info["success_score"])`` when the step's info has one
    (a fraction in [0, 1]: ALOHA's stages / 4), else ``score`` unchanged (None for envs without stages)."""
    new = info.get("success_score") if isinstance(info, dict) else None
    if new is None:
        return score
    return float(new) if score is None else max(score, float(new))


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
            obs, _, success, truncated, info = env.step(action)
            r.score = best_score(r.score, info)
            if success:
                r.success, r.success_step = True, r.length - 1
                return r
            if truncated:
                return r


# ------------------------------------------------------------------------------------------ env hosts
_BASELINES: dict[str, Controller] = {"expert": expert_controller, "random": random_controller, "noop": noop_controller}


class EnvHost:
    """Builds and drives the envs of one simulator: in this process, or inside a worker process (:class:`WorkerPool`).

    One env per ``(task, render)`` is kept open and reused for later episodes of that task.

    Args:
        adapter: ``"module:Class"`` of the simulator (a value of :data:`~.env.SIMULATORS`).
        embodiment: the :class:`~cosmos_policy_lightning.embodiment.Embodiment` the envs render.
        seed: the evaluation seed (initial states).
        max_steps: the episode limit passed to ``create``.
    """

    def __init__(self, adapter: str, embodiment: Any, seed: int, max_steps: int):
        import importlib

        module, attr = adapter.split(":")
        self.sim = getattr(importlib.import_module(module), attr)
        self.embodiment, self.seed, self.max_steps = embodiment, int(seed), int(max_steps)
        self.envs: dict[tuple[str, bool], SimEnv] = {}
        self.env: SimEnv | None = None

    def _env(self, task: str, render: bool) -> SimEnv:
        key = (task, bool(render))
        if key not in self.envs:
            # keep one env open at a time per host beyond the current task's: LIBERO scenes hold a GL context
            for old in [k for k in self.envs if k[0] != task]:
                self.envs.pop(old).close()
            self.envs[key] = self.sim.create(task, self.embodiment, seed=self.seed, max_steps=self.max_steps,
                                             render=bool(render))
        return self.envs[key]

    def reset(self, task: str, render: bool, episode: int) -> tuple[Observation, dict[str, Any]]:
        """Start ``episode`` of ``task``; returns the first observation and the env's ``instruction``,
        ``cameras``, ``max_steps``."""
        self.env = self._env(task, render)
        obs = self.env.reset(int(episode))
        return obs, {"instruction": self.env.instruction, "cameras": list(self.env.cameras),
                     "max_steps": int(self.env.max_steps)}

    def run(self, actions: np.ndarray, record_images: bool) -> dict[str, Any]:
        """Execute ``actions`` (``(n, A)``, clipped to the env's bounds) on the current episode until they run out
        or the episode ends. Returns the observations before each executed action (``images`` when recorded,
        ``proprio``), the executed ``actions``, the last ``obs``, ``success`` and ``done``."""
        env = self.env
        low, high = env.action_bounds
        out: dict[str, Any] = {"images": {c: [] for c in env.cameras} if record_images else {}, "proprio": [],
                               "actions": [], "success": False, "done": False, "score": None}
        obs = self._obs
        for action in actions:
            action = np.clip(np.asarray(action, dtype=np.float32), low, high)
            if record_images:
                for cam, img in obs["images"].items():
                    out["images"][cam].append(img)
            out["proprio"].append(np.asarray(obs["proprio"], dtype=np.float32))
            out["actions"].append(action)
            obs, _, success, truncated, info = env.step(action)
            out["score"] = best_score(out["score"], info)
            if success or truncated:
                out.update(success=bool(success), done=True)
                break
        self._obs = obs
        out["obs"] = obs
        return out

    def rollout(self, baseline: str, task: str, render: bool, episode: int, record_images: bool,
                seed: int) -> Rollout:
        """A whole episode of a baseline controller (``expert``, ``random``, ``noop``), one action per call."""
        env = self._env(task, render)
        return run_rollout(env, _BASELINES[baseline], episode, 1, record_images=record_images, seed=seed,
                           record_latency=False)

    def call(self, method: str, *args):
        if method == "reset":
            obs, info = self.reset(*args)
            self._obs = obs
            return obs, info
        return getattr(self, method)(*args)

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def _worker_main(conn, adapter: str, embodiment: Any, seed: int, max_steps: int) -> None:
    """A worker process: serve :class:`EnvHost` calls over ``conn`` until ``close`` (or the pipe closes)."""
    import os

    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then closes the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    host = None
    try:
        host = EnvHost(adapter, embodiment, seed, max_steps)
        conn.send(("ok", None))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                break
            if method == "close":
                break
            try:
                conn.send(("ok", host.call(method, *args)))
            except Exception as err:  # report, keep serving (the parent decides)
                msg = user_message(err)
                conn.send(("user", msg) if msg is not None else ("bug", traceback.format_exc()))
    except Exception as err:
        msg = user_message(err)
        conn.send(("user", msg) if msg is not None else ("bug", traceback.format_exc()))
    finally:
        if host is not None:
            host.close()
        conn.close()


class _Local:
    """One :class:`EnvHost` in this process behind the worker interface (``send`` then ``recv``)."""

    def __init__(self, host: EnvHost):
        self.host, self._result = host, None

    def send(self, method: str, *args) -> None:
        self._result = self.host.call(method, *args)

    def recv(self):
        result, self._result = self._result, None
        return result

    def close(self) -> None:
        self.host.close()


class _Remote:
    """One worker process (spawned) running an :class:`EnvHost`."""

    def __init__(self, ctx, adapter: str, embodiment: Any, seed: int, max_steps: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, adapter, embodiment, seed, max_steps), daemon=True)
        self.proc.start()
        child.close()

    def send(self, method: str, *args) -> None:
        self.conn.send((method, args))

    def recv(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise CosmosPolicyError(f"evaluate: a simulator worker died (exit code {self.proc.exitcode})") from None
        if status == "user":
            raise CosmosPolicyError(value)
        if status == "bug":
            raise RuntimeError(f"simulator worker failed:\n{value}")
        return value

    def close(self) -> None:
        try:
            self.conn.send(("close", ()))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """``num_envs`` env hosts: one in this process for ``num_envs == 1``, else that many spawned worker processes
    (each with its own simulator and renderer; started in parallel). A context manager; ``close`` ends them.

    Raises:
        CosmosPolicyError: a worker cannot build its host (its one-line error).
    """

    def __init__(self, adapter: str, embodiment: Any, seed: int, max_steps: int, num_envs: int):
        self.workers: list[Any] = []
        if num_envs == 1:
            self.workers.append(_Local(EnvHost(adapter, embodiment, seed, max_steps)))
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads / GL contexts
        try:
            for _ in range(num_envs):
                self.workers.append(_Remote(ctx, adapter, embodiment, seed, max_steps))
            for w in self.workers:
                w.recv()  # the host is built
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ per-episode files
#: Settings that determine an episode's result: a resumed run must match them (``episodes/*.json``).
_RUN_KEYS = ("simulator", "checkpoint", "planning_checkpoint", "policy", "seed", "num_steps", "decoding",
             "execute_steps", "max_steps", "embodiment", "num_proposals", "num_futures", "num_values", "aggregation",
             "world_model_steps", "value_steps", "ensemble_steps", "server")


def file_stem(task: str) -> str:
    """A task name as a file name part (``libero_spatial/0`` -> ``libero_spatial-0``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(task))


def _episode_path(output: Path, task: str, episode: int) -> Path:
    return output / "episodes" / f"{file_stem(task)}-ep{episode:03d}.json"


def _read_done(output: Path, todo: list[tuple[str, int]], run: dict[str, Any], resume: bool) -> dict[tuple[str, int], dict]:
    """Episodes of ``todo`` already in ``output/episodes`` with the same settings ``run``.

    Raises:
        CosmosPolicyError: a finished episode there was run with other settings (and ``resume`` is on).
    """
    done: dict[tuple[str, int], dict] = {}
    if not resume:
        return done
    for task, ep in todo:
        path = _episode_path(output, task, ep)
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged file is redone
        if rec.get("run") != run:
            diff = sorted(k for k in set(run) | set(rec.get("run") or {}) if (rec.get("run") or {}).get(k) != run.get(k))
            raise CosmosPolicyError(f"{path}: this output holds episodes run with other settings ({', '.join(diff)}); "
                                    "use another --output, or --resume false to run them again")
        done[(task, ep)] = rec
    return done


def _stats(episodes: list[dict]) -> dict[str, Any]:
    n = len(episodes)
    succ = sum(bool(e["success"]) for e in episodes)
    lo, hi = wilson_interval(succ, n)
    out = {"episodes": n, "successes": succ, "success_rate": succ / n if n else 0.0, "ci95": [lo, hi],
           "mean_length": float(np.mean([e["length"] for e in episodes])) if n else 0.0}
    scores = [e["score"] for e in episodes if e.get("score") is not None]
    if scores:
        # partial progress (e.g. ALOHA's stages): mean with a normal 95% interval of the mean, clipped to [0, 1]
        m = float(np.mean(scores))
        half = Z95 * float(np.std(scores, ddof=1)) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0
        out["mean_score"], out["score_ci95"] = m, [max(0.0, m - half), min(1.0, m + half)]
    return out


def _check_given_embodiment(given: Any, used: Any, where: str) -> None:
    """``--embodiment`` with a checkpoint or a server: the policy's own embodiment is what runs; a given one
    must describe the same robot, else it is refused (it used to be ignored silently).

    Raises:
        CosmosPolicyError: one line naming both embodiments and the first differing field.
    """
    from ..embodiment import load_embodiment

    other = load_embodiment(given)
    diff = other.difference(used, "inference")  # the one rule (embodiment.COMPATIBILITY)
    if diff is not None:
        field, a, b = diff
        raise CosmosPolicyError(f"--embodiment {given}: embodiment {other.name!r} has {field} = {a}, but the policy "
                                    f"({where}) was trained for embodiment {used.name!r} with {field} = {b}; the "
                                    f"policy's embodiment is what runs: drop --embodiment, or evaluate a policy of "
                                    f"that robot")


def _check_default_embodiment(sim: Any, name: str, emb: Any, where: str) -> None:
    """For an adapter without ``check_embodiment``: the policy's proprio and action dims must be those of the
    simulator's ``default_embodiment`` (skipped when that one cannot be loaded).

    Raises:
        CosmosPolicyError: one line naming both embodiments and the differing field.
    """
    from ..embodiment import load_embodiment

    try:
        native = load_embodiment(sim.default_embodiment)
    except (CosmosPolicyError, AttributeError, TypeError):
        return
    diff = emb.difference(native, "simulator")
    if diff is not None:
        field, a, b = diff
        raise CosmosPolicyError(f"{where}: embodiment {emb.name!r} has {field} = {a}, but the {name} "
                                f"simulator's embodiment {native.name!r} ({sim.default_embodiment}) has {field} = "
                                f"{b} (a checkpoint of another robot?)")


@takes_policy_options
def evaluate(
    simulator: str,
    checkpoint: Path | None = None,
    *,
    suite: str | None = None,
    tasks: list[str | int] | str | None = None,
    episodes: int = 10,
    seed: int = 1000,
    policy: Literal["model", "expert", "random", "noop"] = "model",
    num_envs: int = 1,
    resume: bool = True,
    execute_steps: int | None = None,
    max_steps: int | None = None,
    output: Path = Path("runs/evaluate"),
    record_hdf5: bool = False,
    videos: int = 2,
    embodiment: Path | None = None,
    server: str | None = None,
    api_key: str | None = None,
    options: PolicyOptions,
) -> dict[str, Any]:
    """Run a checkpoint (or the simulator's expert, a random policy, the no-op action) closed-loop in a simulator.

    Reports per task, per suite (simulators with suites) and overall the success rate with a Wilson 95%
    interval and the mean episode length, and the policy latency per batched call (mean, p50, p95; a warm-up
    call before the first episode, which loads the text encoder, is reported apart as ``warmup_s``). Writes
    into ``output``: ``episodes/<task>-epNNN.json`` as each episode ends (the resume points),
    ``results.json``, ``videos/<task>-epNNN.gif`` for the first ``videos`` episodes of each task,
    ``values-<task>.png`` (predicted value over each episode) and, with ``record_hdf5``,
    ``rollouts/<task>/<task>-epNNN.hdf5`` per episode (per-episode rollout layout with a ``success`` attribute,
    for ``cosmos-policy convert --format episode_hdf5``). Task names with ``/`` become ``-`` in file names.

    The steps: check the arguments (:func:`_check_arguments`, before any model loads), build what chooses the
    chunks (:func:`_build_acting`: the checkpoint through ``inference.options.build_policy``, a server, or a
    baseline), record the settings (:func:`_settings`), run the episodes not yet done (:func:`_run_baselines`
    or :func:`_run_policy`, each finished one written by :class:`_EpisodeFiles`) and summarise them
    (:func:`_results`).

    Args:
        simulator: registered simulator name (``sim/env.py`` ``SIMULATORS``): ``metaworld``, ``aloha``, ``libero``.
        checkpoint: ``.ckpt`` of ``cosmos-policy fit`` or ``import-checkpoint`` (needed for ``--policy model``).
        suite: a task suite of simulators that have them (LIBERO: ``libero_spatial``, ``libero_object``,
            ``libero_goal``, ``libero_10``, ``libero_90``): without ``--tasks`` every task of the suite, with it
            ``--tasks`` are indices into the suite (``--suite libero_spatial --tasks '[0, 3]'``).
        tasks: the simulator's task names, e.g. ``[drawer-open-v3,reach-v3]``, ``libero_10/2`` or with
            ``--suite`` indices (a comma-separated string also works); default: the simulator's ``default_task``.
        episodes: episodes per task; episode ``i`` starts from the simulator's initial state ``i`` (Meta-World:
            placement ``i`` of ``seed``; LIBERO: the task's fixed initial state ``i``, 50 of them).
        seed: seeds the initial states (where the simulator draws them) and the sampling noise (per call:
            ``call_seed(seed, episode, call)``); pick one other than the demonstrations' (``collect`` defaults
            to 0) to test on unseen placements.
        policy: ``model`` (the checkpoint), ``expert`` (the simulator's expert, e.g. Meta-World's scripted
            policy on privileged state; one action per step), ``random`` (uniform actions inside the env's
            action bounds) or ``noop`` (the simulator's no-op action every step).
        num_envs: simulator worker processes run in parallel (1: the env runs in this process); each round,
            the envs that need a chunk are served by one batched policy call (the planner runs once per env of
            the round). Results do not depend on it.
        resume: skip episodes already in ``output/episodes`` with the same settings (false: run them again).
        execute_steps: actions executed per chunk (default: the embodiment's ``action.execute_steps``).
        max_steps: episode time limit in steps, capped at the simulator's own limit (default: the simulator's
            ``default_max_steps``, else 200; LIBERO: its suite's step limit, Meta-World: 200 of its 500).
        output: output directory (created).
        record_hdf5: save every rollout as a per-episode HDF5.
        videos: GIF strips saved per task (the first episodes).
        embodiment: embodiment YAML for the baselines (default: the checkpoint's or the simulator's
            ``default_embodiment``, for Meta-World ``embodiments/metaworld.yaml``).
        server: ``ws://HOST:PORT`` of ``cosmos-policy serve``: run the policy there instead of loading
            ``checkpoint`` (the server's sampling and planning options apply; the embodiment comes
            from its metadata). Each call sends its seed, so the same seeds give the same rollouts
            as in-process.
        api_key: the server's API key (default: the ``COSMOS_POLICY_API_KEY`` environment variable).
        options: device, sampling and planning options (``inference.options.PolicyOptions``, the same as
            ``serve``'s).

    Returns:
        the results dict written to ``results.json``.

    Raises:
        CosmosPolicyError: unknown simulator, bad arguments, unknown task or suite, missing checkpoint, a
            simulator that cannot run (e.g. no offscreen OpenGL, LIBERO not installed), ``--policy expert``
            for a simulator without expert, an output holding episodes of other settings.
    """
    sim = simulator_class(simulator)
    task_list, max_steps = _check_arguments(sim, simulator, checkpoint, suite, tasks, episodes, policy, num_envs,
                                            max_steps, videos, server, options)
    acting = _build_acting(sim, simulator, checkpoint, policy, options, embodiment, server, api_key)
    emb = acting.embodiment
    execute = execute_steps or emb.action.execute_steps
    if policy == "model" and not 1 <= execute <= emb.action.chunk_size:
        raise CosmosPolicyError(f"evaluate {simulator}: execute_steps must be in [1, {emb.action.chunk_size}], "
                                f"got {execute}")
    if policy != "model":
        execute = 1  # the baselines act step by step

    output = ensure_writable_dir(output, "--output")  # now, not after the episodes have run
    config = _settings(simulator, checkpoint, policy, suite, task_list, episodes, seed, execute, max_steps, num_envs,
                       server, acting)
    run = {k: config.get(k) for k in _RUN_KEYS}
    todo = [(task, ep) for task in task_list for ep in range(episodes)]
    done = _read_done(output, todo, run, resume)
    pending = deque(x for x in todo if x not in done)
    files = _EpisodeFiles(output, task_list, done, run, videos, record_hdf5, seed, config["policy"], checkpoint,
                          scale=max(1, round(192 / max(emb.image_size))))
    from tqdm import tqdm

    bar = tqdm(total=len(todo), initial=len(done), unit="episode", desc=f"evaluate {config['policy']} x{num_envs}",
               dynamic_ncols=True)
    pool = None
    timing = _Timing()
    try:
        if pending:
            pool = WorkerPool(SIMULATORS[simulator], emb, seed, max_steps, min(num_envs, len(pending)))
        workers = pool.workers if pool else []
        if policy != "model":
            _run_baselines(workers, pending, policy, seed, files, bar)
        else:
            _run_policy(workers, pending, acting.controller, seed, execute, files, bar, timing)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        if acting.remote is not None:
            acting.remote.close()

    results = _results(sim, config, todo, files, task_list, episodes, max_steps, emb.value.gamma, output, timing,
                       len(done))
    write_json_atomic(output / "results.json", results)
    _print_table(results, output)
    return results


def _check_arguments(sim: Any, simulator: str, checkpoint: Path | None, suite: str | None, tasks: Any, episodes: int,
                     policy: str, num_envs: int, max_steps: int | None, videos: int, server: str | None,
                     options: PolicyOptions) -> tuple[list[str], int]:
    """Step 1 of :func:`evaluate`: the arguments checked before any model loads (a typo or a missing
    renderer fails in seconds). Returns the task names and the episode limit ``max_steps``.

    Raises:
        CosmosPolicyError: one line naming the argument.
    """
    name = f"evaluate {simulator}"
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    task_arg = None if tasks is None else [str(t).strip() for t in tasks if str(t).strip()]
    if tasks is not None and not task_arg:
        raise CosmosPolicyError(f"{name}: --tasks is empty")
    if hasattr(sim, "resolve_tasks"):
        task_list = list(sim.resolve_tasks(suite, task_arg))
    elif suite is not None:
        raise CosmosPolicyError(f"{name}: --suite is for simulators with task suites (libero); give --tasks")
    else:
        task_list = task_arg or [sim.default_task]
    max_steps = int(getattr(sim, "default_max_steps", 200) if max_steps is None else max_steps)
    if episodes < 1 or max_steps < 1 or videos < 0 or num_envs < 1:
        raise CosmosPolicyError(f"{name}: need episodes >= 1, max_steps >= 1, videos >= 0, num_envs >= 1; got "
                                f"{episodes}, {max_steps}, {videos}, {num_envs}")
    if policy not in ("model", *_BASELINES):
        raise CosmosPolicyError(f"{name}: --policy must be model, expert, random or noop, got {policy!r}")
    if server is not None and (checkpoint is not None or policy != "model" or options.plans):
        raise CosmosPolicyError(f"{name}: --server runs the server's policy: give no --checkpoint and no "
                                "--planning / --planning_checkpoint (start the server with `cosmos-policy serve "
                                "--planning true` instead)")
    if policy == "model" and checkpoint is None and server is None:
        raise CosmosPolicyError(f"{name}: --checkpoint is required with --policy model (or --server "
                                "ws://HOST:PORT of `cosmos-policy serve`)")
    if options.plans and policy != "model":
        raise CosmosPolicyError(f"{name}: --planning (or --planning_checkpoint) needs --policy model")
    for task in task_list:
        sim.check_task(task)
    return task_list, max_steps


@dataclass
class _Acting:
    """What chooses the chunks of an evaluation (step 2 of :func:`evaluate`).

    Attributes:
        embodiment: the robot the envs render and the policy acts for.
        controller: the batched policy (in-process or behind a server); None for the baselines.
        options: the sampling and planning options as they apply (a server's own for ``--server``).
        remote: the :class:`~cosmos_policy_lightning.client.PolicyClient` of ``--server`` (closed at the end).
        policy_view: the adapter prepares the frames itself (``policy_view``; the policy's JPEG and crop off).
    """

    embodiment: Any
    controller: BatchController | None
    options: PolicyOptions
    remote: Any | None = None
    policy_view: bool = False


def _build_acting(sim: Any, simulator: str, checkpoint: Path | None, policy: str, options: PolicyOptions,
                  embodiment: Path | None, server: str | None, api_key: str | None) -> _Acting:
    """Step 2 of :func:`evaluate`: a policy server's client, the checkpoint's policy (and planner) through
    :func:`~cosmos_policy_lightning.inference.options.build_policy`, or a baseline's embodiment; then the
    embodiment is checked against ``--embodiment`` and the simulator, before any episode starts.

    Raises:
        CosmosPolicyError: an unreachable server, an unreadable checkpoint, an embodiment of another robot.
    """
    # An adapter may prepare the frames the way its reference evaluation does (LIBERO: JPEG round trip and the
    # authors' integer centre crop): the policy's own JPEG and crop are then turned off.
    policy_view = getattr(sim, "policy_view", None)
    if server is not None:
        import dataclasses

        from ..client import PolicyClient
        from ..embodiment import Embodiment

        remote = PolicyClient(server, api_key=api_key, timeout=600.0)
        meta = remote.metadata
        sampling = meta.get("sampling", {})
        options = dataclasses.replace(options, **{k: sampling[k] for k in ("num_steps", "decoding", "device", "dtype")
                                                  if sampling.get(k) is not None})
        acting = _Acting(Embodiment.from_dict(meta["embodiment_config"], source=server),
                         per_observation(remote_controller(remote)), options, remote, policy_view is not None)
    elif policy == "model":
        from ..inference.options import build_policy

        built = build_policy(checkpoint, options, jpeg_quality=None if policy_view is not None else 95)
        model, judge, crop = built.policy, built.judge, built.policy.center_crop
        controller = (per_observation(planner_controller(built.planner)) if built.planner is not None
                      else batch_policy_controller(model, options.num_steps, options.decoding))
        if policy_view is not None:
            model.center_crop = judge.center_crop = False  # policy_view crops as the simulator's reference does
            inner = controller

            def controller(observations, seeds, _inner=inner, _crop=crop):
                return _inner([policy_view(o, _crop) for o in observations], seeds)
        acting = _Acting(model.embodiment, controller, options, None, policy_view is not None)
    else:
        from ..embodiment import load_embodiment

        acting = _Acting(load_embodiment(embodiment or sim.default_embodiment), None, options, None,
                         policy_view is not None)
    emb = acting.embodiment
    if embodiment is not None and (server is not None or policy == "model"):
        _check_given_embodiment(embodiment, emb, "the server" if server is not None else str(checkpoint))
    if hasattr(sim, "check_embodiment"):  # another robot's checkpoint: one line, before any episode starts
        sim.check_embodiment(emb)
    else:
        _check_default_embodiment(sim, simulator, emb, str(checkpoint) if policy == "model" and server is None
                                  else (server or str(emb.source)))
    return acting


def _settings(simulator: str, checkpoint: Path | None, policy: str, suite: str | None, task_list: list[str],
              episodes: int, seed: int, execute: int, max_steps: int, num_envs: int, server: str | None,
              acting: _Acting) -> dict[str, Any]:
    """Step 3 of :func:`evaluate`: the settings written as ``results.json``'s ``config`` (those of
    :data:`_RUN_KEYS` also into every episode file, the resume check). ``policy`` is ``planning`` when the
    policy plans (here or on the server)."""
    opts, remote = acting.options, acting.remote
    plans = opts.plans or (remote is not None and bool(remote.metadata.get("planning")))
    config: dict[str, Any] = {
        "simulator": simulator,
        "checkpoint": None if checkpoint is None else str(checkpoint), "planning_checkpoint":
            None if opts.planning_checkpoint is None else str(opts.planning_checkpoint),
        "policy": "planning" if plans else policy, "suite": suite,
        "tasks": task_list, "episodes": episodes, "seed": seed, "num_steps": opts.num_steps, "decoding": opts.decoding,
        "execute_steps": execute, "max_steps": max_steps, "device": opts.device, "dtype": opts.dtype,
        "embodiment": acting.embodiment.name, "num_envs": num_envs, "policy_view": acting.policy_view}
    if opts.plans:
        config.update({k: v for k, v in opts.planner_settings().items() if k != "policy_steps"})
    if remote is not None:  # what the server runs
        meta = remote.metadata
        config.update({"server": server, "checkpoint": meta.get("checkpoint"),
                       "planning_checkpoint": meta.get("planning_checkpoint"), **(meta.get("planning") or {})})
    if policy != "model":  # the sampling settings play no part in a baseline's episodes
        config.update(num_steps=None, decoding=None)
    return config


class _EpisodeFiles:
    """What :func:`evaluate` keeps of each finished episode: ``episodes/<task>-epNNN.json`` (the resume point),
    the GIF of the first ``videos`` episodes of a task, the rollout HDF5 (``record_hdf5``); the records and the
    rollouts (frames freed) for :func:`_results`.

    Args:
        done: the records of episodes finished by an earlier run (``_read_done``).
        scale: GIF magnification (small model images enlarged).
    """

    def __init__(self, output: Path, task_list: list[str], done: dict[tuple[str, int], dict], run: dict[str, Any],
                 videos: int, record_hdf5: bool, seed: int, label: str, checkpoint: Path | None, scale: int):
        self.output, self.run, self.videos, self.record_hdf5 = output, run, videos, record_hdf5
        self.seed, self.label, self.checkpoint, self.scale = seed, label, checkpoint, scale
        self.records: dict[tuple[str, int], dict] = dict(done)
        self.rollouts: dict[str, list[Rollout]] = {t: [] for t in task_list}

    def record_images(self, episode: int) -> bool:
        """Whether an episode's frames are kept (for its GIF or HDF5)."""
        return self.record_hdf5 or episode < self.videos

    def finish(self, r: Rollout, seconds: float, limit: int | None = None) -> None:
        """Write episode ``r`` (its wall-clock ``seconds``, the env's step ``limit``) and free its frames."""
        task, ep, output = r.task, r.episode, self.output
        stem = f"{file_stem(task)}-ep{ep:03d}"
        if ep < self.videos:
            # at most ~120 frames: a 520-step LIBERO episode stays a few MB
            save_gif(output / "videos" / f"{stem}.gif", r, scale=self.scale, every=max(1, math.ceil(r.length / 120)))
        if self.record_hdf5:
            write_rollout_hdf5(output / "rollouts" / file_stem(task) / f"{stem}.hdf5", r, attrs={
                "seed": self.seed, "policy": self.label, "checkpoint": str(self.checkpoint or "")})
        rec = {"task": task, "episode": ep, "success": r.success, "length": r.length, "success_step": r.success_step,
               "score": r.score, "seconds": seconds, "values": [[s, v] for s, v in r.values], "latencies": list(r.latencies),
               "limit": limit, "run": self.run}
        write_json_atomic(_episode_path(output, task, ep), rec)
        self.records[(task, ep)] = rec
        r.images = {}  # free the frames
        self.rollouts[task].append(r)

    def successes(self) -> int:
        return sum(bool(x["success"]) for x in self.records.values())


@dataclass
class _Timing:
    """The policy calls of an evaluation: the warm-up call's seconds, each batched call's seconds and size."""

    warmup: float | None = None
    call_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


def _run_baselines(workers: list[Any], pending: deque, baseline: str, seed: int, files: _EpisodeFiles, bar) -> None:
    """Step 4 for ``--policy expert | random | noop``: whole episodes inside the workers, one per worker at a time."""
    while pending:
        batch = [(w, pending.popleft()) for w in workers if pending]
        starts = []
        for w, (task, ep) in batch:
            images = files.record_images(ep)
            # Baselines need camera frames only for GIFs / HDF5: a non-rendering env runs faster.
            starts.append(time.perf_counter())  # before send: an in-process host runs the episode in it
            w.send("rollout", baseline, task, images, ep, images, seed)
        for (w, _), t0 in zip(batch, starts):
            files.finish(w.recv(), time.perf_counter() - t0)
            bar.update(1)


def _run_policy(workers: list[Any], pending: deque, controller: BatchController, seed: int, execute: int,
                files: _EpisodeFiles, bar, timing: _Timing) -> None:
    """Step 4 for the policy: every round, each worker without an episode starts the next one; the envs'
    observations go to one batched ``controller`` call (seeded per episode and call, :func:`call_seed`); each
    worker executes the first ``execute`` actions of its chunk; finished episodes go to ``files``."""
    active: dict[int, dict[str, Any]] = {}  # worker index -> the episode it runs
    while pending or active:
        starting = []
        for i, w in enumerate(workers):
            if i not in active and pending:
                task, ep = pending.popleft()
                starting.append((i, task, ep, time.perf_counter()))  # the episode's time includes its reset
                w.send("reset", task, True, ep)
        for i, task, ep, t0 in starting:
            obs, info = workers[i].recv()
            images = files.record_images(ep)
            active[i] = {"rollout": Rollout(task, ep, info["instruction"],
                                            images={c: [] for c in info["cameras"]} if images else {}),
                         "obs": obs, "call": 0, "images": images, "t0": t0, "limit": int(info["max_steps"])}
        if timing.warmup is None:
            # One call outside the statistics: loads the text encoder, allocates buffers. Calls are
            # seeded individually, so it changes no episode.
            first = next(iter(active.values()))
            start = time.perf_counter()
            controller([first["obs"]], [0])
            timing.warmup = time.perf_counter() - start
        order = sorted(active)
        seeds = [call_seed(seed, active[i]["rollout"].episode, active[i]["call"]) for i in order]
        start = time.perf_counter()
        chunks = controller([active[i]["obs"] for i in order], seeds)
        seconds = time.perf_counter() - start
        timing.call_seconds.append(seconds)
        timing.batch_sizes.append(len(order))
        for i, (chunk, value) in zip(order, chunks):
            st = active[i]
            st["call"] += 1
            r = st["rollout"]
            r.latencies.append(seconds)
            if value is not None:
                r.values.append((r.length, float(value)))
            workers[i].send("run", np.asarray(chunk, dtype=np.float32)[:execute], st["images"])
        for i in order:
            res = workers[i].recv()
            st = active[i]
            r = st["rollout"]
            for cam, frames in res["images"].items():
                r.images[cam].extend(frames)
            r.proprio.extend(res["proprio"])
            r.actions.extend(res["actions"])
            r.score = best_score(r.score, {"success_score": res["score"]})
            st["obs"] = res["obs"]
            if res["done"]:
                if res["success"]:
                    r.success, r.success_step = True, r.length - 1
                files.finish(r, time.perf_counter() - st["t0"], st["limit"])
                del active[i]
                bar.update(1)
                bar.set_postfix(successes=files.successes(), refresh=False)


def _results(sim: Any, config: dict[str, Any], todo: list[tuple[str, int]], files: _EpisodeFiles, task_list: list[str],
             episodes: int, max_steps: int, gamma: float, output: Path, timing: _Timing,
             resumed: int) -> dict[str, Any]:
    """Step 5 of :func:`evaluate`: ``results.json``'s content: per task the success rate, latency and, when the
    policy predicts values, the closed-loop value AUROC, calibration and ranking (with their plots in
    ``output``); per suite; overall."""
    label, records = config["policy"], files.records
    episodes_out = [records[x] for x in todo]
    results: dict[str, Any] = {"config": config, "tasks": {}, "episodes": [
        {k: v for k, v in e.items() if k not in ("run", "latencies", "limit")} for e in episodes_out]}
    for task in task_list:
        recs = [records[(task, ep)] for ep in range(episodes)]
        results["tasks"][task] = {**_stats(recs), "latency": latency_summary([s for e in recs for s in e["latencies"]])}
        if any(e["values"] for e in recs):
            # does the value predicted early already tell the episodes that will fail (sim/value_metrics.py)
            results["tasks"][task]["value_auroc"] = closed_loop_value_auroc(
                recs, max(e.get("limit") or max_steps for e in recs))[task]["auroc"]
            plot_values(output / f"values-{file_stem(task)}.png",
                        [Rollout(task, e["episode"], "", success=bool(e["success"]),
                                 values=[(int(s), float(v)) for s, v in e["values"]]) for e in recs],
                        f"{task}: predicted value ({label})")
            # is a predicted 0.8 worth 0.8 of the return, and does the value rank outcomes at equal time
            curve = closed_loop_calibration(recs, gamma)[task]
            results["tasks"][task]["value_calibration"] = curve.to_json() if curve else None
            results["tasks"][task]["value_ranking"] = ranking_accuracy(recs)[task]
            if curve is not None:
                save_figure(output / f"calibration-{file_stem(task)}.png",
                            reliability_figure({task: curve}, f"{task}: value calibration ({label})"))
    if hasattr(sim, "suite_of"):
        groups: dict[str, list[dict]] = {}
        for e in episodes_out:
            groups.setdefault(sim.suite_of(e["task"]), []).append(e)
        results["suites"] = {s: _stats(g) for s, g in groups.items()}
    results["overall"] = {**_stats(episodes_out), "latency": latency_summary(timing.call_seconds),
                          "warmup_s": timing.warmup, "resumed_episodes": resumed,
                          "mean_batch": float(np.mean(timing.batch_sizes)) if timing.batch_sizes else None}
    return results


def _fmt_opt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _print_table(results: dict[str, Any], output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['config']['simulator']} closed loop: {results['config']['policy']}",
                  caption=f"results: {output}/results.json")
    for col in ("task", "success", "95% CI", "progress", "mean length", "latency/chunk mean", "p50", "p95", "value AUROC 25/50/100%",
                "ranking", "ECE"):
        table.add_column(col, justify="left" if col == "task" else "right")
    rows = list(results["tasks"].items()) + [(f"suite {s}", t) for s, t in results.get("suites", {}).items()]
    rows += [("overall", results["overall"])]
    for name, t in rows:
        lat = t.get("latency", {})
        fmt = lambda k: f"{lat[k]:.3f} s" if k in lat else "-"  # noqa: E731
        table.add_row(name, f"{t['successes']}/{t['episodes']} ({100 * t['success_rate']:.0f}%)",
                      f"[{100 * t['ci95'][0]:.0f}%, {100 * t['ci95'][1]:.0f}%]", _fmt_opt(t.get("mean_score")),
                      f"{t['mean_length']:.1f}",
                      fmt("mean_s"), fmt("p50_s"), fmt("p95_s"),
                      " / ".join("-" if a is None else f"{a:.2f}" for a in t["value_auroc"].values())
                      if t.get("value_auroc") else "-",
                      _fmt_opt((t.get("value_ranking") or {}).get("accuracy")),
                      _fmt_opt((t.get("value_calibration") or {}).get("ece"), ".3f"))
    Console(width=170).print(table)


__all__ = ["BatchController", "Controller", "EnvHost", "WorkerPool", "batch_policy_controller", "best_score", "call_seed", "evaluate",
           "expert_controller", "file_stem", "latency_summary", "noop_controller", "per_observation",
           "planner_controller", "policy_controller", "random_controller", "remote_controller", "run_rollout",
           "wilson_interval"]
