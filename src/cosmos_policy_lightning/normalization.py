"""Per-dimension statistics and normalisation of actions and proprio to [-1, 1] (docs/method.md §4).

``minmax``: ``2 (x - min) / (max - min) - 1`` over the successful demonstrations (the reference).
``quantile``: the same with the 1st / 99th percentiles as bounds, clipped to [-1, 1] (robust to outliers).
``none``: identity.

Unlike the reference, a constant dimension never divides by zero: it maps to 0 and back to its
constant, with one warning naming the dimension. "Constant" includes *near*-constant: a range below
``ZERO_RANGE_EPS`` or below ``RELATIVE_RANGE_EPS`` times the dimension's magnitude (float noise on a
fixed value; dividing by it would turn a slightly different observation into millions). Two more
warnings guard the scale: a range dominated by outliers (min / max far beyond q01 / q99, e.g. one
action of 1e38), and inference inputs far outside the training range. ``convert`` also checks the raw
training values with a robust test that a cluster of outliers cannot defeat (:func:`robust_outliers`:
distance from the median in units of the median absolute deviation), warns with the episode and step of
the worst value, and refuses values that cannot be normalised (:func:`unnormalisable`). Statistics carry a fingerprint
of the data they were computed on (dims, chunk size, episode ids) so a later stage refuses stale ones.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_json_atomic
from .storage import location

ArrayLike = Any  # np.ndarray | torch.Tensor

#: Ranges at or below this (robot units) are treated as constant dimensions...
ZERO_RANGE_EPS = 1e-6
#: ... and so are ranges at or below this fraction of the dimension's magnitude max(|low|, |high|).
RELATIVE_RANGE_EPS = 1e-5
#: A dimension's range is "dominated by outliers" when (max - min) exceeds this multiple of (q99 - q01).
OUTLIER_RANGE_RATIO = 10.0
#: Inference inputs whose normalised value exceeds this in magnitude are "far outside" the training
#: range (2 = half a range beyond its bound).
FAR_OUTSIDE = 2.0


#: A value is an outlier when it lies more than this many robust spreads (:func:`robust_spread`) from its
#: dimension's median (a normal distribution has none beyond ~5.5 in a million draws).
OUTLIER_SPREADS = 20.0
#: Outliers that stretch a dimension's range to more than this multiple of the range of its other values
#: cannot be normalised: min-max scaling would map every other value into a sliver 1e-6 wide, below the
#: float16 resolution of the latent frames they are injected into (docs/method.md §4).
UNNORMALISABLE_RATIO = 1e6
#: Values beyond this magnitude are refused outright: the range of two of them overflows float32.
ABSOLUTE_LIMIT = float(np.finfo(np.float32).max) / 4


def robust_spread(x: np.ndarray) -> np.ndarray:
    """Robust scale ``(D,)`` of the rows ``(N, D)`` of ``x``: the largest of ``1.4826 x MAD`` (the median
    absolute deviation, scaled to a normal distribution's standard deviation), ``IQR / 1.349`` and
    ``(q90 - q10) / 2.563`` (each equals the standard deviation of a normal distribution); the full range /
    4.65 where all three are 0. A cluster of outliers moves none of them unless it holds more than 10 % of
    the values (and values beyond :data:`ABSOLUTE_LIMIT` are refused however many there are), while a second
    mode that holds more than 10 % (a gripper closed part of the time) widens the spread instead of being
    flagged."""
    x = np.asarray(x, dtype=np.float64)
    median = np.median(x, axis=0)
    q = np.quantile(x, [0.10, 0.25, 0.75, 0.90], axis=0)
    spread = np.maximum.reduce([1.4826 * np.median(np.abs(x - median), axis=0), (q[2] - q[1]) / 1.349,
                                (q[3] - q[0]) / 2.563])
    return np.where(spread > 0, spread, (x.max(0) - x.min(0)) / 4.65)


def robust_outliers(x: np.ndarray, spreads: float = OUTLIER_SPREADS) -> np.ndarray:
    """Boolean ``(N, D)``: values of ``x`` ``(N, D)`` more than ``spreads`` robust spreads from their
    dimension's median (:func:`robust_spread`); near-constant spreads never flag anything."""
    x = np.asarray(x, dtype=np.float64)
    median, spread = np.median(x, axis=0), robust_spread(x)
    flat = near_constant(median - spread, median + spread) & (spread <= ZERO_RANGE_EPS)
    return (np.abs(x - median) > spreads * np.maximum(spread, ZERO_RANGE_EPS)) & ~flat


def unnormalisable(x: np.ndarray, outliers: np.ndarray) -> np.ndarray:
    """Boolean ``(D,)``: dimensions of ``x`` ``(N, D)`` whose ``outliers`` (:func:`robust_outliers`) cannot be
    normalised: beyond :data:`ABSOLUTE_LIMIT`, or stretching the range to more than
    :data:`UNNORMALISABLE_RATIO` times the range of the other values."""
    x = np.asarray(x, dtype=np.float64)
    huge = (np.abs(x) > ABSOLUTE_LIMIT).any(axis=0)
    inliers = np.where(outliers, np.nan, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no inliers
        core = np.nanmax(inliers, axis=0) - np.nanmin(inliers, axis=0)
    core = np.where(np.isfinite(core), core, 0.0)
    stretched = (x.max(0) - x.min(0)) > UNNORMALISABLE_RATIO * np.maximum(core, ZERO_RANGE_EPS)
    return huge | (stretched & outliers.any(axis=0))


def near_constant(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Boolean ``(D,)``: dimensions whose range ``high - low`` is too small to divide by (see module
    docstring): ``<= max(ZERO_RANGE_EPS, RELATIVE_RANGE_EPS * max(|low|, |high|))``."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    scale = np.maximum(np.abs(low), np.abs(high))
    return (high - low) <= np.maximum(ZERO_RANGE_EPS, RELATIVE_RANGE_EPS * scale)


def outlier_dimensions(stats: "Stats", ratio: float = OUTLIER_RANGE_RATIO) -> list[int]:
    """Dimensions whose min..max range is dominated by a few extreme values: ``max - min`` more than
    ``ratio`` times ``q99 - q01`` (constant-looking q01..q99 count as a tiny range). Min-max
    normalisation would squeeze 98 % of such a dimension's values into a sliver of [-1, 1]."""
    full = np.asarray(stats.max, dtype=np.float64) - np.asarray(stats.min, dtype=np.float64)
    core = np.asarray(stats.q99, dtype=np.float64) - np.asarray(stats.q01, dtype=np.float64)
    dominated = (full > ratio * np.maximum(core, ZERO_RANGE_EPS)) & ~near_constant(stats.min, stats.max)
    return [int(i) for i in np.flatnonzero(dominated)]


def describe_outliers(stats: "Stats", modality: str) -> str | None:
    """One line naming the outlier-dominated dimensions of ``stats`` (None when there are none)."""
    dims = outlier_dimensions(stats)
    if not dims:
        return None
    parts = [f"{stats.names[i] if stats.names else i}: min/max [{stats.min[i]:.4g}, {stats.max[i]:.4g}] vs "
             f"q01/q99 [{stats.q01[i]:.4g}, {stats.q99[i]:.4g}]" for i in dims[:4]]
    more = f" (+{len(dims) - 4} more)" if len(dims) > 4 else ""
    return (f"{modality}: range dominated by outliers in dimension(s) {'; '.join(parts)}{more}; min-max "
            f"normalisation squeezes the other values into a sliver of [-1, 1] -- check the data or use "
            f"normalization {modality}: quantile")


@dataclass
class Stats:
    """Per-dimension statistics of a ``(N, D)`` array.

    Attributes (each a float64 array of shape ``(D,)`` except ``count``):
        min, max, mean, std, q01, q99: in the data's own units.
        count: number of rows N.
        names: optional per-dimension names (for warnings and plots).
    """

    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    count: int
    names: tuple[str, ...] | None = None

    @classmethod
    def compute(cls, data: ArrayLike, names: Sequence[str] | None = None) -> "Stats":
        """Statistics of ``data`` of shape ``(N, D)`` (N >= 1).

        Raises:
            ValueError: wrong rank, no rows, or non-finite values.
        """
        x = np.asarray(data, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"statistics need a non-empty (N, D) array, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("statistics: data contains NaN or inf")
        q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
        return cls(x.min(0), x.max(0), x.mean(0), x.std(0), q01, q99, int(x.shape[0]),
                   tuple(names) if names is not None else None)

    @property
    def dim(self) -> int:
        return int(self.min.shape[0])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k).tolist() for k in ("min", "max", "mean", "std", "q01", "q99")}
        out["count"] = self.count
        out["names"] = list(self.names) if self.names is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stats":
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("min", "max", "mean", "std", "q01", "q99")}
        return cls(**arrays, count=int(d["count"]), names=tuple(d["names"]) if d.get("names") else None)


class Normalizer:
    """Maps one modality between robot units and [-1, 1], per dimension.

    Args:
        stats: statistics of the modality (last axis of the data is the dimension axis).
        mode: ``minmax`` (bounds min/max), ``quantile`` (bounds q01/q99) or ``none``.
        clip: clip normalised values to [-1, 1] (always on in ``quantile`` mode).
        name: modality name used in warnings (e.g. ``action``).

    Constant dimensions map to 0 and un-normalise to their constant; a warning naming them is
    issued once, at construction.
    """

    def __init__(self, stats: Stats, mode: str = "minmax", clip: bool = False, name: str = "data"):
        if mode not in ("minmax", "quantile", "none"):
            raise ValueError(f"{name}: unknown normalisation mode {mode!r}; expected minmax, quantile or none")
        self.stats, self.mode, self.name = stats, mode, name
        self.clip = clip or mode == "quantile"
        lo, hi = (stats.q01, stats.q99) if mode == "quantile" else (stats.min, stats.max)
        self.low = np.asarray(lo, dtype=np.float64)
        self.high = np.asarray(hi, dtype=np.float64)
        span = self.high - self.low
        self.constant = near_constant(self.low, self.high)
        # Half-range with constant dims set to 1 so the arithmetic stays finite; they are zeroed below.
        self.half = np.where(self.constant, 1.0, span / 2.0)
        self.center = np.where(self.constant, self.low, (self.high + self.low) / 2.0)
        self._warned_dims: set[int] = set()
        if mode != "none" and self.constant.any():
            dims = [stats.names[i] if stats.names else str(i) for i in np.flatnonzero(self.constant)]
            warnings.warn(f"{name}: constant dimension(s) {', '.join(dims)} (range <= "
                          f"max({ZERO_RANGE_EPS:g}, {RELATIVE_RANGE_EPS:g} x magnitude)); they are normalised to 0",
                          stacklevel=2)
        if mode == "minmax":
            outliers = describe_outliers(stats, name)
            if outliers:
                warnings.warn(outliers, stacklevel=2)

    def warn_out_of_range(self, x: ArrayLike, what: str | None = None) -> list[int]:
        """Warn (once per dimension of this normaliser) about values far outside the training range:
        normalised magnitude above ``FAR_OUTSIDE``, or a constant dimension that is not at its constant.
        The model has never seen such inputs; its output there is an extrapolation.

        Args:
            x: ``(..., D)`` values in robot units.
            what: name in the message (default: the normaliser's name).

        Returns:
            the dimensions warned about by this call.
        """
        if self.mode == "none":
            return []
        arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
        arr = arr.reshape(-1, arr.shape[-1])
        y = np.abs((arr - self.center) / self.half)
        off_constant = np.abs(arr - self.center) > 1e-3 * np.maximum(1.0, np.abs(self.center))
        far = np.where(self.constant, off_constant, y > FAR_OUTSIDE).any(axis=0)
        new = [int(i) for i in np.flatnonzero(far) if int(i) not in self._warned_dims]
        for i in new:
            self._warned_dims.add(i)
            label = self.stats.names[i] if self.stats.names else str(i)
            worst = arr[np.argmax(np.abs(arr[:, i] - self.center[i])), i]
            warnings.warn(f"{what or self.name} dimension {label}: {worst:.6g} is far outside the training range "
                          f"[{self.low[i]:.6g}, {self.high[i]:.6g}]; the model never saw such inputs",
                          stacklevel=2)
        return new

    def _params(self, x: ArrayLike):
        if isinstance(x, torch.Tensor):
            conv = lambda a: torch.as_tensor(a, dtype=x.dtype, device=x.device)  # noqa: E731
            return conv(self.center), conv(self.half), torch.as_tensor(self.constant, device=x.device)
        return self.center, self.half, self.constant

    def normalize(self, x: ArrayLike) -> ArrayLike:
        """``(..., D)`` robot units -> ``(..., D)`` in [-1, 1] (exactly, for in-range data)."""
        if self.mode == "none":
            return x
        center, half, const = self._params(x)
        y = (x - center) / half
        y = y * ~const if isinstance(y, torch.Tensor) else np.where(const, 0.0, y)
        if self.clip:
            y = y.clamp(-1, 1) if isinstance(y, torch.Tensor) else np.clip(y, -1, 1)
        return y

    def unnormalize(self, y: ArrayLike) -> ArrayLike:
        """``(..., D)`` in [-1, 1] -> robot units; constant dimensions return their constant."""
        if self.mode == "none":
            return y
        center, half, const = self._params(y)
        if isinstance(y, torch.Tensor):
            return torch.where(const, center, y * half + center)
        return np.where(const, center, y * half + center)


def fingerprint(action_dim: int, proprio_dim: int, chunk_size: int, episode_ids: Iterable[str]) -> str:
    """Hash identifying the data statistics were computed on: dims, chunk size and sorted episode ids.

    Returns:
        16 hex characters of a SHA-256.
    """
    h = hashlib.sha256()
    h.update(json.dumps([action_dim, proprio_dim, chunk_size, sorted(map(str, episode_ids))]).encode())
    return h.hexdigest()[:16]


@dataclass
class DatasetStats:
    """Statistics of a converted dataset: actions and proprio, over successful episodes (used for
    normalisation, docs/method.md §4) and over all episodes, plus the fingerprint.

    ``successful`` / ``all`` map modality (``action``, ``proprio``) to :class:`Stats`.
    """

    fingerprint: str
    successful: dict[str, Stats]
    all: dict[str, Stats]
    meta: dict[str, Any] = field(default_factory=dict)

    def normalizer(self, modality: str, mode: str = "minmax", clip: bool = False) -> Normalizer:
        """Normaliser for ``modality`` from the successful-episode statistics (falls back to all
        episodes when there are no successes)."""
        stats = self.successful.get(modality) or self.all[modality]
        return Normalizer(stats, mode=mode, clip=clip, name=modality)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "successful": {k: v.to_dict() for k, v in self.successful.items()},
            "all": {k: v.to_dict() for k, v in self.all.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetStats":
        return cls(d["fingerprint"], {k: Stats.from_dict(v) for k, v in (d.get("successful") or {}).items()},
                   {k: Stats.from_dict(v) for k, v in d["all"].items()}, d.get("meta", {}))

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temp file in the same directory, then rename)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "DatasetStats":
        """Read ``stats.json`` (a path, or a ``UPath`` of a URL). Raises ValueError (one line, naming the
        file) when malformed."""
        path = location(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: statistics file not found") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed statistics ({type(err).__name__}: {err})") from None
