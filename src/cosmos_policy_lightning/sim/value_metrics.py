"""How well the predicted value tells success from failure in closed loop, the way planning uses it.

Best-of-N planning (docs/planning.md) compares values *during* an episode, so the question is whether the
value predicted in the first part of an episode already separates the episodes that will succeed from
those that will fail. For every task separately (pooling tasks mixes their value scales and base
rates), and for each horizon ``h`` (a fraction of the step limit), an episode's score is the mean of the
values predicted at steps ``< h * max_steps``; the AUROC of that score against the outcome is the
probability that a random success scores above a random failure (0.5 = chance, 1 = perfect; Hanley and
McNeil, 1982). It is undefined (None) when a task has no success or no failure.

Two more views of the same recorded values (docs/planning.md):

- **calibration**: each value predicted at step ``t`` of an episode of ``T`` steps is compared with the
  return that episode actually obtained from there, ``gamma^(T-1-t)`` for a success (it ends at its success
  step) and 0 for a failure: the target the value head is trained on (docs/method.md §4, ``data/returns.py``)
  with the closed-loop outcome. Reliability curve and ECE: ``value_calibration.py``.
- **ranking** (time-matched): what planning needs is that, *at the same moment of an episode*, a chunk whose
  episode is going to succeed gets a higher value than one whose episode is going to fail. For every pair of
  a successful and a failed episode of one task and every chunk index ``c`` that both reached, the pair is
  ranked right when the success's ``c``-th value is the higher (ties count half). Matching by chunk index
  removes what the mean-value AUROC can reward by accident: a value that only tracks time into the episode.
  With planning, the values are those of the chosen proposals, so this is how often the planner's chosen
  value ranks the executed outcomes right.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..data.returns import episode_values
from ..errors import CosmosPolicyError
from ..value_calibration import ReliabilityCurve, reliability_curve

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
    out: dict[str, dict[str, Any]] = {}
    for task, eps in _by_task(episodes).items():
        scores: dict[str, float | None] = {}
        for h in horizons:
            pairs = [(early_value(ep.get("values") or [], h * max_steps), bool(ep["success"])) for ep in eps]
            pairs = [(s, y) for s, y in pairs if s is not None]
            scores[f"{round(100 * h)}%"] = auroc([s for s, _ in pairs], [y for _, y in pairs]) if pairs else None
        out[task] = {"episodes": len(eps), "successes": sum(bool(e["success"]) for e in eps), "auroc": scores}
    return out


def _by_task(episodes: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for ep in episodes:
        by_task.setdefault(str(ep["task"]), []).append(ep)
    return by_task


def realised_returns(episode: Mapping[str, Any], gamma: float) -> list[tuple[float, float]]:
    """``(predicted, realised return)`` for every value the episode recorded (module docstring).

    Args:
        episode: ``{"success", "length", "values": [[step, value in [0, 1]], ...]}`` (``results.json``).
        gamma: the embodiment's discount in (0, 1].

    Returns:
        one pair per recorded value, both in [0, 1].

    Raises:
        CosmosPolicyError: a recorded step outside ``[0, length)``.
    """
    length = int(episode["length"])
    values = episode.get("values") or []
    if not values:
        return []
    curve = (episode_values(max(length, 1), 1.0 if episode["success"] else 0.0, gamma) + 1.0) / 2.0
    out = []
    for step, v in values:
        if not 0 <= int(step) < max(length, 1):
            raise CosmosPolicyError(f"episode {episode.get('episode')}: value recorded at step {step} outside "
                                    f"an episode of {length} steps")
        out.append((float(v), float(curve[int(step)])))
    return out


def closed_loop_calibration(episodes: Sequence[Mapping[str, Any]], gamma: float,
                            num_bins: int = 10) -> dict[str, ReliabilityCurve | None]:
    """Per task, the reliability curve of the recorded values against the realised returns.

    Args:
        episodes: ``results.json`` episode records (``task``, ``success``, ``length``, ``values``).
        gamma: discount in (0, 1] (the embodiment's ``value.gamma``).
        num_bins: equal-width bins over [0, 1].

    Returns:
        ``{task: curve}`` (None for a task without recorded values).
    """
    out: dict[str, ReliabilityCurve | None] = {}
    for task, eps in _by_task(episodes).items():
        pairs = [pair for ep in eps for pair in realised_returns(ep, gamma)]
        out[task] = reliability_curve([p for p, _ in pairs], [g for _, g in pairs], num_bins)
    return out


def ranking_accuracy(episodes: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the time-matched ranking accuracy of the recorded values (module docstring).

    Args:
        episodes: ``results.json`` episode records (``task``, ``success``, ``values``).

    Returns:
        ``{task: {"accuracy": float in [0, 1] or None, "pairs": int}}``: ``accuracy`` is the share of
        (success, failure, chunk index) comparisons ranked right, None when the task has no success, no
        failure or no chunk index reached by both; 0.5 is chance.
    """
    out: dict[str, dict[str, Any]] = {}
    for task, eps in _by_task(episodes).items():
        wins, pairs = 0.0, 0
        good = [[float(v) for _, v in (e.get("values") or [])] for e in eps if e["success"]]
        bad = [[float(v) for _, v in (e.get("values") or [])] for e in eps if not e["success"]]
        for s in good:
            for f in bad:
                for vs, vf in zip(s, f):  # chunk indices both episodes reached
                    wins += 1.0 if vs > vf else 0.5 if vs == vf else 0.0
                    pairs += 1
        out[task] = {"accuracy": wins / pairs if pairs else None, "pairs": pairs}
    return out


__all__ = ["HORIZONS", "auroc", "closed_loop_calibration", "closed_loop_value_auroc", "early_value",
           "ranking_accuracy", "realised_returns"]
