"""Temporally correlated action noise for demonstration collection: perturbed experts that sometimes fail.

The collector (:mod:`.collect`) adds :class:`CorrelatedActionNoise` to the expert's action of any
:class:`~.env.SimEnv` before clipping it into the env's ``action_bounds``. Failures matter: the world-model
and value objectives train on them (docs/method.md §2, §4).

Scale. ``std`` is a *fraction of each action dimension's half range* ``(high - low) / 2`` of
``env.action_bounds`` (:meth:`CorrelatedActionNoise.for_bounds`), so one ``--noise_std`` means the same
on a 4-d Meta-World action in [-1, 1] (half range 1: the fraction is the absolute std) and on a 14-d
joint-position action whose joints span different ranges.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..errors import CosmosPolicyError


def noise_rng(seed: int, task: str, episode: int) -> np.random.Generator:
    """The generator of one episode's action noise: a function of ``(seed, task, episode)`` only, so
    results do not depend on worker scheduling (crc32 is stable across processes, unlike ``hash()``)."""
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(episode)])


class CorrelatedActionNoise:
    """Ornstein-Uhlenbeck / AR(1) action noise: ``n_{t+1} = (1 - theta) n_t + sigma_e eps_t``, times ``scale``.

    ``sigma_e = std * sqrt(1 - (1 - theta)^2)`` keeps the stationary standard deviation at ``std``;
    the process starts from its stationary distribution, so every step has std ``std * scale``.
    ``theta = 1`` gives i.i.d. noise; small ``theta`` gives slow drifts (correlation time about
    ``1 / theta`` steps). Scripted experts correct i.i.d. noise within a step or two and hardly ever
    fail; drifts push them into failure (docs/metaworld.md).

    Args:
        dim: action dimension A.
        std: stationary standard deviation in units of ``scale`` (>= 0; 0 disables).
        theta: mean-reversion rate per step, in (0, 1].
        rng: the numpy generator that makes the noise (determinism comes from its seed, :func:`noise_rng`).
        scale: ``(A,)`` positive per-dimension factor in robot units (default 1: ``std`` in action units).

    Raises:
        CosmosPolicyError: ``std < 0``, ``theta`` outside (0, 1], or a ``scale`` that is not ``(A,)``,
            finite and positive.
    """

    def __init__(self, dim: int, std: float, theta: float, rng: np.random.Generator,
                 scale: np.ndarray | None = None):
        if not std >= 0:
            raise CosmosPolicyError(f"action noise: --noise_std must be >= 0, got {std}")
        if not 0 < theta <= 1:
            raise CosmosPolicyError(f"action noise: --noise_theta must be in (0, 1], got {theta}")
        self.dim, self.std, self.theta, self.rng = int(dim), float(std), float(theta), rng
        self.scale = np.ones(self.dim) if scale is None else np.asarray(scale, dtype=np.float64).reshape(-1)
        if self.scale.shape != (self.dim,) or not (np.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise CosmosPolicyError(f"action noise: scale must be {self.dim} finite positive numbers, got {scale}")
        self._innovation = self.std * float(np.sqrt(1.0 - (1.0 - self.theta) ** 2))
        self.state = self.rng.normal(0.0, self.std, self.dim) if self.std > 0 else np.zeros(self.dim)

    @classmethod
    def for_bounds(cls, action_bounds: tuple[np.ndarray, np.ndarray], std: float, theta: float,
                   rng: np.random.Generator) -> "CorrelatedActionNoise":
        """Noise whose std is ``std`` times each dimension's half range ``(high - low) / 2``.

        Args:
            action_bounds: ``(low, high)``, each ``(A,)`` in robot units (:attr:`~.env.SimEnv.action_bounds`).
            std, theta, rng: as for the constructor (``std`` is the fraction of the half range).

        Raises:
            CosmosPolicyError: bounds of different shapes, not finite, or with ``high <= low`` in a dimension.
        """
        low, high = (np.asarray(b, dtype=np.float64).reshape(-1) for b in action_bounds)
        if low.shape != high.shape or not (np.isfinite(low).all() and np.isfinite(high).all() and (high > low).all()):
            raise CosmosPolicyError(f"action noise: action_bounds must be finite (low, high) of one shape with "
                                    f"high > low, got {low.tolist()}, {high.tolist()}")
        return cls(low.shape[0], std, theta, rng, scale=(high - low) / 2.0)

    def __call__(self) -> np.ndarray:
        """Return the noise for this step, ``(dim,)`` float64 in robot units, and advance the process."""
        out = self.state * self.scale
        if self.std > 0:
            self.state = (1.0 - self.theta) * self.state + self._innovation * self.rng.normal(size=self.dim)
        return out


__all__ = ["CorrelatedActionNoise", "noise_rng"]
