"""Best-of-N planning with world-model and value ensembles (docs/method.md §3, §5).

Per action chunk:

1. the **policy model** proposes N action chunks (one batched sampling run, N samples of the current
   observation, parallel decoding);
2. the **planning model** -- the same checkpoint or another one fine-tuned on rollouts ("dual
   deployment") -- predicts F future states per proposal (world-model mask, conditioned on the
   observation and the proposal) and V values per future state (value mask, or the V(s') mask of a
   model fine-tuned with it): ``N x F`` then ``N x F x V`` samples, each stage batched through the
   network on one device (the reference spreads the candidates over 8 GPUs). As in the reference,
   ensemble member i uses seed ``seed + i`` and ``linspace(1, steps, members)[i]`` denoising steps
   (``inference/ensemble.py``: futures with 1, 3, 5 steps, values with 1 .. 5; ``ensemble_steps=
   "equal"`` gives all the stage's steps); members with equal step counts share one batched call;
3. the ``F x V`` values of each proposal are aggregated into one score, and the proposal with the
   highest score is executed (ties: the lowest index).

Aggregations (values in [0, 1]):

* ``majority_mean`` (the reference): if at least half of the values exceed ``threshold`` (0.05), the
  mean of those values, else 0 -- a proposal only counts as promising when most futures agree;
* ``mean``: the plain mean;
* ``lcb``: lower confidence bound ``mean - k * std`` (population std), preferring reliable proposals.

The planning model only needs ``evaluate_actions(observation, actions, num_futures, num_values,
world_model_steps, value_steps, seed, ensemble_steps)`` returning an object with ``values (N, F, V)``
(:meth:`CosmosPolicy.evaluate_actions <cosmos_policy_lightning.inference.policy.CosmosPolicy.evaluate_actions>`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CosmosPolicyError
from .ensemble import AGGREGATIONS, ENSEMBLE_STEPS, Aggregation, EnsembleSteps
from .policy import CosmosPolicy, Observation

#: Majority-mean threshold of the reference (docs/method.md §5).
MAJORITY_THRESHOLD = 0.05


def majority_mean(values: torch.Tensor | np.ndarray, threshold: float = MAJORITY_THRESHOLD) -> torch.Tensor:
    """Majority mean over the last axis (docs/method.md §5).

    Args:
        values: ``(..., M)`` values in [0, 1].
        threshold: a value counts when it is strictly greater than this.

    Returns:
        ``(...)``: the mean of the values above ``threshold`` when at least half of the M values
        (``count >= M / 2``, so exactly half counts) are above it, else 0.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    above = v > threshold
    count = above.sum(dim=-1)
    mean_above = (v * above).sum(dim=-1) / count.clamp(min=1)
    return torch.where(2 * count >= v.shape[-1], mean_above, torch.zeros_like(mean_above))


def aggregate(values: torch.Tensor | np.ndarray, method: Aggregation = "majority_mean",
              threshold: float = MAJORITY_THRESHOLD, lcb_k: float = 1.0) -> torch.Tensor:
    """Score per proposal from its value ensemble.

    Args:
        values: ``(N, M)`` or ``(N, F, V)`` values in [0, 1] (F x V are flattened to M).
        method: ``majority_mean``, ``mean`` or ``lcb``.
        threshold: majority-mean threshold.
        lcb_k: ``lcb`` = mean - lcb_k * std (population std over the M values).

    Returns:
        ``(N,)`` float64 scores.

    Raises:
        CosmosPolicyError: unknown method or fewer than 2 dimensions.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() < 2:
        raise CosmosPolicyError(f"planning: expected values of shape (N, M) or (N, F, V), got {tuple(v.shape)}")
    v = v.flatten(1)
    if method == "majority_mean":
        return majority_mean(v, threshold)
    if method == "mean":
        return v.mean(dim=1)
    if method == "lcb":
        return v.mean(dim=1) - lcb_k * v.std(dim=1, unbiased=False)
    raise CosmosPolicyError(f"planning: unknown aggregation {method!r}; expected one of {', '.join(AGGREGATIONS)}")


@dataclass
class PlanResult:
    """Outcome of one planning call.

    Attributes:
        actions: ``(K, A)`` the chosen proposal, robot units.
        best_index: its index in ``proposals``.
        scores: ``(N,)`` aggregated score of every proposal.
        proposals: ``(N, K, A)`` every proposal, robot units.
        values: ``(N, F, V)`` the planning model's values in [0, 1].
        future_proprio: ``(N, F, P)`` predicted future proprio per proposal and future, robot units.
        policy_values: ``(N,)`` the policy model's own value of each proposal (parallel decoding).
        seconds: wall-clock time of the whole call.
    """

    actions: np.ndarray
    best_index: int
    scores: np.ndarray
    proposals: np.ndarray
    values: np.ndarray
    future_proprio: np.ndarray | None
    policy_values: np.ndarray
    seconds: float

    @property
    def value(self) -> float:
        """Score of the chosen proposal."""
        return float(self.scores[self.best_index])


class Planner:
    """Best-of-N planning (docs/method.md §3, §5): propose with one model, judge with an ensemble of another.

    Args:
        policy: the model that proposes action chunks.
        planning_model: the model that predicts futures and values (default: ``policy`` itself).
            Anything with ``evaluate_actions`` as documented in the module docstring.
        num_proposals: N action chunks (reference: 8).
        num_futures: F future-state predictions per proposal (reference: 3).
        num_values: V value predictions per future state (reference: 5).
        aggregation: ``majority_mean`` (reference), ``mean`` or ``lcb``.
        threshold: majority-mean threshold (reference 0.05).
        lcb_k: the ``k`` of ``lcb``.
        policy_steps: denoising steps of the proposals; default: the policy checkpoint's
            ``test_num_steps`` (the reference plans with 10 on ALOHA, whose recipe sets 10, and 5 elsewhere).
        world_model_steps, value_steps: denoising steps of the ensembles' largest members (reference: 5).
        ensemble_steps: ``linspace`` (default, the reference: member i gets ``linspace(1, steps, n)[i]``
            steps) or ``equal`` (every member gets the stage's steps).

    Raises:
        CosmosPolicyError: bad sizes or aggregation, or two models for different robots.
    """

    def __init__(self, policy: CosmosPolicy, planning_model: Any | None = None, num_proposals: int = 8,
                 num_futures: int = 3, num_values: int = 5, aggregation: Aggregation = "majority_mean",
                 threshold: float = MAJORITY_THRESHOLD, lcb_k: float = 1.0, policy_steps: int | None = None,
                 world_model_steps: int = 5, value_steps: int = 5, ensemble_steps: EnsembleSteps = "linspace"):
        if policy_steps is None:
            policy_steps = int(getattr(getattr(policy, "module", None), "hparams", {}).get("test_num_steps", 5))
        for name, n in (("num_proposals", num_proposals), ("num_futures", num_futures), ("num_values", num_values),
                        ("policy_steps", policy_steps), ("world_model_steps", world_model_steps),
                        ("value_steps", value_steps)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise CosmosPolicyError(f"planning: {name} must be a positive integer, got {n!r}")
        if ensemble_steps not in ENSEMBLE_STEPS:
            raise CosmosPolicyError(f"planning: ensemble_steps must be one of {', '.join(ENSEMBLE_STEPS)}, got "
                                    f"{ensemble_steps!r}")
        if aggregation not in AGGREGATIONS:
            raise CosmosPolicyError(f"planning: unknown aggregation {aggregation!r}; expected one of "
                                    f"{', '.join(AGGREGATIONS)}")
        self.policy = policy
        self.planning_model = planning_model if planning_model is not None else policy
        other = getattr(self.planning_model, "embodiment", None)
        diff = None if other is None or other is policy.embodiment else \
            policy.embodiment.difference(other, "inference")  # the one rule (embodiment.COMPATIBILITY)
        if diff is not None:
            field, mine, theirs = diff
            raise CosmosPolicyError(f"planning: the planning model was trained for embodiment {other.name!r} with "
                                    f"{field} = {theirs}, but the policy's embodiment {policy.embodiment.name!r} has "
                                    f"{field} = {mine}")
        self.num_proposals, self.num_futures, self.num_values = num_proposals, num_futures, num_values
        self.aggregation, self.threshold, self.lcb_k = aggregation, float(threshold), float(lcb_k)
        self.policy_steps, self.world_model_steps, self.value_steps = policy_steps, world_model_steps, value_steps
        self.ensemble_steps = ensemble_steps

    def plan(self, observation: Observation | Mapping[str, Any], seed: int | None = None,
             instruction: str | None = None) -> PlanResult:
        """Propose, imagine, judge, choose.

        Args:
            observation: the current observation (``Observation`` or a simulator's observation dict, ``sim/env.py``).
            seed: seeds both models' sampling (None: torch's global RNG).
            instruction: overrides the observation's instruction.

        Returns:
            :class:`PlanResult`.
        """
        start = time.perf_counter()
        obs = Observation.coerce(observation, instruction)
        if self.planning_model is self.policy:  # one model: encode the observation once for both stages
            obs = self.policy.encode_observations(obs)
        proposals = self.policy.predict(obs, num_steps=self.policy_steps, seed=seed, num_samples=self.num_proposals,
                                        decode_images=False)
        acts = proposals.actions.reshape(self.num_proposals, *proposals.actions.shape[-2:])
        judged = self.planning_model.evaluate_actions(
            obs, acts, num_futures=self.num_futures, num_values=self.num_values,
            world_model_steps=self.world_model_steps, value_steps=self.value_steps,
            seed=None if seed is None else seed + 1, ensemble_steps=self.ensemble_steps)
        values = np.asarray(judged.values, dtype=np.float64)
        if values.shape[:1] != (self.num_proposals,):
            raise CosmosPolicyError(f"planning: the planning model returned values of shape {values.shape}, "
                                    f"expected ({self.num_proposals}, F, V)")
        scores = aggregate(values, self.aggregation, self.threshold, self.lcb_k)
        best = int(torch.argmax(scores))  # first maximum on ties
        return PlanResult(actions=acts[best], best_index=best, scores=scores.numpy(), proposals=acts, values=values,
                          future_proprio=getattr(judged, "future_proprio", None),
                          policy_values=np.asarray(proposals.value).reshape(self.num_proposals),
                          seconds=time.perf_counter() - start)

    __call__ = plan
