"""What a closed-loop evaluation leaves behind: rollout HDF5 files, GIF strips, value plots.

Rollout HDF5 (the reference's per-episode rollout layout, docs/method.md §4; read back by
``cosmos-policy convert --format episode_hdf5``)::

    attrs: success (bool), success_score (float in [0, 1]), task_description (str),
           task, episode, seed, policy, checkpoint
    /observations/images/<camera>   (T, H, W, 3) uint8   what the robot saw before action t
    /observations/qpos              (T, P) float32       proprio in robot units
    /action                         (T, A) float32       the executed action
    /rewards                        (T,) float32         1 at the step that succeeded, else 0

Every file is written to a temporary name in the same directory and renamed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_path_atomic


@dataclass
class Rollout:
    """One closed-loop episode.

    Attributes:
        task: task name; episode: initial-state index; instruction: the task instruction.
        images: camera -> list of T ``(H, W, 3)`` uint8 frames (observation before each action).
        proprio: T ``(P,)`` arrays; actions: T ``(A,)`` executed actions.
        success: whether the task succeeded; success_step: step index of the first success (-1: none).
        values: ``(step, value)`` pairs: the predicted value in [0, 1] when a chunk was chosen.
        latencies: seconds per policy call (one per action chunk).
        score: the best partial progress in [0, 1] the env reported (``info["success_score"]``, e.g. ALOHA's
            stages / 4), None for an env that reports none.
    """

    task: str
    episode: int
    instruction: str
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    proprio: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    success: bool = False
    success_step: int = -1
    values: list[tuple[int, float]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    score: float | None = None

    @property
    def length(self) -> int:
        """Number of executed steps T."""
        return len(self.actions)


def write_rollout_hdf5(path: str | Path, rollout: Rollout, attrs: Mapping[str, Any] | None = None) -> Path:
    """Write ``rollout`` in the per-episode rollout layout of the module docstring.

    Args:
        path: destination ``.hdf5``.
        rollout: a rollout with at least one step.
        attrs: extra root attributes (JSON-able scalars / strings).

    Returns:
        ``path``.
    """
    import h5py

    path = Path(path)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["success"] = bool(rollout.success)
            f.attrs["success_score"] = 1.0 if rollout.success else 0.0
            f.attrs["task_description"] = rollout.instruction
            f.attrs["task"] = rollout.task
            f.attrs["episode"] = int(rollout.episode)
            for key, value in (attrs or {}).items():
                f.attrs[key] = "" if value is None else value
            obs = f.create_group("observations")
            images = obs.create_group("images")
            for cam, frames in rollout.images.items():
                images.create_dataset(cam, data=np.stack(frames).astype(np.uint8), compression="gzip",
                                      compression_opts=4, chunks=(1, *frames[0].shape))
            obs.create_dataset("qpos", data=np.stack(rollout.proprio).astype(np.float32))
            f.create_dataset("action", data=np.stack(rollout.actions).astype(np.float32))
            rewards = np.zeros(rollout.length, dtype=np.float32)
            if rollout.success_step >= 0:
                rewards[rollout.success_step] = 1.0
            f.create_dataset("rewards", data=rewards)

    write_path_atomic(path, write)
    return path


def save_gif(path: str | Path, rollout: Rollout, scale: int = 3, frame_ms: int = 40, every: int = 1) -> Path:
    """Animated GIF of the rollout: all cameras side by side per step, upscaled ``scale`` times
    (nearest neighbour: small model images stay crisp), a green / red bar at the bottom once the
    episode ends in success / failure.

    Returns:
        ``path``.
    """
    from PIL import Image

    path = Path(path)
    cams = list(rollout.images)
    frames = []
    n = rollout.length
    for t in range(0, n, every):
        row = np.concatenate([rollout.images[c][t] for c in cams], axis=1)
        if t + every >= n:  # last frame: outcome bar
            row = row.copy()
            row[-3:] = (40, 200, 40) if rollout.success else (220, 40, 40)
        frames.append(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST))
    write_path_atomic(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                              duration=frame_ms, loop=0))
    return path


def plot_values(path: str | Path, rollouts: Sequence[Rollout], title: str) -> Path:
    """Predicted value (y, [0, 1]) against the episode step (x), one line per episode, green for
    successes and red for failures.

    Returns:
        ``path`` (PNG).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for r in rollouts:
        if not r.values:
            continue
        steps, values = zip(*r.values)
        ax.plot(steps, values, marker=".", color="tab:green" if r.success else "tab:red", alpha=0.7,
                label=f"ep {r.episode} ({'success' if r.success else 'failure'})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("episode step")
    ax.set_ylabel("predicted value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(rollouts) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(path, fig)


def save_figure(path: str | Path, fig) -> Path:
    """Write a matplotlib figure as PNG (write-then-rename) and close it.

    Returns:
        ``path``.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        write_path_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
