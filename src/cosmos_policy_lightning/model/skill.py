"""Did the policy learn? Sampled-prediction errors next to the trivial baselines, and a skill score.

A falling training loss says little about a diffusion policy: its *sampled* action chunks can still be
no better than a constant. ``cosmos-policy test`` therefore scores every sampled prediction against
the obvious baseline on the same held-out samples:

* action chunk (successful episodes): the **training-set mean action** (the statistics' mean of the
  successful episodes, the ones the policy is trained on), repeated over the chunk;
* future proprio: **copying the current proprio** (no motion).

``skill = 1 - MAE(model) / MAE(baseline)``: 0 = no better than the baseline, 1 = perfect, < 0 =
worse (the usual skill score of forecast verification). Per dimension it does not depend on the
units; the overall skill is computed from the per-dimension MAEs averaged in the normalised [-1, 1]
space of training (every dimension weighs the same: a gripper command of +-1 does not drown a 1 cm
hand offset), and in robot units as ``..._robot_units``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics import MeanMetric

#: (units suffix, whether the values are normalised): robot units carry no suffix (the historic names).
UNITS = (("", False), ("_normalized", True))


class ErrorTable(nn.Module):
    """Mean absolute error per dimension of several predictors, synced over ranks (torchmetrics).

    Args:
        predictors: names, e.g. ``["model", "baseline"]``.
        dim: vector dimension D.
    """

    def __init__(self, predictors: list[str], dim: int):
        super().__init__()
        self.dim = int(dim)
        self.metrics = nn.ModuleDict({p: nn.ModuleList([MeanMetric() for _ in range(dim)]) for p in predictors})

    def update(self, predictor: str, error: torch.Tensor) -> None:
        """Add errors ``(..., D)`` (signed; absolute values are taken) of ``predictor``."""
        for d, metric in enumerate(self.metrics[predictor]):
            metric.update(error[..., d].abs().float())

    def compute(self, predictor: str) -> torch.Tensor:
        """``(D,)`` MAE per dimension (NaN where no rank saw a sample); every rank must call it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a metric no rank updated is NaN
            return torch.stack([m.compute() for m in self.metrics[predictor]])

    def reset(self) -> None:
        for metrics in self.metrics.values():
            for m in metrics:
                m.reset()


def skill_metrics(prefix: str, baseline: str, names: list[str], model_mae: dict[bool, torch.Tensor],
                  baseline_mae: dict[bool, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logged scalars of one predicted vector (see the module docstring).

    Args:
        prefix: e.g. ``test/action`` or ``test/future_proprio``.
        baseline: the baseline's name, e.g. ``mean_baseline``.
        names: dimension names (D).
        model_mae, baseline_mae: ``{normalized: (D,) MAE}`` for False (robot units) and True.

    Returns:
        ``{name: value}``: ``{prefix}_mae[_normalized][/<dim>]``,
        ``{prefix}_mae_{baseline}[_normalized][/<dim>]``, ``{prefix}_skill[/<dim>]`` and
        ``{prefix}_skill_robot_units``; entries with no samples are left out.
    """
    out: dict[str, torch.Tensor] = {}
    for suffix, normalized in UNITS:
        for stem, mae in ((f"{prefix}_mae", model_mae[normalized]),
                          (f"{prefix}_mae_{baseline}", baseline_mae[normalized])):
            if torch.isfinite(mae).all():
                out[f"{stem}{suffix}"] = mae.mean()
                out.update({f"{stem}{suffix}/{n}": v for n, v in zip(names, mae)})
    for normalized, name in ((True, f"{prefix}_skill"), (False, f"{prefix}_skill_robot_units")):
        m, b = model_mae[normalized], baseline_mae[normalized]
        if torch.isfinite(m).all() and torch.isfinite(b).all() and b.mean() > 0:
            out[name] = 1 - m.mean() / b.mean()
    m, b = model_mae[True], baseline_mae[True]
    for n, mv, bv in zip(names, m, b):
        if torch.isfinite(mv) and torch.isfinite(bv) and bv > 0:
            out[f"{prefix}_skill/{n}"] = 1 - mv / bv
    return out


__all__ = ["ErrorTable", "skill_metrics"]
