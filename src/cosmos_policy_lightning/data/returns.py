"""Monte-Carlo values of an episode, rescaled to [-1, 1] (docs/method.md §4).

The reward is sparse: ``R`` at the last step of an episode, 0 elsewhere, so the discounted return at
step ``t`` of an episode of ``T`` steps is ``G_t = R * gamma^(T-1-t)``. The value stored with a sample
is that return mapped from [0, 1] to [-1, 1]::

    V_t = 2 * R * gamma^(T-1-t) - 1

- full success (``R = 1``): ``2 gamma^(T-1-t) - 1``, exactly +1 at the last step (the reference's
  ``2 G_t / R - 1``);
- failure (``R = 0``): -1 at every step;
- fractional score (``0 < R < 1``): the success curve scaled by ``R`` *before* the shift, so a half
  success ends at 0 and a 0.8 success at 0.6. (The reference maps every positive score to the full
  success curve; docs/method.md §4 names that a defect.)

Decoding a predicted value back to [0, 1] is ``(V + 1) / 2`` (docs/method.md §1), which recovers ``G_t``.
"""

from __future__ import annotations

import numpy as np


def episode_values(length: int, score: float, gamma: float) -> np.ndarray:
    """Value of every step of an episode, in [-1, 1].

    Args:
        length: number of steps ``T`` (>= 1).
        score: episode reward ``R`` in [0, 1] (1 = success, 0 = failure, between = partial success).
        gamma: discount in (0, 1].

    Returns:
        ``(T,)`` float32 array, ``V_t = 2 R gamma^(T-1-t) - 1``.

    Raises:
        ValueError: ``length < 1``, ``score`` outside [0, 1] or ``gamma`` outside (0, 1].
    """
    if length < 1:
        raise ValueError(f"episode_values: length must be >= 1, got {length}")
    if not (0.0 <= score <= 1.0):
        raise ValueError(f"episode_values: score must be in [0, 1], got {score}")
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"episode_values: gamma must be in (0, 1], got {gamma}")
    steps_to_end = np.arange(length - 1, -1, -1, dtype=np.float64)  # T-1-t for t = 0..T-1
    returns = score * np.power(gamma, steps_to_end)
    return (2.0 * returns - 1.0).astype(np.float32)


def future_index(step: int, chunk_size: int, length: int) -> int:
    """Index of the future state ``s'`` of the sample at ``step``: ``min(step + K, T - 1)`` (docs/method.md §1)."""
    return min(step + chunk_size, length - 1)


def action_chunk(actions: np.ndarray, step: int, chunk_size: int) -> np.ndarray:
    """``actions[step : step + K]`` padded to K rows by repeating the episode's last action (docs/method.md §1).

    Args:
        actions: ``(T, action_dim)`` array of one episode.
        step: first step of the chunk, ``0 <= step < T``.
        chunk_size: K.

    Returns:
        ``(K, action_dim)`` array of the same dtype.
    """
    chunk = actions[step: step + chunk_size]
    missing = chunk_size - chunk.shape[0]
    if missing > 0:
        chunk = np.concatenate([chunk, np.repeat(actions[-1:], missing, axis=0)], axis=0)
    return chunk
