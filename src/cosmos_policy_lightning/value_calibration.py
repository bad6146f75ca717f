"""Is the predicted value a calibrated estimate of the discounted return? Reliability curves (docs/planning.md).

The value head is trained to predict the discounted return ``G_t = R * gamma^(T-1-t)`` of the state it sees
(docs/method.md §4, decoded to [0, 1]). Best-of-N planning compares such values across proposals, so beyond
ranking successes above failures (AUROC) it matters whether a predicted 0.8 means "about 0.8 of the return is
still to come". A reliability curve answers it: the predictions are put into equal-width bins over [0, 1]
and each bin's mean prediction is set against the mean *empirical* return of the same states; a calibrated
value lies on the diagonal. The expected calibration error (ECE, Naeini et al., 2015; Guo et al., 2017) is
the sample-weighted mean distance from it:

    ECE = sum_b (n_b / n) * |mean_predicted_b - mean_return_b|       (in [0, 1]; 0 = calibrated)

Used by ``CosmosPolicyModule.test_step`` (held-out samples, per instruction) and by ``cosmos-policy evaluate``
(closed-loop episodes, per task, ``sim/value_metrics.py``). Top-level so that both layers can import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CosmosPolicyError

#: Equal-width bins over [0, 1] of a reliability curve.
NUM_BINS = 10


@dataclass(frozen=True)
class ReliabilityCurve:
    """Predicted value against the empirical return, binned by prediction.

    Attributes:
        edges: ``(num_bins + 1,)`` bin edges over [0, 1].
        counts: ``(num_bins,)`` predictions per bin.
        mean_predicted: ``(num_bins,)`` mean prediction per bin (NaN where a bin is empty).
        mean_return: ``(num_bins,)`` mean empirical return of the same states (NaN where empty).
        ece: expected calibration error in [0, 1] (module docstring).
        samples: number of (prediction, return) pairs.
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_predicted: np.ndarray
    mean_return: np.ndarray
    ece: float
    samples: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (empty bins as None)."""
        clean = lambda a: [None if math.isnan(x) else round(float(x), 6) for x in a]  # noqa: E731
        return {"ece": round(self.ece, 6), "samples": self.samples, "edges": [float(e) for e in self.edges],
                "counts": [int(c) for c in self.counts], "mean_predicted": clean(self.mean_predicted),
                "mean_return": clean(self.mean_return)}


def reliability_curve(predicted: Sequence[float] | np.ndarray, returns: Sequence[float] | np.ndarray,
                      num_bins: int = NUM_BINS) -> ReliabilityCurve | None:
    """Bin ``predicted`` values and compare each bin with the mean of ``returns`` (module docstring).

    Args:
        predicted: ``(n,)`` predicted values in [0, 1] (values slightly outside are clipped into the end bins).
        returns: ``(n,)`` empirical discounted returns in [0, 1] of the same states.
        num_bins: equal-width bins over [0, 1] (>= 1).

    Returns:
        the curve, or None when ``n == 0``.

    Raises:
        CosmosPolicyError: different lengths, non-finite numbers or ``num_bins < 1``.
    """
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    g = np.asarray(returns, dtype=np.float64).reshape(-1)
    if p.shape != g.shape:
        raise CosmosPolicyError(f"reliability_curve: {p.size} predictions but {g.size} returns")
    if num_bins < 1:
        raise CosmosPolicyError(f"reliability_curve: num_bins must be >= 1, got {num_bins}")
    if not (np.isfinite(p).all() and np.isfinite(g).all()):
        raise CosmosPolicyError("reliability_curve: predictions and returns must be finite")
    if p.size == 0:
        return None
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.floor(p * num_bins).astype(np.int64), 0, num_bins - 1)  # 1.0 goes to the last bin
    counts = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=p, minlength=num_bins) / counts
        mean_g = np.bincount(index, weights=g, minlength=num_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(mean_p[filled] - mean_g[filled])) / p.size)
    return ReliabilityCurve(edges, counts, mean_p, mean_g, ece, int(p.size))


def reliability_figure(curves: Mapping[str, ReliabilityCurve], title: str):
    """A reliability diagram: one line per curve (its ECE in the legend), the diagonal for reference, and
    the share of predictions per bin as bars underneath.

    Args:
        curves: name (task or instruction) -> curve; empty input gives an empty diagram.
        title: the figure's title.

    Returns:
        a ``matplotlib.figure.Figure`` (the caller saves it or logs it to TensorBoard, then closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 5.5), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for i, (name, c) in enumerate(curves.items()):
        filled = c.counts > 0
        line, = ax.plot(c.mean_predicted[filled], c.mean_return[filled], marker="o",
                        label=f"{name[:40]} (ECE {c.ece:.3f}, n={c.samples})")
        width = (c.edges[1] - c.edges[0]) / max(1, len(curves))
        hist.bar(c.edges[:-1] + (i + 0.5) * width, c.counts / max(1, c.samples), width=width,
                 color=line.get_color(), alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("empirical discounted return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    hist.set_xlabel("predicted value")
    hist.set_ylabel("share")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = ["NUM_BINS", "ReliabilityCurve", "reliability_curve", "reliability_figure"]
