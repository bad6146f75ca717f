"""How well the predicted value tells success from failure in closed loop, the way planning uses it.

Best-of-N planning (docs/planning.md) compares values *during* an episode, so the question is whether the
value predicted in the first part of an episode already separates the episodes that will succeed from
those that will fail. For every task separately (pooling tasks mixes their value scales and base
rates), and for each horizon ``h`` (a fraction of the step limit), an episode's score is the mean of the
values predicted at steps ``< h * max_steps``; the AUROC of that score against the outcome is the
probability that a random success scores above a random failure (0.5 = chance, 1 = perfect; Hanley and
McNeil, 1982). It is undefined (None) when a task has no success or no failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import CosmosPolicyError

#: Horizons as fractions of the step limit: early (25 %), half way (50 %) and the whole episode.
HORIZONS = (0.25, 0.5, 1.0)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive class ``labels == True`` (torchmetrics'
    ``binary_auroc``); None when only one class is present.

    Raises:
        CosmosPolicyError: different lengths or non-finite scores.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise CosmosPolicyError(f"auroc: scores and labels must be two 1-d sequences of one length, "
                                f"got shapes {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise CosmosPolicyError("auroc: scores must be finite")
    if y.all() or not y.any():
        return None
    import torch
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.from_numpy(s), torch.from_numpy(y.astype(np.int64))))


def early_value(values: Iterable[Sequence[float]], until_step: float) -> float | None:
    """Mean predicted value over the ``(step, value)`` pairs with ``step < until_step`` (None if none)."""
    picked = [float(v) for step, v in values if step < until_step]
    return float(np.mean(picked)) if picked else None


def closed_loop_value_auroc(episodes: Sequence[Mapping[str, Any]], max_steps: int,
                            horizons: Sequence[float] = HORIZONS) -> dict[str, dict[str, Any]]:
    """Per task, the AUROC of the early value against the outcome at each horizon (module docstring).

    Args:
        episodes: evaluation episodes as ``results.json`` lists them: ``{"task", "success",
            "values": [[step, value in [0, 1]], ...]}``.
        max_steps: the episodes' step limit (horizons are fractions of it).
        horizons: fractions in (0, 1].

    Returns:
        ``{task: {"episodes", "successes", "auroc": {"25%": float | None, ...}}}``; an episode without a
        value before a horizon does not count at that horizon.

    Raises:
        CosmosPolicyError: a horizon outside (0, 1] or ``max_steps < 1``.
    """
    if max_steps < 1 or any(not 0 < h <= 1 for h in horizons):
        raise CosmosPolicyError(f"closed_loop_value_auroc: need max_steps >= 1 and horizons in (0, 1], "
                                f"got {max_steps} and {list(horizons)}")
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for ep in episodes:
        by_task.setdefault(str(ep["task"]), []).append(ep)
    out: dict[str, dict[str, Any]] = {}
    for task, eps in by_task.items():
        scores: dict[str, float | None] = {}
        for h in horizons:
            pairs = [(early_value(ep.get("values") or [], h * max_steps), bool(ep["success"])) for ep in eps]
            pairs = [(s, y) for s, y in pairs if s is not None]
            scores[f"{round(100 * h)}%"] = auroc([s for s, _ in pairs], [y for _, y in pairs]) if pairs else None
        out[task] = {"episodes": len(eps), "successes": sum(bool(e["success"]) for e in eps), "auroc": scores}
    return out


__all__ = ["HORIZONS", "auroc", "closed_loop_value_auroc", "early_value"]
