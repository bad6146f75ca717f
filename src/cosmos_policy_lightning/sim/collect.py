"""``cosmos-policy collect metaworld``: scripted-expert demonstrations, successful and failed, as HDF5.

One robomimic-layout file per task, ``<output>/<task>.hdf5``::

    attrs: env="metaworld", task, instruction, command, arguments (JSON), seed, image_size,
           embodiment, versions (JSON), successes, episodes
    data/                           attrs: total (steps in the file), env_args (JSON, robomimic style)
      demo_<i>/                     attrs: num_samples, success (bool), success_step (-1 if never),
                                           instruction, task_description, seed, initial_state,
                                           noise_std, noise_theta
        actions          (T, 4) float32   executed action (expert + noise, clipped to [-1, 1])
        rewards          (T,)   float32   1 where Meta-World reports success after the action, else 0
        dense_rewards    (T,)   float32   Meta-World's shaped reward in [0, 10]
        dones            (T,)   uint8     1 at the last step
        obs/<cam>_rgb    (T, H, W, 3) uint8   one per embodiment camera (gripperPOV_rgb, corner_rgb)
        obs/hand_pos     (T, 3) float32   tool-centre position (m)
        obs/gripper_opening (T, 1) float32   finger distance / 0.1 m, in [0, 1]

``obs[t]`` is what the robot saw when it executed ``actions[t]``. The key names are those of
``embodiments/metaworld.yaml`` (``robomimic`` keys), so ``cosmos-policy convert`` reads the files
with that embodiment directly.

An episode starts from Meta-World placement ``i`` (see :meth:`MetaWorldEnv.reset`), runs the
scripted expert, optionally perturbed by temporally correlated noise (:class:`CorrelatedActionNoise`),
and ends ``stop_after_success`` steps after the first success, or after ``max_steps`` steps
(a failure). Everything is a function of ``seed``: the same command writes the same actions.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import CosmosPolicyError
from .env import SimEnv
from .metaworld import DEFAULT_EMBODIMENT, CorrelatedActionNoise, MetaWorldEnv

#: The file format written: image datasets are named by the embodiment cameras' keys for it.
SOURCE_FORMAT = "robomimic"

#: Default episode time limit of the collector: clean experts need at most ~90 steps on reach / push /
#: drawer-open / button-press and rarely more than 150 on the harder tasks (docs/metaworld.md).
DEFAULT_MAX_STEPS = 150

#: HDF5 compression of the image datasets (gzip is readable by every HDF5 build).
IMAGE_COMPRESSION = {"compression": "gzip", "compression_opts": 6}


@dataclass
class EpisodeRecord:
    """One recorded episode (arrays of length T = number of steps).

    Attributes:
        images: camera name -> (T, H, W, 3) uint8.
        proprio: (T, 4) float32 (hand x, y, z in m, gripper opening in [0, 1]).
        actions: (T, 4) float32, executed actions in [-1, 1].
        rewards: (T,) float32 sparse success reward (0 / 1).
        dense_rewards: (T,) float32 Meta-World's shaped reward.
        success: whether Meta-World reported success at any step.
        success_step: first step whose action led to success, -1 if none.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dense_rewards: np.ndarray
    success: bool
    success_step: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def noise_rng(seed: int, task: str, episode: int) -> np.random.Generator:
    """The generator of one episode's action noise: a function of (seed, task, episode) only, so
    results do not depend on worker scheduling (crc32 is stable across processes, unlike hash())."""
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(episode)])


def run_episode(env: SimEnv, episode: int, noise: CorrelatedActionNoise | None = None,
                stop_after_success: int | None = 8) -> EpisodeRecord:
    """Roll out the env's expert once (any :class:`~.env.SimEnv` with an expert).

    Args:
        env: the environment (its ``max_steps`` bounds the episode).
        episode: initial-state index passed to :meth:`~.env.SimEnv.reset`.
        noise: added to every expert action before clipping to ``env.action_bounds``; None = clean expert.
        stop_after_success: steps recorded after the first success (None = run to ``max_steps``).

    Returns:
        the :class:`EpisodeRecord`.

    Raises:
        CosmosPolicyError: the env has no expert.
    """
    obs = env.reset(episode)
    low, high = env.action_bounds
    frames: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    proprio, actions, rewards, dense = [], [], [], []
    success_step = -1
    while True:
        action = env.expert()
        if action is None:
            raise CosmosPolicyError(f"{env.task}: this simulator has no expert to collect demonstrations with")
        if noise is not None:
            action = np.clip(action + noise(), low, high).astype(np.float32)
        for cam, img in obs["images"].items():
            frames[cam].append(img)
        proprio.append(obs["proprio"])
        actions.append(action)
        obs, reward, success, truncated, _ = env.step(action)
        rewards.append(float(success))
        dense.append(reward)
        t = len(actions) - 1
        if success and success_step < 0:
            success_step = t
        if truncated:
            break
        if success_step >= 0 and stop_after_success is not None and t >= success_step + stop_after_success:
            break
    return EpisodeRecord(
        images={c: np.stack(v) for c, v in frames.items() if v},
        proprio=np.stack(proprio).astype(np.float32),
        actions=np.stack(actions).astype(np.float32),
        rewards=np.asarray(rewards, dtype=np.float32),
        dense_rewards=np.asarray(dense, dtype=np.float32),
        success=success_step >= 0,
        success_step=success_step,
    )


def write_episode(group, record: EpisodeRecord, camera_keys: dict[str, str]) -> None:
    """Write ``record`` into the h5py group ``data/demo_<i>`` (layout in the module docstring)."""
    T = record.length
    group.create_dataset("actions", data=record.actions)
    group.create_dataset("rewards", data=record.rewards)
    group.create_dataset("dense_rewards", data=record.dense_rewards)
    dones = np.zeros(T, dtype=np.uint8)
    dones[-1] = 1
    group.create_dataset("dones", data=dones)
    obs = group.create_group("obs")
    for cam, images in record.images.items():
        obs.create_dataset(camera_keys[cam], data=images, chunks=(min(T, 16),) + images.shape[1:],
                           **IMAGE_COMPRESSION)
    obs.create_dataset("hand_pos", data=record.proprio[:, :3])
    obs.create_dataset("gripper_opening", data=record.proprio[:, 3:4])
    group.attrs["num_samples"] = T
    group.attrs["success"] = bool(record.success)
    group.attrs["success_step"] = int(record.success_step)
    for key, value in record.attrs.items():
        group.attrs[key] = value


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("metaworld", "mujoco", "cosmos-policy-lightning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def collect_task(task: str, episodes: int, path: Path, *, noise_std: float, noise_theta: float,
                 clean_episodes: int, seed: int, max_steps: int | None, stop_after_success: int | None,
                 embodiment: Path, arguments: dict[str, Any], progress=None) -> dict[str, Any]:
    """Collect ``episodes`` episodes of one task into ``path`` (written to a temporary name, then renamed).

    Episodes ``0 .. clean_episodes-1`` run the clean expert, the rest add noise of ``noise_std``.
    ``progress`` (optional) is called with ``(task, steps)`` after each episode.

    Returns:
        a summary: task, path, episodes, successes (clean / noisy), steps, seconds, bytes.
    """
    import h5py

    started = time.perf_counter()
    summary = {"task": task, "path": str(path), "episodes": episodes, "clean": 0, "clean_success": 0,
               "noisy": 0, "noisy_success": 0, "steps": 0}
    # written under a temporary name and renamed when complete (atomic.py): never a half file
    with atomic_path(path) as tmp, MetaWorldEnv(task, embodiment, seed=seed, max_steps=max_steps) as env, \
            h5py.File(tmp, "w") as f:
        camera_keys = {c.name: c.keys.get(SOURCE_FORMAT, f"{c.name}_rgb") for c in env.embodiment.cameras}
        data = f.create_group("data")
        for i in range(episodes):
            clean = i < clean_episodes or noise_std == 0
            noise = None if clean else CorrelatedActionNoise(4, noise_std, noise_theta, noise_rng(seed, task, i))
            record = run_episode(env, i, noise, stop_after_success)
            record.attrs.update(instruction=env.instruction, task_description=env.instruction, seed=seed,
                                initial_state=i, noise_std=0.0 if clean else float(noise_std),
                                noise_theta=float(noise_theta))
            write_episode(data.create_group(f"demo_{i}"), record, camera_keys)
            kind = "clean" if clean else "noisy"
            summary[kind] += 1
            summary[f"{kind}_success"] += int(record.success)
            summary["steps"] += record.length
            if progress is not None:
                progress(task, record.length)
        data.attrs["total"] = summary["steps"]
        data.attrs["env_args"] = json.dumps({"env_name": task, "type": "metaworld",
                                             "env_kwargs": {"seed": seed, "max_steps": env.max_steps,
                                                            "image_size": list(env.image_size),
                                                            "cameras": dict(env.cameras)}})
        f.attrs.update(env="metaworld", task=task, instruction=env.instruction,
                       command=shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]), arguments=json.dumps(arguments, default=str),
                       seed=seed, image_size=list(env.image_size), embodiment=env.embodiment.name,
                       versions=json.dumps(_versions()), episodes=episodes,
                       successes=summary["clean_success"] + summary["noisy_success"])
    summary["seconds"] = time.perf_counter() - started
    summary["bytes"] = path.stat().st_size
    return summary


# ---------------------------------------------------------------------------------------- workers
_QUEUE = None


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _worker(task: str, episodes: int, path: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    return collect_task(task, episodes, path, progress=lambda t, n: _QUEUE.put((t, n)), **kwargs)


def collect_metaworld(
    *,
    tasks: list[str] | str,
    episodes: int,
    output: Path = Path("data/metaworld"),
    noise_std: float = 0.0,
    noise_theta: float = 0.1,
    clean_episodes: int = 0,
    seed: int = 0,
    workers: int = 1,
    max_steps: int | None = DEFAULT_MAX_STEPS,
    stop_after_success: int | None = 8,
    embodiment: Path = DEFAULT_EMBODIMENT,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Record scripted-expert episodes in Meta-World into one robomimic HDF5 per task.

    Every episode is saved, successful or not; the ``success`` attribute of ``data/demo_<i>`` marks it.
    Images are rendered offscreen (MUJOCO_GL=egl, else osmesa) at the embodiment's image size.

    Args:
        tasks: Meta-World v3 task names, e.g. ``[drawer-open-v3,reach-v3]`` or ``drawer-open-v3``
            (a comma-separated string also works).
        episodes: episodes per task; episode ``i`` starts from Meta-World placement ``i``.
        output: directory receiving ``<task>.hdf5``.
        noise_std: standard deviation of the action noise, in action units (actions are in [-1, 1]);
            0 records the clean expert only. 0.3 makes the expert fail often on push / drawer-open.
        noise_theta: mean reversion per step of the Ornstein-Uhlenbeck noise in (0, 1]; 1 = i.i.d.,
            0.1 = drifts lasting about 10 steps (the experts correct i.i.d. noise and rarely fail).
        clean_episodes: how many of the ``episodes`` (the first ones) run without noise.
        seed: seeds the initial-state placements and the noise; the same seed gives the same files.
        workers: processes collecting different tasks in parallel.
        max_steps: episode time limit in steps (Meta-World allows 500; null = 500); an episode without
            success by then is a failure. The default 150 (1.9 s at 80 Hz) is enough for the clean
            experts on nearly all tasks and turns the noisy expert's slow recoveries into failures.
        stop_after_success: steps recorded after the first success before the episode ends
            (null = continue to max_steps).
        embodiment: embodiment YAML whose cameras (``robomimic`` keys ``<mujoco camera>_rgb``) and
            image size are rendered.
        overwrite: replace existing ``<task>.hdf5`` files.

    Returns:
        one summary dict per task (path, episodes, successes, steps, seconds, bytes).

    Raises:
        CosmosPolicyError: unknown task, bad numbers, existing output without ``overwrite``, or no
            offscreen OpenGL.
    """
    from .metaworld import check_task, select_gl_backend

    task_list = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not task_list:
        raise CosmosPolicyError("collect metaworld: --tasks is empty")
    if len(set(task_list)) != len(task_list):
        raise CosmosPolicyError(f"collect metaworld: duplicate tasks in {task_list}")
    if episodes < 1:
        raise CosmosPolicyError(f"collect metaworld: --episodes must be >= 1, got {episodes}")
    if not 0 <= clean_episodes <= episodes:
        raise CosmosPolicyError(f"collect metaworld: --clean_episodes must be in [0, {episodes}], got {clean_episodes}")
    if noise_std < 0 or not 0 < noise_theta <= 1:
        raise CosmosPolicyError(f"collect metaworld: need noise_std >= 0 and 0 < noise_theta <= 1, "
                                f"got {noise_std}, {noise_theta}")
    if stop_after_success is not None and stop_after_success < 0:
        raise CosmosPolicyError(f"collect metaworld: --stop_after_success must be >= 0 or null, got {stop_after_success}")
    if workers < 1:
        raise CosmosPolicyError(f"collect metaworld: --workers must be >= 1, got {workers}")
    select_gl_backend()  # before any MuJoCo import; exported to the worker processes
    for task in task_list:
        check_task(task)
    output = Path(output)
    paths = {t: output / f"{t}.hdf5" for t in task_list}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise CosmosPolicyError(f"collect metaworld: {existing[0]} exists (pass --overwrite true to replace it)")
    output.mkdir(parents=True, exist_ok=True)

    arguments = dict(tasks=task_list, episodes=episodes, noise_std=noise_std, noise_theta=noise_theta,
                     clean_episodes=clean_episodes, seed=seed, max_steps=max_steps,
                     stop_after_success=stop_after_success, embodiment=str(embodiment))
    kwargs = dict(noise_std=noise_std, noise_theta=noise_theta, clean_episodes=clean_episodes, seed=seed,
                  max_steps=max_steps, stop_after_success=stop_after_success, embodiment=Path(embodiment),
                  arguments=arguments)
    from tqdm import tqdm

    started = time.perf_counter()
    bar = tqdm(total=episodes * len(task_list), unit="episode", desc="collect metaworld", dynamic_ncols=True)
    steps = 0

    def advance(task: str, n: int) -> None:
        nonlocal steps
        steps += n
        bar.update(1)
        bar.set_postfix(task=task, steps=steps, refresh=False)

    try:
        if workers == 1 or len(task_list) == 1:
            summaries = [collect_task(t, episodes, paths[t], progress=advance, **kwargs) for t in task_list]
        else:
            summaries = _collect_parallel(task_list, episodes, paths, kwargs, min(workers, len(task_list)), advance)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    _print_summary(summaries, elapsed)
    return summaries


def _collect_parallel(task_list, episodes, paths, kwargs, workers, advance) -> list[dict[str, Any]]:
    """One task per process ('spawn': no GL or MuJoCo state is inherited); progress comes back
    through a queue so the parent's bar moves per episode."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
        futures = {t: pool.submit(_worker, t, episodes, paths[t], kwargs) for t in task_list}
        while not all(f.done() for f in futures.values()):
            try:
                advance(*q.get(timeout=0.5))
            except queue_mod.Empty:
                pass
        while True:  # drain updates that raced with completion
            try:
                advance(*q.get_nowait())
            except queue_mod.Empty:
                break
        return [futures[t].result() for t in task_list]


def _print_summary(summaries: list[dict[str, Any]], elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Meta-World collection ({elapsed:.0f} s)")
    for col in ("task", "clean ok", "noisy ok", "steps", "steps/s", "MB", "file"):
        table.add_column(col, justify="left" if col in ("task", "file") else "right")
    for s in summaries:
        table.add_row(s["task"], f"{s['clean_success']}/{s['clean']}", f"{s['noisy_success']}/{s['noisy']}",
                      str(s["steps"]), f"{s['steps'] / max(s['seconds'], 1e-9):.1f}", f"{s['bytes'] / 2**20:.2f}",
                      s["path"])
    Console(stderr=True, width=140).print(table)
