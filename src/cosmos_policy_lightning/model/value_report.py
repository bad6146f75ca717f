"""The held-out value, per task: AUROC against the outcome and calibration against the return (``test``).

Pooling tasks mixes their value scales and base rates (a task that always succeeds next to one that often
fails gives a high pooled AUROC from the task alone), so ``CosmosPolicyModule.test_step`` hands every sample's
predicted value, its target and its episode's outcome to a :class:`TaskValueReport`, grouped by instruction
(the task). At the end of the test epoch it gives, per task, ``value_auroc/<task>`` (successes against
failures; undefined without both) and ``value_ece/<task>`` (``value_calibration.py``: the target is the
discounted return V(s') the value head is trained on, docs/method.md §4), their means over the tasks where
defined (``value_*_per_task_mean``), and a reliability diagram for TensorBoard.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..value_calibration import ReliabilityCurve, reliability_curve, reliability_figure


def task_key(instruction: str, width: int = 40) -> str:
    """A metric-name-safe short form of an instruction: lowercase words joined by ``_``, at most ``width``
    characters (``""`` -> ``"all"``)."""
    words = re.sub(r"[^0-9a-zA-Z]+", "_", instruction.strip().lower()).strip("_")
    return (words or "all")[:width].rstrip("_")


class TaskValueReport:
    """Collects ``(predicted, target, success)`` per task over a test epoch, on every rank.

    ``update`` takes values in [0, 1]; ``compute`` gathers the ranks' records (``torch.distributed``'s
    ``all_gather_object`` when a process group runs) so every rank returns the same numbers.
    """

    def __init__(self) -> None:
        self.records: dict[str, list[np.ndarray]] = {}

    def update(self, predicted: torch.Tensor, target: torch.Tensor, success: torch.Tensor,
               instructions: list[str] | None) -> None:
        """Add a batch.

        Args:
            predicted: ``(B,)`` predicted values in [0, 1].
            target: ``(B,)`` trained-on targets in [0, 1] (the decoded V(s')).
            success: ``(B,)`` bool, the sample's episode succeeded.
            instructions: ``B`` instructions (None: one task ``all``).
        """
        rows = torch.stack([predicted.detach().float().cpu(), target.detach().float().cpu(),
                            success.detach().float().cpu()], dim=1).numpy()
        names = instructions if instructions is not None else [""] * len(rows)
        for name, row in zip(names, rows):
            self.records.setdefault(task_key(str(name)), []).append(row)

    def _gathered(self) -> dict[str, np.ndarray]:
        local = {k: np.stack(v) for k, v in self.records.items()}
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
            merged: dict[str, list[np.ndarray]] = {}
            for part in parts:
                for k, v in part.items():
                    merged.setdefault(k, []).append(v)
            return {k: np.concatenate(v) for k, v in sorted(merged.items())}
        return dict(sorted(local.items()))

    def compute(self) -> tuple[dict[str, float], dict[str, ReliabilityCurve]]:
        """Per-task metrics and curves, then empties the report.

        Returns:
            ``({"value_auroc/<task>", "value_ece/<task>", "value_auroc_per_task_mean", "value_ece_per_task_mean":
            float}, {task: curve})``;
            an AUROC is left out for a task without both outcomes, the means cover the tasks where defined.
        """
        from torchmetrics.functional.classification import binary_auroc

        metrics: dict[str, float] = {}
        curves: dict[str, ReliabilityCurve] = {}
        for task, rows in self._gathered().items():
            pred, target, success = rows[:, 0], rows[:, 1], rows[:, 2] > 0.5
            if success.any() and not success.all():
                metrics[f"value_auroc/{task}"] = float(binary_auroc(torch.from_numpy(pred),
                                                                    torch.from_numpy(success.astype(np.int64))))
            curve = reliability_curve(np.clip(pred, 0, 1), np.clip(target, 0, 1))
            if curve is not None:
                curves[task] = curve
                metrics[f"value_ece/{task}"] = curve.ece
        for name in ("value_auroc", "value_ece"):
            per_task = [v for k, v in metrics.items() if k.startswith(name + "/")]
            if per_task:
                metrics[name + "_per_task_mean"] = float(np.mean(per_task))
        self.records = {}
        return metrics, curves

    @staticmethod
    def figure(curves: dict[str, ReliabilityCurve]):
        """The reliability diagram of :meth:`compute`'s curves (a matplotlib figure)."""
        return reliability_figure(curves, "held-out value calibration")


__all__ = ["TaskValueReport", "task_key"]
