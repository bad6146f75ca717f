"""Ensemble members of planning (paper §3 and §5: future-state and value ensembles).

The reference makes its ensembles diverse in two ways: member ``i`` gets its own seed (``seed + i``)
and its own number of denoising steps, spread evenly from 1 to the stage's step count:
``linspace(1, steps, n)`` truncated to integers, e.g. ``[1, 3, 5]`` for 3 future states at 5 steps
and ``[1, 2, 3, 4, 5]`` for 5 values. ``equal`` gives every member the stage's step count.

Members that share a step count are sampled in one batched call (:func:`group_members`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import CosmosPolicyError

EnsembleSteps = Literal["linspace", "equal"]
ENSEMBLE_STEPS = ("linspace", "equal")

#: How a proposal's ``F x V`` ensemble values become one score (``inference/planning.py`` ``aggregate``).
Aggregation = Literal["majority_mean", "mean", "lcb"]
AGGREGATIONS = ("majority_mean", "mean", "lcb")


def member_steps(steps: int, members: int, mode: EnsembleSteps = "linspace") -> list[int]:
    """Denoising steps of each of ``members`` ensemble members.

    Args:
        steps: the stage's step count (>= 1).
        members: ensemble size n (>= 1).
        mode: ``linspace`` (the reference: ``linspace(1, steps, n)``, truncated as numpy's
            ``astype(int)`` does) or ``equal`` (``steps`` each). A single member always gets ``steps``:
            an ensemble of one is the stage's ordinary prediction.

    Returns:
        n step counts, each in ``[1, steps]``, non-decreasing.

    Raises:
        CosmosPolicyError: non-positive sizes or an unknown mode.
    """
    if steps < 1 or members < 1:
        raise CosmosPolicyError(f"ensemble: steps and members must be >= 1, got {steps}, {members}")
    if mode not in ENSEMBLE_STEPS:
        raise CosmosPolicyError(f"ensemble: unknown step mode {mode!r}; expected one of {', '.join(ENSEMBLE_STEPS)}")
    if mode == "equal" or members == 1:
        return [int(steps)] * members
    return np.linspace(1, steps, members).astype(int).tolist()


def member_seeds(seed: int | None, members: int) -> list[int] | None:
    """``seed + i`` for member i (the reference), or None (torch's global RNG) when ``seed`` is None."""
    return None if seed is None else [int(seed) + i for i in range(members)]


def group_members(steps: list[int]) -> dict[int, list[int]]:
    """Member indices by step count, in increasing step count (one batched sampling call each)."""
    groups: dict[int, list[int]] = {}
    for member, count in enumerate(steps):
        groups.setdefault(count, []).append(member)
    return dict(sorted(groups.items()))
