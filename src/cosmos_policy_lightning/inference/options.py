"""How a checkpoint is loaded, sampled and planned with: one :class:`PolicyOptions` and one :func:`build_policy`,
used by ``cosmos-policy serve``, ``cosmos-policy evaluate`` and Python code alike (docs/planning.md, docs/deploy.md).

The commands take the options as flat keyword parameters (``--num_steps``, ``--planning``,
``--num_proposals``, ...): :func:`takes_policy_options` writes the fields of :class:`PolicyOptions` -- names,
types, defaults and the ``Args`` lines of their docstring -- into a command's signature, so jsonargparse
derives the same options, defaults and ``--help`` text for every command from this one place.

**When planning is on.** Best-of-N planning (``inference/planning.py``) runs with ``planning=True``, or
when a ``planning_checkpoint`` is given and ``planning`` is left unset (None): the planning checkpoint
only serves planning, so naming it asks for planning. ``planning=False`` together with a planning
checkpoint contradicts itself and is refused. The rule is :attr:`PolicyOptions.plans`.

Python::

    from cosmos_policy_lightning.inference.options import PolicyOptions, build_policy

    built = build_policy("runs/metaworld/checkpoints/last.ckpt", PolicyOptions(planning=True, num_proposals=4))
    plan = built.planner.plan(observation, seed=0)     # or built.policy.predict(observation, num_steps=5)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import CosmosPolicyError
from .ensemble import AGGREGATIONS, ENSEMBLE_STEPS, Aggregation, EnsembleSteps

Decoding = Literal["parallel", "autoregressive"]
DECODINGS = ("parallel", "autoregressive")


@dataclass(frozen=True)
class PolicyOptions:
    """The sampling and planning options of a deployed policy (``serve``, ``evaluate``, :func:`build_policy`).

    Args:
        device: torch device of the model(s), e.g. cpu or cuda.
        dtype: float32 or bfloat16 (GPU).
        num_steps: denoising steps of the policy (docs/method.md §3: 5; the LIBERO reference's
            ``num_denoising_steps_action = 5``).
        decoding: parallel (one run) or autoregressive (action, future state, value) for the direct policy.
        planning: best-of-N planning instead of the direct policy (docs/planning.md, docs/method.md §3);
            default (unset): on when ``planning_checkpoint`` is given. False with a planning checkpoint is
            refused.
        planning_checkpoint: checkpoint predicting futures and values for planning (dual deployment);
            giving it turns planning on. Default with ``--planning true``: the policy checkpoint itself.
        num_proposals: N, action chunks proposed per planning step (docs/method.md §5: 8).
        num_futures: F, future states predicted per proposal (docs/method.md §5: 3).
        num_values: V, values predicted per future state (docs/method.md §5: 5).
        aggregation: majority_mean (reference), mean or lcb.
        world_model_steps: denoising steps of the planning future-state stage (default ``num_steps``).
        value_steps: denoising steps of the planning value stage (default ``num_steps``).
        ensemble_steps: ``linspace`` (the reference: ensemble member i of a stage gets
            ``linspace(1, steps, members)[i]`` steps and seed + i) or ``equal`` (every member all steps).

    Raises:
        CosmosPolicyError: a step count or ensemble size below 1, an unknown decoding, aggregation or
            ensemble-steps mode, or ``planning=False`` with a ``planning_checkpoint``.
    """

    device: str = "cpu"
    dtype: str = "float32"
    num_steps: int = 5
    decoding: Decoding = "parallel"
    planning: bool | None = None
    planning_checkpoint: Path | None = None
    num_proposals: int = 8
    num_futures: int = 3
    num_values: int = 5
    aggregation: Aggregation = "majority_mean"
    world_model_steps: int | None = None
    value_steps: int | None = None
    ensemble_steps: EnsembleSteps = "linspace"

    def __post_init__(self) -> None:
        counts = [("num_steps", self.num_steps), ("num_proposals", self.num_proposals),
                  ("num_futures", self.num_futures), ("num_values", self.num_values),
                  ("world_model_steps", self.world_model_steps), ("value_steps", self.value_steps)]
        for name, n in counts:
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise CosmosPolicyError(f"--{name} must be a positive integer, got {n!r}")
        for name, value, allowed in (("decoding", self.decoding, DECODINGS),
                                     ("aggregation", self.aggregation, AGGREGATIONS),
                                     ("ensemble_steps", self.ensemble_steps, ENSEMBLE_STEPS)):
            if value not in allowed:
                raise CosmosPolicyError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.planning is False and self.planning_checkpoint is not None:
            raise CosmosPolicyError(f"--planning false with --planning_checkpoint {self.planning_checkpoint}: the "
                                    "planning checkpoint is used only for planning; drop one of them")

    @property
    def plans(self) -> bool:
        """Whether best-of-N planning runs: ``planning``, or when unset, whether a planning checkpoint is given."""
        return bool(self.planning) if self.planning is not None else self.planning_checkpoint is not None

    def planner_settings(self) -> dict[str, Any]:
        """The :class:`~cosmos_policy_lightning.inference.planning.Planner` keyword arguments: sizes, aggregation,
        ``policy_steps = num_steps`` and the stages' steps (``num_steps`` where unset)."""
        return {"num_proposals": self.num_proposals, "num_futures": self.num_futures, "num_values": self.num_values,
                "aggregation": self.aggregation, "policy_steps": self.num_steps,
                "world_model_steps": self.world_model_steps or self.num_steps,
                "value_steps": self.value_steps or self.num_steps, "ensemble_steps": self.ensemble_steps}


#: The option names, in signature order.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PolicyOptions))


@dataclass
class BuiltPolicy:
    """What :func:`build_policy` returns.

    Attributes:
        policy: the :class:`~cosmos_policy_lightning.inference.policy.CosmosPolicy` of the checkpoint.
        planner: the :class:`~cosmos_policy_lightning.inference.planning.Planner` when ``options.plans``, else None.
        options: the options it was built with.
    """

    policy: Any
    planner: Any | None
    options: PolicyOptions

    @property
    def judge(self) -> Any:
        """The model that predicts futures and values: the planning checkpoint's, else the policy itself."""
        return self.planner.planning_model if self.planner is not None else self.policy


def build_policy(checkpoint: str | Path, options: PolicyOptions | None = None, *,
                 jpeg_quality: int | None = 95) -> BuiltPolicy:
    """Load ``checkpoint`` (and the planning checkpoint) and build the planner the options ask for.

    Args:
        checkpoint: ``.ckpt`` of ``cosmos-policy fit``, ``import-checkpoint`` or ``export`` (the policy).
        options: device, dtype, sampling and planning options (default :class:`PolicyOptions`).
        jpeg_quality: camera frames go through JPEG at this quality, like the converted shards (None: no;
            ``CosmosPolicy``'s argument).

    Returns:
        :class:`BuiltPolicy`: the policy, and the planner when ``options.plans`` (proposals from the policy,
        futures and values from the planning checkpoint, or from the policy without one).

    Raises:
        CosmosPolicyError: an unreadable or foreign checkpoint, an unknown dtype, a planning checkpoint of
            another robot.
    """
    from ..dtypes import dtype_from_name
    from .policy import CosmosPolicy

    options = options or PolicyOptions()
    dtype = dtype_from_name(options.dtype)
    policy = CosmosPolicy.from_checkpoint(checkpoint, device=options.device, dtype=dtype, jpeg_quality=jpeg_quality)
    planner = None
    if options.plans:
        from .planning import Planner

        judge = policy if options.planning_checkpoint is None else CosmosPolicy.from_checkpoint(
            options.planning_checkpoint, device=options.device, dtype=dtype, jpeg_quality=jpeg_quality)
        planner = Planner(policy, judge, **options.planner_settings())
    return BuiltPolicy(policy, planner, options)


def _option_docs() -> str:
    """The ``Args`` entries of :class:`PolicyOptions`' docstring, dedented (one entry per field)."""
    doc = inspect.cleandoc(PolicyOptions.__doc__ or "")
    section = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(section)


def takes_policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(..., options: PolicyOptions)`` -> a function taking :class:`PolicyOptions`' fields as keyword-only
    parameters instead (same names, types and defaults), which builds the options and calls ``fn``.

    The wrapper's signature, annotations and docstring (the fields' ``Args`` lines replace ``fn``'s
    ``options:`` entry) are what jsonargparse reads, so every command decorated with it has the same options.

    Raises:
        CosmosPolicyError: (when called) the options are invalid (:class:`PolicyOptions`).
    """
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    if "options" not in sig.parameters:
        raise TypeError(f"{fn.__qualname__} has no 'options' parameter")
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
              if p.name != "options"]
    field_hints = typing.get_type_hints(PolicyOptions)
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=field_hints[f.name]) for f in dataclasses.fields(PolicyOptions)]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        chosen = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        return fn(*args, options=PolicyOptions(**chosen), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params, return_annotation=hints.get("return", sig.empty))
    wrapper.__annotations__ = {**{p.name: p.annotation for p in params},
                               **({"return": hints["return"]} if "return" in hints else {})}
    del wrapper.__wrapped__  # jsonargparse and inspect read the signature above, not fn's
    lines = (fn.__doc__ or "").splitlines()
    at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("options:")), None)
    if at is None:
        raise TypeError(f"{fn.__qualname__}'s docstring has no 'options:' entry to replace")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    end = at + 1
    while end < len(lines) and lines[end].strip() and len(lines[end]) - len(lines[end].lstrip()) > len(indent):
        end += 1
    lines[at:end] = textwrap.indent(_option_docs(), indent).splitlines()
    wrapper.__doc__ = "\n".join(lines)
    return wrapper


__all__ = ["BuiltPolicy", "DECODINGS", "OPTION_NAMES", "PolicyOptions", "build_policy", "takes_policy_options"]
