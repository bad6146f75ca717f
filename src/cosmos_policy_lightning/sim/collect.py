"""``cosmos-policy collect SIMULATOR``: expert demonstrations, successful and failed, from any simulator.

Works for every simulator registered in :data:`~.env.SIMULATORS` whose env has an expert
(:meth:`~.env.SimEnv.expert`). Episode ``i`` of a task starts from the env's initial state ``i``
(:meth:`~.env.SimEnv.reset`), runs the expert, optionally perturbed by temporally correlated noise
(:class:`~.noise.CorrelatedActionNoise`, its std a fraction of each action dimension's half range), and ends
``stop_after_success`` steps after the first success, or after ``max_steps`` steps (a failure). Every
episode is kept; its ``success`` attribute marks it. Everything is a function of ``(seed, task, episode)``:
the same command writes the same actions and images with any number of ``--workers``.

Two layouts (``--format``; default: the adapter's ``collect_format`` attribute, else ``episode_hdf5``).
Dataset names come from the embodiment's keys for that format (defaults below), so
``cosmos-policy convert --format <format>`` reads the output with the same embodiment.

``episode_hdf5`` (ACT / ALOHA, one file per episode), ``<output>/<task>/episode_<i>.hdf5``::

    attrs: success (bool), success_step (-1 if never), instruction, task_description, sim, task, seed,
           initial_state (= i), noise_std, noise_theta, num_samples, seconds, embodiment, image_size,
           command, arguments (JSON), versions (JSON); success_score (the episode's best partial progress in
           [0, 1], the reference's rollout attribute, used by convert for the value) where the env reports one
    observations/images/<camera>   (T, H, W, 3) uint8   gzip; key: cameras[].keys.episode_hdf5
    observations/qpos              (T, P) float32       proprio in robot units; key: proprio.keys.episode_hdf5
    action                         (T, A) float32       executed action (expert + noise, clipped to action_bounds)
    rewards (T,) float32 (1 where success is reported after the action), dense_rewards (T,) float32 (the
    simulator's reward), dones (T,) uint8 (1 at the last step); success_score (T,) float32 where the env's
    step info has ``success_score`` (its partial progress after each action, a fraction in [0, 1])

``robomimic`` (Meta-World's default), ``<output>/<task>.hdf5``::

    attrs: env (the simulator), task, instruction, command, arguments, seed, image_size, embodiment,
           versions, episodes, successes
    data/                 attrs: total (steps in the file), env_args (JSON, robomimic style)
      demo_<i>/           the episode attributes above (num_samples, success, ...), and the same datasets,
                          named ``actions``, ``obs/<camera key>`` (default ``<camera>_rgb``), ``obs/<proprio key>``

``obs[t]`` is what the robot saw when it executed ``action[t]``. An embodiment naming several proprio keys for
a format needs the adapter's ``proprio_parts`` (key -> width) to split the proprio.

Resumable: each episode is written to a temporary name and renamed (``atomic.py``; robomimic episodes go to
``<output>/.parts/<task>/demo_<i>.hdf5.part`` and are joined into ``<task>.hdf5`` once the task is complete).
``<output>/collection.json`` records the arguments; a rerun with the same arguments skips the episodes on
disk, other arguments are refused unless ``--overwrite``. At the end it holds the summary table.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..atomic import atomic_path, ensure_writable_dir, write_json_atomic
from ..embodiment import Embodiment, load_embodiment
from ..errors import CosmosPolicyError
from .env import SIMULATORS, SimEnv
from .env import simulator as simulator_class
from .noise import CorrelatedActionNoise, noise_rng

#: ``max_steps`` handed to ``Simulator.create`` for "the simulator's own limit" (it caps it there).
NO_LIMIT = 1_000_000

#: HDF5 compression of the image datasets (gzip is readable by every HDF5 build).
IMAGE_COMPRESSION = {"compression": "gzip", "compression_opts": 6}

#: Name of the record of a collection's arguments and summary inside its output folder.
COLLECTION_JSON = "collection.json"

@dataclass
class EpisodeRecord:
    """One recorded episode (arrays of length T = number of steps).

    Attributes:
        images: camera name -> (T, H, W, 3) uint8 (empty when the env renders nothing).
        proprio: (T, P) float32 in robot units.
        actions: (T, A) float32, executed actions inside the env's ``action_bounds``.
        rewards: (T,) float32 sparse success reward (1 where the env reports success after the action).
        dense_rewards: (T,) float32 the simulator's own reward.
        success: whether the env reported success at any step.
        success_step: first step whose action led to success, -1 if none.
        success_score: (T,) float32 the env's ``info["success_score"]`` (partial progress in [0, 1]) after
            each action, or None when its info has no such key.
        attrs: per-episode attributes written with the arrays.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dense_rewards: np.ndarray
    success: bool
    success_step: int
    success_score: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of steps T."""
        return int(self.actions.shape[0])


def run_episode(env: SimEnv, episode: int, noise: CorrelatedActionNoise | None = None,
                stop_after_success: int | None = 8) -> EpisodeRecord:
    """Roll out the env's expert once (any :class:`~.env.SimEnv` with an expert).

    Args:
        env: the environment (its ``max_steps`` bounds the episode).
        episode: initial-state index passed to :meth:`~.env.SimEnv.reset`.
        noise: added to every expert action (robot units) before clipping to ``env.action_bounds``;
            None = clean expert.
        stop_after_success: steps recorded after the first success (None = run to ``max_steps``).

    Returns:
        the :class:`EpisodeRecord`.

    Raises:
        CosmosPolicyError: the env has no expert, or its ``info["success_score"]`` is outside [0, 1] or
            contradicts its success (reaching 1 must coincide with success).
    """
    obs = env.reset(episode)
    low, high = env.action_bounds
    frames: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    proprio, actions, rewards, dense, scores = [], [], [], [], []
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
        obs, reward, success, truncated, info = env.step(action)
        rewards.append(float(success))
        dense.append(reward)
        if "success_score" in info:
            score = float(info["success_score"])
            if not 0.0 <= score <= 1.0:
                raise CosmosPolicyError(f"{env.task}: episode {episode}: info['success_score'] must be a fraction in "
                                        f"[0, 1] (partial progress), got {info['success_score']!r}")
            scores.append(score)
        t = len(actions) - 1
        if success and success_step < 0:
            success_step = t
        if truncated:
            break
        if success_step >= 0 and stop_after_success is not None and t >= success_step + stop_after_success:
            break
    if scores and (max(scores) >= 1.0) != (success_step >= 0):
        raise CosmosPolicyError(f"{env.task}: episode {episode}: info['success_score'] reached {max(scores):g} but "
                                f"the episode {'succeeded' if success_step >= 0 else 'never succeeded'}; a score of 1 "
                                f"must mean success")
    return EpisodeRecord(
        images={c: np.stack(v) for c, v in frames.items() if v},
        proprio=np.stack(proprio).astype(np.float32),
        actions=np.stack(actions).astype(np.float32),
        rewards=np.asarray(rewards, dtype=np.float32),
        dense_rewards=np.asarray(dense, dtype=np.float32),
        success=success_step >= 0,
        success_step=success_step,
        success_score=np.asarray(scores, dtype=np.float32) if len(scores) == len(actions) else None,
    )


# ---------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class EpisodeLayout:
    """Dataset paths of one episode inside its HDF5 group (the file root, or ``data/demo_<i>``).

    Attributes:
        cameras: embodiment camera name -> dataset path of its ``(T, H, W, 3)`` images.
        proprio: ``(dataset path, width)`` per proprio part, in order; widths sum to the proprio dim P.
        action: dataset path of the ``(T, A)`` actions.
    """

    cameras: dict[str, str]
    proprio: tuple[tuple[str, int], ...]
    action: str

    @classmethod
    def for_format(cls, fmt: str, embodiment: Embodiment, proprio_parts: Mapping[str, int] | None = None
                   ) -> "EpisodeLayout":
        """The layout of format ``fmt`` with the embodiment's keys for it (defaults of :data:`FORMATS`).

        Args:
            fmt: a name of :data:`FORMATS`.
            embodiment: its cameras, ``proprio.keys[fmt]`` (a list) and ``action.keys[fmt]`` name the datasets.
            proprio_parts: the adapter's proprio key -> width, needed when the embodiment names several
                proprio keys for ``fmt``.

        Raises:
            CosmosPolicyError: several proprio keys without widths for each, or widths that do not add up.
        """
        spec = FORMATS[fmt]
        cameras = {c.name: spec.obs_prefix + c.keys.get(fmt, spec.camera.format(camera=c.name))
                   for c in embodiment.cameras}
        keys = list(embodiment.proprio.keys.get(fmt, (spec.proprio,)))
        dim = embodiment.proprio.dim
        if len(keys) == 1:
            widths = [dim]
        else:
            parts = dict(proprio_parts or {})
            widths = [parts.get(k) for k in keys]
            if None in widths or sum(widths) != dim:
                raise CosmosPolicyError(
                    f"{embodiment.source}: proprio.keys.{fmt} names {keys}; the simulator's proprio_parts "
                    f"{parts or '(none)'} must give each one's width, adding up to proprio.dim {dim}")
        action = embodiment.action.keys.get(fmt, spec.action)
        return cls(cameras, tuple((spec.obs_prefix + k, int(w)) for k, w in zip(keys, widths)), action)


@dataclass(frozen=True)
class FormatSpec:
    """Default dataset names of a layout (``{camera}`` is the embodiment camera's name) and where the
    observations live in an episode's group (``obs_prefix``)."""

    camera: str
    proprio: str
    action: str
    obs_prefix: str


#: ``--format`` -> default dataset names (the embodiment's keys for the format take precedence).
FORMATS: dict[str, FormatSpec] = {
    "episode_hdf5": FormatSpec("observations/images/{camera}", "observations/qpos", "action", ""),
    "robomimic": FormatSpec("{camera}_rgb", "proprio", "actions", "obs/"),
}


def write_episode(group, record: EpisodeRecord, layout: EpisodeLayout) -> None:
    """Write ``record``'s arrays and attributes into the h5py group ``group`` (module docstring)."""
    T = record.length
    group.create_dataset(layout.action, data=record.actions)
    group.create_dataset("rewards", data=record.rewards)
    group.create_dataset("dense_rewards", data=record.dense_rewards)
    dones = np.zeros(T, dtype=np.uint8)
    dones[-1] = 1
    group.create_dataset("dones", data=dones)
    for cam, images in record.images.items():
        group.create_dataset(layout.cameras[cam], data=images, chunks=(min(T, 16),) + images.shape[1:],
                             **IMAGE_COMPRESSION)
    start = 0
    for key, width in layout.proprio:
        group.create_dataset(key, data=record.proprio[:, start:start + width])
        start += width
    if record.success_score is not None:
        group.create_dataset("success_score", data=record.success_score)
        group.attrs["success_score"] = float(record.success_score.max())
    group.attrs["num_samples"] = T
    group.attrs["success"] = bool(record.success)
    group.attrs["success_step"] = int(record.success_step)
    for key, value in record.attrs.items():
        group.attrs[key] = "" if value is None else value


def _episode_stats(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {"clean": float(attrs["noise_std"]) == 0.0, "success": bool(attrs["success"]),
            "steps": int(attrs["num_samples"]), "seconds": float(attrs.get("seconds", 0.0))}


class Storage:
    """Where a collection's episodes go, per ``--format`` (:data:`STORAGE`). Subclasses name the paths and
    implement ``done(task, i)``, ``finish(task, episodes)`` (once all of a task's episodes are on disk),
    ``stats(task, episodes)`` (per-episode statistics, bytes, path), ``targets(task)`` / ``remove(task)``
    (what ``--overwrite`` deletes) and ``stale(task)`` (an interrupted run's temporary files).

    Attributes:
        simulator_attr: the root attribute naming the simulator (``sim``, or robomimic's ``env``).
    """

    simulator_attr = "sim"

    def __init__(self, output: Path):
        self.output = output

    def episode_path(self, task: str, i: int) -> Path:
        """Where episode ``i`` of ``task`` is written (atomically)."""
        raise NotImplementedError

    def episode_group(self, f, record: EpisodeRecord, env_args: str):
        """The h5py group of the open episode file ``f`` that receives ``record``."""
        raise NotImplementedError

    def write(self, path: Path, record: EpisodeRecord, layout: EpisodeLayout, file_attrs: Mapping[str, Any],
              env_args: str) -> None:
        """Write one episode to ``path`` (temporary name, then renamed): its arrays and attributes
        (:func:`write_episode`), ``file_attrs`` at the root (``simulator`` as :attr:`simulator_attr`)."""
        import h5py

        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            write_episode(self.episode_group(f, record, env_args), record, layout)
            for key, value in file_attrs.items():
                f.attrs[self.simulator_attr if key == "simulator" else key] = value


class EpisodeFiles(Storage):
    """``episode_hdf5`` storage: ``<output>/<task>/episode_<i>.hdf5``, final as soon as written."""

    def task_dir(self, task: str) -> Path:
        """The folder of ``task``'s episode files."""
        return self.output / task

    def episode_path(self, task: str, i: int) -> Path:
        return self.task_dir(task) / f"episode_{i}.hdf5"

    def episode_group(self, f, record: EpisodeRecord, env_args: str):
        return f

    def done(self, task: str, i: int) -> bool:
        """Whether episode ``i`` of ``task`` is on disk."""
        return self.episode_path(task, i).exists()

    def finish(self, task: str, episodes: int) -> None:
        """Nothing to join: every episode file is final."""

    def stats(self, task: str, episodes: int) -> tuple[list[dict[str, Any]], int, str]:
        """Per-episode statistics read from the files, their bytes, and the task's folder."""
        import h5py

        out, size = [], 0
        for i in range(episodes):
            path = self.episode_path(task, i)
            with h5py.File(path, "r") as f:
                out.append(_episode_stats(f.attrs))
            size += path.stat().st_size
        return out, size, str(self.task_dir(task))

    def targets(self, task: str) -> list[Path]:
        """What this storage writes for ``task`` (removed by ``--overwrite``)."""
        d = self.task_dir(task)
        return [*sorted(d.glob("episode_*.hdf5")), *self.stale(task)] if d.is_dir() else []

    def stale(self, task: str) -> list[Path]:
        """Temporary files an interrupted run left behind."""
        d = self.task_dir(task)
        return sorted(d.glob(".episode_*.tmp")) if d.is_dir() else []

    def remove(self, task: str) -> None:
        """Delete ``task``'s episode files (and its folder once empty)."""
        for p in self.targets(task):
            p.unlink(missing_ok=True)
        if self.task_dir(task).is_dir() and not any(self.task_dir(task).iterdir()):
            self.task_dir(task).rmdir()


class RobomimicFiles(Storage):
    """``robomimic`` storage: one ``<output>/<task>.hdf5``, joined from per-episode parts once complete."""

    simulator_attr = "env"

    def task_path(self, task: str) -> Path:
        """The joined file of ``task``."""
        return self.output / f"{task}.hdf5"

    def parts_dir(self, task: str) -> Path:
        """The folder of ``task``'s parts (removed once they are joined)."""
        return self.output / ".parts" / task

    def episode_path(self, task: str, i: int) -> Path:
        # ".part": no reader picks a part up as a source file
        return self.parts_dir(task) / f"demo_{i}.hdf5.part"

    def episode_group(self, f, record: EpisodeRecord, env_args: str):
        data = f.create_group("data")
        data.attrs["env_args"] = env_args
        return data.create_group(f"demo_{record.attrs['initial_state']}")

    def done(self, task: str, i: int) -> bool:
        """Whether episode ``i`` of ``task`` is on disk (joined or as a part)."""
        return self.task_path(task).exists() or self.episode_path(task, i).exists()

    def finish(self, task: str, episodes: int) -> None:
        """Join the parts of a complete task into ``<task>.hdf5`` (atomically), then delete them."""
        import h5py

        path = self.task_path(task)
        if path.exists():
            return
        total = successes = 0
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
            data = out.create_group("data")
            for i in range(episodes):
                with h5py.File(self.episode_path(task, i), "r") as part:
                    if i == 0:
                        out.attrs.update(part.attrs)
                        data.attrs["env_args"] = part["data"].attrs["env_args"]
                    part.copy(part[f"data/demo_{i}"], data, f"demo_{i}")
                demo = data[f"demo_{i}"]
                total += int(demo.attrs["num_samples"])
                successes += int(bool(demo.attrs["success"]))
            data.attrs["total"] = total
            out.attrs["episodes"] = episodes
            out.attrs["successes"] = successes
        shutil.rmtree(self.parts_dir(task))
        if not any(self.parts_dir(task).parent.iterdir()):
            self.parts_dir(task).parent.rmdir()

    def stats(self, task: str, episodes: int) -> tuple[list[dict[str, Any]], int, str]:
        """Per-episode statistics read from the joined file, its bytes, and its path."""
        import h5py

        path = self.task_path(task)
        with h5py.File(path, "r") as f:
            out = [_episode_stats(f[f"data/demo_{i}"].attrs) for i in range(episodes)]
        return out, path.stat().st_size, str(path)

    def targets(self, task: str) -> list[Path]:
        """The joined file and the parts folder of ``task``, where present."""
        path = self.task_path(task)
        return ([path] if path.exists() else []) + ([self.parts_dir(task)] if self.parts_dir(task).exists() else [])

    def stale(self, task: str) -> list[Path]:
        """Temporary files an interrupted run left behind (of a part or of the joined file)."""
        d = self.parts_dir(task)
        return sorted(self.output.glob(f".{task}.hdf5.*.tmp")) + (sorted(d.glob(".demo_*.tmp")) if d.is_dir() else [])

    def remove(self, task: str) -> None:
        """Delete ``task``'s joined file and parts."""
        self.task_path(task).unlink(missing_ok=True)
        if self.parts_dir(task).exists():
            shutil.rmtree(self.parts_dir(task))


#: ``--format`` -> storage class.
STORAGE: dict[str, type[Storage]] = {"episode_hdf5": EpisodeFiles, "robomimic": RobomimicFiles}


# ---------------------------------------------------------------------------------------- collector
@dataclass(frozen=True)
class CollectSettings:
    """Everything a (worker) process needs to collect any episode of a collection (picklable)."""

    simulator: str
    adapter: str              # "module:Class", so a worker finds simulators registered at run time
    embodiment: str
    output: str
    format: str
    seed: int
    max_steps: int
    noise_std: float
    noise_theta: float
    clean_episodes: int
    stop_after_success: int | None
    file_attrs: dict[str, Any]


class EpisodeCollector:
    """Collects single episodes of a collection; keeps one env per task (built on first use).

    Args:
        settings: the collection's :class:`CollectSettings`.

    Raises:
        CosmosPolicyError: the embodiment's keys do not fit the simulator's proprio (see :class:`EpisodeLayout`).
    """

    def __init__(self, settings: CollectSettings):
        SIMULATORS.setdefault(settings.simulator, settings.adapter)
        self.settings = settings
        self.cls = simulator_class(settings.simulator)
        self.embodiment = load_embodiment(settings.embodiment)
        self.layout = EpisodeLayout.for_format(settings.format, self.embodiment, getattr(self.cls, "proprio_parts", None))
        self.storage = STORAGE[settings.format](Path(settings.output))
        self.envs: dict[str, SimEnv] = {}

    def env(self, task: str) -> SimEnv:
        """The env of ``task`` (rendering the embodiment's cameras).

        Raises:
            CosmosPolicyError: no ``--max_steps``, no ``collect_max_steps`` and a simulator whose ``create``
                does not cap the limit (the protocol asks it to): episodes would never end.
        """
        if task not in self.envs:
            s = self.settings
            env = self.cls.create(task, self.embodiment, seed=s.seed, max_steps=s.max_steps, render=True)
            if env.max_steps >= NO_LIMIT:
                env.close()
                raise CosmosPolicyError(f"collect {s.simulator}: the simulator caps no episode limit of its own "
                                        f"(create(max_steps={NO_LIMIT}) kept it); pass --max_steps")
            self.envs[task] = env
        return self.envs[task]

    def collect(self, task: str, i: int) -> dict[str, Any]:
        """Record episode ``i`` of ``task`` and write it (clean when ``i < clean_episodes`` or ``noise_std == 0``).

        Returns:
            ``{"task", "episode", "success", "steps"}``.

        Raises:
            CosmosPolicyError: the env has no expert, or the simulator refuses an action.
        """
        s = self.settings
        started = time.perf_counter()
        env = self.env(task)
        clean = i < s.clean_episodes or s.noise_std == 0
        noise = None if clean else CorrelatedActionNoise.for_bounds(env.action_bounds, s.noise_std, s.noise_theta,
                                                                    noise_rng(s.seed, task, i))
        record = run_episode(env, i, noise, s.stop_after_success)
        record.attrs.update(instruction=env.instruction, task_description=env.instruction, task=task, seed=s.seed,
                            initial_state=i, noise_std=0.0 if clean else s.noise_std, noise_theta=s.noise_theta,
                            seconds=round(time.perf_counter() - started, 3))
        env_args = json.dumps({"env_name": task, "type": s.simulator,
                               "env_kwargs": {"seed": s.seed, "max_steps": env.max_steps,
                                              "image_size": list(self.embodiment.image_size),
                                              "cameras": dict(env.cameras)}})
        file_attrs = {**s.file_attrs, "instruction": env.instruction, "task": task}
        self.storage.write(self.storage.episode_path(task, i), record, self.layout, file_attrs, env_args)
        return {"task": task, "episode": i, "success": record.success, "steps": record.length}

    def close(self) -> None:
        """Close every env (idempotent)."""
        for env in self.envs.values():
            env.close()
        self.envs.clear()


_WORKER: EpisodeCollector | None = None


def _init_worker(settings: CollectSettings) -> None:
    global _WORKER
    from multiprocessing.util import Finalize

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = EpisodeCollector(settings)
    Finalize(_WORKER, _WORKER.close, exitpriority=10)  # worker processes leave through os._exit: no atexit


def _work(task: str, i: int) -> dict[str, Any]:
    return _WORKER.collect(task, i)


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cosmos-policy-lightning", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _task_list(tasks: list[str] | str | None, default: str, what: str) -> list[str]:
    if tasks is None:
        return [default]
    task_list = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not task_list:
        raise CosmosPolicyError(f"{what}: --tasks is empty")
    if len(set(task_list)) != len(task_list):
        raise CosmosPolicyError(f"{what}: duplicate tasks in --tasks {task_list}")
    return task_list


def _resume_or_refuse(output: Path, arguments: dict[str, Any], storages: list, tasks: list[str], overwrite: bool,
                      what: str) -> None:
    """Check ``output`` against ``arguments``: resume (same arguments), clear it (``overwrite``) or refuse."""
    record_path = output / COLLECTION_JSON
    recorded = None
    if record_path.exists():
        try:
            recorded = json.loads(record_path.read_text())["arguments"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
    if overwrite:
        old_tasks = recorded.get("tasks", []) if isinstance(recorded, dict) else []
        for storage in storages:
            for task in dict.fromkeys([*tasks, *old_tasks]):
                storage.remove(task)
        record_path.unlink(missing_ok=True)
        return
    if isinstance(recorded, dict):
        differ = [k for k in arguments if recorded.get(k) != arguments[k]]
        if differ:
            changes = ", ".join(f"{k} {recorded.get(k)!r} -> {arguments[k]!r}" for k in differ)
            raise CosmosPolicyError(f"{what}: {output} holds a collection made with other arguments ({changes}); "
                                    f"pass --overwrite true to replace it, or choose another --output")
        return
    existing = [p for storage in storages for t in tasks for p in storage.targets(t)]
    if existing or record_path.exists():
        raise CosmosPolicyError(f"{what}: {existing[0] if existing else record_path} exists and {record_path} does "
                                f"not record its arguments (pass --overwrite true to replace it)")


def collect(
    simulator: str,
    *,
    tasks: list[str] | str | None = None,
    episodes: int = 10,
    output: Path | None = None,
    noise_std: float = 0.0,
    noise_theta: float = 0.1,
    clean_episodes: int = 0,
    seed: int = 0,
    workers: int = 1,
    max_steps: int | None = None,
    stop_after_success: int | None = 8,
    embodiment: Path | None = None,
    format: Literal["episode_hdf5", "robomimic"] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Record expert episodes (successes and failures) in a simulator as HDF5 files, resumably and in parallel.

    Every episode is saved, successful or not; its ``success`` attribute marks it. Prints a summary table
    (clean / noisy successes, steps, steps/s, MB per task) and writes it to ``<output>/collection.json``.

    Args:
        simulator: registered simulator (``sim/env.py`` ``SIMULATORS``), e.g. ``metaworld``.
        tasks: the simulator's task names, e.g. ``[drawer-open-v3,reach-v3]`` (a comma-separated string
            also works); default: the simulator's ``default_task``.
        episodes: episodes per task (>= 1); episode ``i`` starts from the env's initial state ``i`` of ``seed``.
        output: output directory; default ``data/<simulator>``.
        noise_std: std of the correlated action noise as a fraction of each action dimension's half range
            ``(high - low) / 2`` of the env's ``action_bounds`` (Meta-World's [-1, 1]: in action units);
            0 records the clean expert only. Meta-World: 0.3 makes the expert fail often on push / drawer-open.
        noise_theta: mean reversion per step of the Ornstein-Uhlenbeck noise in (0, 1]; 1 = i.i.d.,
            0.1 = drifts lasting about 10 steps (experts correct i.i.d. noise and rarely fail).
        clean_episodes: how many of the ``episodes`` (the first ones) run without noise, in [0, episodes].
        seed: seeds the initial states and the noise; the same seed gives the same files.
        workers: processes collecting episodes in parallel ('spawn'; episodes of one task are shared out too).
        max_steps: episode time limit in steps (>= 1); an episode without success by then is a failure.
            Default: the adapter's ``collect_max_steps`` (Meta-World: 150), else the simulator's own limit.
        stop_after_success: steps recorded after the first success (>= 0; null = continue to max_steps).
        embodiment: embodiment YAML whose cameras and image size are rendered and whose keys name the
            datasets; default: the simulator's ``default_embodiment``.
        format: ``episode_hdf5`` (one file per episode) or ``robomimic`` (one file per task); default: the
            adapter's ``collect_format`` (Meta-World: robomimic), else episode_hdf5.
        overwrite: delete a previous collection in ``output`` (its recorded tasks and these) and start again.

    Returns:
        the summary written to ``collection.json``: ``arguments``, ``tasks`` (per task: path, clean,
        clean_success, noisy, noisy_success, steps, seconds, bytes), ``elapsed_s``, ``complete``.

    Raises:
        CosmosPolicyError: unknown simulator or task, bad numbers, an output holding a collection with
            other arguments (or files without a record) and no ``overwrite``, a simulator without an expert.
    """
    what = f"collect {simulator}"
    cls = simulator_class(simulator)
    task_list = _task_list(tasks, cls.default_task, what)
    if episodes < 1:
        raise CosmosPolicyError(f"{what}: --episodes must be >= 1, got {episodes}")
    if not 0 <= clean_episodes <= episodes:
        raise CosmosPolicyError(f"{what}: --clean_episodes must be in [0, {episodes}], got {clean_episodes}")
    if not noise_std >= 0:
        raise CosmosPolicyError(f"{what}: --noise_std must be >= 0, got {noise_std}")
    if not 0 < noise_theta <= 1:
        raise CosmosPolicyError(f"{what}: --noise_theta must be in (0, 1], got {noise_theta}")
    if max_steps is not None and max_steps < 1:
        raise CosmosPolicyError(f"{what}: --max_steps must be >= 1 or null, got {max_steps}")
    if stop_after_success is not None and stop_after_success < 0:
        raise CosmosPolicyError(f"{what}: --stop_after_success must be >= 0 or null, got {stop_after_success}")
    if workers < 1:
        raise CosmosPolicyError(f"{what}: --workers must be >= 1, got {workers}")
    fmt = format or getattr(cls, "collect_format", "episode_hdf5")
    if fmt not in STORAGE:
        raise CosmosPolicyError(f"{what}: --format must be one of {', '.join(STORAGE)}, got {fmt!r}")
    for task in task_list:
        cls.check_task(task)  # also picks the renderer (e.g. MUJOCO_GL), exported to the workers
    embodiment = str(embodiment if embodiment is not None else cls.default_embodiment)
    emb = load_embodiment(embodiment)
    EpisodeLayout.for_format(fmt, emb, getattr(cls, "proprio_parts", None))  # refused before any file is written
    output = ensure_writable_dir(Path(output) if output is not None else Path("data") / simulator, "--output")
    arguments = dict(simulator=simulator, tasks=task_list, episodes=episodes, noise_std=noise_std,
                     noise_theta=noise_theta, clean_episodes=clean_episodes, seed=seed, max_steps=max_steps,
                     stop_after_success=stop_after_success, embodiment=embodiment, format=fmt)
    settings = CollectSettings(
        simulator=simulator, adapter=SIMULATORS[simulator], embodiment=embodiment, output=str(output),
        format=fmt, seed=seed, max_steps=max_steps or getattr(cls, "collect_max_steps", None) or NO_LIMIT,
        noise_std=float(noise_std), noise_theta=float(noise_theta), clean_episodes=clean_episodes,
        stop_after_success=stop_after_success,
        file_attrs=dict(simulator=simulator, command=shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
                        arguments=json.dumps(arguments, default=str), seed=seed, image_size=list(emb.image_size),
                        embodiment=emb.name, versions=json.dumps(_versions(tuple(getattr(cls, "packages", ()))))))
    from ..locking import folder_lock

    with folder_lock(output, "collection"):
        collector = EpisodeCollector(settings)
        storage = collector.storage
        _resume_or_refuse(output, arguments, [s(output) for s in STORAGE.values()], task_list, overwrite, what)
        for task in task_list:
            for p in storage.stale(task):  # an interrupted run's temporary files (the lock says it is gone)
                p.unlink(missing_ok=True)
        write_json_atomic(output / COLLECTION_JSON, {"arguments": arguments, "complete": False})
        jobs = [(t, i) for t in task_list for i in range(episodes) if not storage.done(t, i)]
        started = time.perf_counter()
        try:
            _run_jobs(collector, settings, jobs, workers, len(task_list) * episodes, what)
        finally:
            collector.close()
        for task in task_list:
            storage.finish(task, episodes)
        summary = _summary(storage, task_list, episodes, arguments, time.perf_counter() - started)
        write_json_atomic(output / COLLECTION_JSON, summary)
    _print_summary(summary, what)
    return summary


def _run_jobs(collector: EpisodeCollector, settings: CollectSettings, jobs: list[tuple[str, int]], workers: int,
              total: int, what: str) -> None:
    """Collect ``jobs`` (``(task, episode)``) here or in ``workers`` 'spawn' processes (no GL or MuJoCo state
    is inherited); the parent's progress bar moves once per finished episode."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=total - len(jobs), unit="episode", desc=what, dynamic_ncols=True)
    steps = 0

    def advance(result: dict[str, Any]) -> None:
        nonlocal steps
        steps += result["steps"]
        bar.update(1)
        bar.set_postfix(task=result["task"], steps=steps, refresh=False)

    try:
        if workers == 1 or len(jobs) <= 1:
            for task, i in jobs:
                advance(collector.collect(task, i))
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(settings,)) as pool:
            futures = [pool.submit(_work, task, i) for task, i in jobs]
            try:
                for future in as_completed(futures):
                    advance(future.result())
            except BaseException:  # the first failure (or ^C): drop the queued episodes, let running ones finish
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()


def _summary(storage, tasks: list[str], episodes: int, arguments: dict[str, Any], elapsed: float) -> dict[str, Any]:
    per_task = {}
    for task in tasks:
        stats, size, path = storage.stats(task, episodes)
        row = {"path": path, "episodes": episodes, "steps": sum(s["steps"] for s in stats),
               "seconds": round(sum(s["seconds"] for s in stats), 3), "bytes": size}
        for kind, is_clean in (("clean", True), ("noisy", False)):
            row[kind] = sum(s["clean"] == is_clean for s in stats)
            row[f"{kind}_success"] = sum(s["success"] for s in stats if s["clean"] == is_clean)
        per_task[task] = row
    return {"arguments": arguments, "complete": True, "elapsed_s": round(elapsed, 3), "tasks": per_task}


def _print_summary(summary: dict[str, Any], what: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{what} ({summary['elapsed_s']:.0f} s)")
    for col in ("task", "clean ok", "noisy ok", "steps", "steps/s", "MB", "path"):
        table.add_column(col, justify="left" if col in ("task", "path") else "right")
    for task, s in summary["tasks"].items():
        table.add_row(task, f"{s['clean_success']}/{s['clean']}", f"{s['noisy_success']}/{s['noisy']}",
                      str(s["steps"]), f"{s['steps'] / max(s['seconds'], 1e-9):.1f}", f"{s['bytes'] / 2**20:.2f}",
                      s["path"])
    Console(stderr=True, width=140).print(table)


def collect_metaworld(**options: Any) -> dict[str, Any]:
    """``collect("metaworld", **options)``: Meta-World's scripted experts into one robomimic file per task
    (the adapter's ``collect_format``), 150-step episodes by default (``collect_max_steps``); see :func:`collect`."""
    return collect("metaworld", **options)


__all__ = ["COLLECTION_JSON", "FORMATS", "STORAGE", "Storage", "CollectSettings", "EpisodeCollector", "EpisodeLayout",
           "EpisodeRecord", "collect", "collect_metaworld", "run_episode", "write_episode"]
