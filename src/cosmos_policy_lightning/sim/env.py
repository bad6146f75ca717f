"""The simulator protocol: what closed-loop evaluation (:mod:`.evaluate`) and collection need of a simulator.

A simulator is an *adapter class* built from an :class:`~cosmos_policy_lightning.embodiment.Embodiment`.
Its instances are :class:`SimEnv` (one task, one episode at a time); the class itself is a
:class:`Simulator` (how to build one, which tasks exist). :data:`SIMULATORS` maps the name the
command line uses (``cosmos-policy evaluate metaworld``) to the class, so adding a simulator is one
adapter class and one line there (CONTRIBUTING.md, "Adding a simulator").

Observation (what :meth:`SimEnv.reset` and :meth:`SimEnv.step` return, and what
:meth:`CosmosPolicy.predict <cosmos_policy_lightning.inference.policy.CosmosPolicy.predict>`, the planner
and the policy server take)::

    {"images": {camera: (H, W, 3) uint8},   # one per embodiment camera, named as the embodiment names it,
                                            # at the embodiment's image_size; {} when built with render=False
     "proprio": (P,) float32,               # the embodiment's proprio in robot units (P = proprio.dim)
     "instruction": str}                    # the task instruction the model is conditioned on

Actions are ``(A,)`` float arrays in robot units (A = ``action.dim`` of the embodiment, the units the
demonstrations were recorded in), inside :attr:`SimEnv.action_bounds`.

The env owns everything simulator-specific: the mapping from embodiment camera names to the
simulator's cameras, initial states, the task instruction, the success test and the expert. The
evaluator never looks at a data format's key names.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import CosmosPolicyError

#: ``{"images": {camera: (H, W, 3) uint8}, "proprio": (P,) float32, "instruction": str}`` (module docstring).
Observation = dict[str, Any]

#: Simulator name (``cosmos-policy evaluate NAME``) -> ``"module:AdapterClass"`` (imported on first use,
#: so a simulator's own packages load only when it is chosen).
SIMULATORS: dict[str, str] = {
    "metaworld": "cosmos_policy_lightning.sim.metaworld:MetaWorldEnv",
    "aloha": "cosmos_policy_lightning.sim.aloha:AlohaEnv",
    "libero": "cosmos_policy_lightning.sim.libero:LiberoEnv",
}


@runtime_checkable
class SimEnv(Protocol):
    """One task of a simulator, as the evaluator and the collector drive it.

    Attributes:
        task: the task this env runs (e.g. ``"reach-v3"``); names rollouts and output files.
        instruction: the task's instruction text (also in every observation).
        cameras: embodiment camera name -> the simulator's own name for that camera, in the embodiment's
            order; the keys are the keys of ``observation["images"]``. The env builds this mapping.
        max_steps: the episode time limit in steps; the step that reaches it returns ``truncated=True``.
        action_bounds: ``(low, high)``, each ``(A,)`` float32 in robot units: the valid range of every
            action dimension. The evaluator clips commanded actions into it (what is executed is what is
            recorded) and the random baseline samples uniformly inside it.
        success: whether the task is solved in the current state, i.e. the ``success`` of the last
            :meth:`step` (False right after :meth:`reset`).
    """

    task: str
    instruction: str
    cameras: Mapping[str, str]
    max_steps: int
    action_bounds: tuple[np.ndarray, np.ndarray]
    success: bool

    def reset(self, episode: int) -> Observation:
        """Start episode ``episode`` (>= 0) from the env's initial state number ``episode``: the same
        index gives the same initial state for the same construction seed. Returns the first observation."""
        ...

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Apply one ``(A,)`` action; returns ``(observation, reward, success, truncated, info)`` (Gymnasium's
        order with ``success`` in the place of ``terminated``): the simulator's reward, whether the task is
        solved after the action, whether ``max_steps`` steps were taken, and the simulator's info dict.
        Raises :class:`CosmosPolicyError` on a malformed action or when stepping a finished episode."""
        ...

    def expert(self) -> np.ndarray | None:
        """The expert's ``(A,)`` action for the current state (e.g. a scripted policy reading privileged
        simulator state), or None where the simulator has no expert."""
        ...

    def close(self) -> None:
        """Free the simulator and its renderer (idempotent)."""
        ...


class Simulator(Protocol):
    """The adapter class itself: how the evaluator builds a :class:`SimEnv` (class-level members).

    Attributes:
        default_embodiment: embodiment YAML used when neither a checkpoint nor ``--embodiment`` gives one
            (the ``expert`` and ``random`` baselines).
        default_task: the task evaluated when ``--tasks`` is not given.

    Optional class attributes, read by ``cosmos-policy collect`` (:mod:`.collect`) where present:
    ``collect_format`` (the layout written without ``--format``: ``"episode_hdf5"``, the default, or
    ``"robomimic"``), ``collect_max_steps`` (the episode limit without ``--max_steps``; default: the
    simulator's own, i.e. ``create`` capping a huge number), ``proprio_parts`` (proprio dataset name ->
    width, in order, for embodiments that name several proprio keys for the written format) and
    ``packages`` (distributions whose versions each file records). A step's ``info["success_score"]``, where
    the simulator has one, is its partial progress as a fraction in [0, 1] (1 only with success); the
    collector records it.
    """

    default_embodiment: str | Path
    default_task: str

    def create(self, task: str, embodiment: Any, *, seed: int, max_steps: int, render: bool) -> SimEnv:
        """A :class:`SimEnv` for ``task`` rendering ``embodiment``'s cameras (``render=False`` may leave
        ``images`` empty: faster for baselines without videos). ``seed`` selects the initial states;
        ``max_steps`` above the simulator's own episode limit is capped at that limit."""
        ...

    def check_task(self, task: str) -> None:
        """Raise :class:`CosmosPolicyError` (one line, listing the valid tasks) unless ``task`` exists; also
        fails early when the simulator is not installed or cannot render. Called before any model loads."""
        ...

    # Optional: ``check_embodiment(embodiment)``, a static method raising CosmosPolicyError (one line, via
    # :func:`check_embodiment`) for an embodiment of another robot; the evaluator calls it once the
    # checkpoint's embodiment is known, before any episode starts. ``default_max_steps``: the evaluator's
    # step limit without ``--max_steps`` (else 200).


def check_embodiment(embodiment: Any, simulator_name: str, *, proprio_dim: int, action_dim: int, hint: str) -> None:
    """Refuse, in one line, an embodiment (e.g. a checkpoint's) of another robot than the simulator's.

    Args:
        embodiment: the :class:`~cosmos_policy_lightning.embodiment.Embodiment` to check.
        simulator_name: the simulator's registered name (for the message).
        proprio_dim: the simulator's proprio dimension ``P``.
        action_dim: the simulator's action dimension ``A``.
        hint: the embodiment file that fits the simulator (named in the message).

    Raises:
        CosmosPolicyError: the proprio or action dimension differs.
    """
    got = (int(embodiment.proprio.dim), int(embodiment.action.dim))
    if got != (proprio_dim, action_dim):
        field, a, b = ("proprio.dim", got[0], proprio_dim) if got[0] != proprio_dim else ("action.dim", got[1],
                                                                                           action_dim)
        raise CosmosPolicyError(
            f"{embodiment.source}: embodiment {embodiment.name!r} has {got[0]}-d proprio and {got[1]}-d actions; "
            f"the {simulator_name} simulator takes {proprio_dim}-d proprio and {action_dim}-d actions, the "
            f"embodiment of {hint} ({field}: {a} vs {b}; a checkpoint of another robot? use {hint})")


def simulator(name: str) -> Simulator:
    """The adapter class registered as ``name`` in :data:`SIMULATORS`.

    Raises:
        CosmosPolicyError: ``name`` is not registered (the message lists the registered names).
    """
    if name not in SIMULATORS:
        raise CosmosPolicyError(f"unknown simulator {name!r}; expected one of {', '.join(sorted(SIMULATORS))}")
    module, attr = SIMULATORS[name].split(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["Observation", "SIMULATORS", "SimEnv", "Simulator", "check_embodiment", "simulator"]
