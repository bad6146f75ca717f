"""Sequence layout: where every modality sits in the video model's latent sequence (docs/method.md §1, §2).

For an embodiment with cameras ``c1..cN`` the latent sequence is::

    0 blank | 1 proprio | 2..N+1 cameras | N+2 action | N+3 future proprio | N+4..2N+3 future cameras | 2N+4 value

so ``2N + 5`` latent frames. The pixel sequence fed to the causal VAE is one black frame followed by 4
pixel frames per slot, ``1 + 4(2N + 4)`` frames: latent frame 0 comes from pixel frame 0 alone, latent
frame ``i >= 1`` from pixel frames ``1 + 4(i-1) .. 4i``.

Conditioning and loss masks per objective (True = clean conditioning frame / frame with loss) come from
one table, :data:`OBJECTIVE_TABLE` (docs/method.md §2): e.g. the policy is conditioned on the blank frame
and the current state ``s`` and predicts the action chunk ``a`` (with ``s'`` and ``V`` as auxiliary
targets) from successful episodes only; ``cosmos-policy layout`` prints the masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .embodiment import Embodiment

SlotKind = Literal["blank", "proprio", "image", "action", "value"]
SlotTime = Literal["current", "future"]


#: Pixel frames per latent frame after the first (Wan2.1 VAE temporal compression, docs/method.md §1).
PIXELS_PER_LATENT = 4


@dataclass(frozen=True)
class Slot:
    """One latent frame of the sequence.

    Attributes:
        name: ``blank``, ``proprio``, ``image/<cam>``, ``action``, ``future_proprio``,
            ``future_image/<cam>`` or ``value``.
        kind: ``blank`` | ``proprio`` | ``image`` | ``action`` | ``value``.
        time: ``current`` | ``future`` | None (blank, action and value have no time).
        camera: camera name for image slots, else None.
        latent_index: index in the latent sequence.
        pixel_frames: ``(first, last)`` inclusive pixel-frame range encoded into this latent frame.
    """

    name: str
    kind: SlotKind
    time: SlotTime | None
    camera: str | None
    latent_index: int
    pixel_frames: tuple[int, int]

    @property
    def group(self) -> str:
        """Which part of the sample tuple the slot belongs to: ``blank``, ``s``, ``a``, ``s'`` or ``V``."""
        if self.kind == "blank":
            return "blank"
        if self.kind == "action":
            return "a"
        if self.kind == "value":
            return "V"
        return "s" if self.time == "current" else "s'"


def _pixel_range(latent_index: int) -> tuple[int, int]:
    if latent_index == 0:
        return (0, 0)
    first = 1 + PIXELS_PER_LATENT * (latent_index - 1)
    return (first, first + PIXELS_PER_LATENT - 1)


@dataclass(frozen=True)
class Objective:
    """One training / inference objective: which sample groups are clean conditioning, which carry loss
    (docs/method.md §2 table). Groups are those of :attr:`Slot.group`: ``blank``, ``s``, ``a``, ``s'``, ``V``.

    Attributes:
        name: the name used in ``objective_mix``, the batch's ``objective`` index and the logs.
        conditioned: groups given clean (the rest is noised and predicted).
        targets: groups whose loss always counts (the objective's main prediction).
        auxiliary: groups whose loss counts unless ``auxiliary_targets`` is off.
        successes_only: drawn from successful episodes only (a policy must not imitate a failure).
    """

    name: str
    conditioned: frozenset[str]
    targets: frozenset[str]
    auxiliary: frozenset[str] = frozenset()
    successes_only: bool = False

    @property
    def judges_actions(self) -> bool:
        """Trains the value function alone (the value is its only loss target): a conditioning that a
        planner may judge candidate actions with (docs/method.md §2, §7)."""
        return self.targets == frozenset({"V"}) and not self.auxiliary


def _groups(*names: str) -> frozenset[str]:
    return frozenset(names)


#: Every training / inference objective, in a fixed order (the index is the batch's ``objective``).
#: Adding an objective is one entry here (and its tests).
OBJECTIVE_TABLE: tuple[Objective, ...] = (
    Objective("policy", _groups("blank", "s"), _groups("a"), _groups("s'", "V"), successes_only=True),
    Objective("world_model", _groups("blank", "s", "a"), _groups("s'"), _groups("V")),
    Objective("value", _groups("blank", "s", "a", "s'"), _groups("V")),
    Objective("value_future_state", _groups("blank", "s'"), _groups("V")),
    Objective("q_value", _groups("blank", "s", "a"), _groups("V")),
)

#: The objectives' names, in :data:`OBJECTIVE_TABLE` order.
OBJECTIVES: tuple[str, ...] = tuple(o.name for o in OBJECTIVE_TABLE)


def objective(name: str) -> Objective:
    """The :class:`Objective` called ``name``.

    Raises:
        ValueError: unknown objective (the message lists the known ones).
    """
    for o in OBJECTIVE_TABLE:
        if o.name == name:
            return o
    raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")


_objective = objective  # the masks' methods take an ``objective`` name argument


def objective_index(name: str) -> int:
    """Index of objective ``name`` in :data:`OBJECTIVES` (the batch's ``objective`` value).

    Raises:
        ValueError: unknown objective.
    """
    return OBJECTIVE_TABLE.index(objective(name))


def value_objectives() -> tuple[str, ...]:
    """The objectives that train the value function alone (:attr:`Objective.judges_actions`)."""
    return tuple(o.name for o in OBJECTIVE_TABLE if o.judges_actions)


@dataclass(frozen=True)
class SequenceLayout:
    """The latent-frame layout derived from an :class:`~cosmos_policy_lightning.embodiment.Embodiment`.

    Attributes:
        embodiment: name of the embodiment it was built from.
        slots: every slot in latent order (``slots[i].latent_index == i``).
        latent_frame_shape: ``(C', H/8, W/8)``.
    """

    embodiment: str
    slots: tuple[Slot, ...]
    latent_frame_shape: tuple[int, int, int]

    @classmethod
    def from_embodiment(cls, embodiment: Embodiment) -> "SequenceLayout":
        """Build the ``2N + 5``-slot layout of docs/method.md §1 for ``embodiment``."""
        spec: list[tuple[str, SlotKind, SlotTime | None, str | None]] = [("blank", "blank", None, None),
                                                                          ("proprio", "proprio", "current", None)]
        spec += [(f"image/{c.name}", "image", "current", c.name) for c in embodiment.cameras]
        spec += [("action", "action", None, None), ("future_proprio", "proprio", "future", None)]
        spec += [(f"future_image/{c.name}", "image", "future", c.name) for c in embodiment.cameras]
        spec += [("value", "value", None, None)]
        slots = tuple(Slot(n, k, t, c, i, _pixel_range(i)) for i, (n, k, t, c) in enumerate(spec))
        return cls(embodiment.name, slots, embodiment.latent_frame_shape)

    # ------------------------------------------------------------------ sizes and lookup
    @property
    def num_latent_frames(self) -> int:
        """``2N + 5``."""
        return len(self.slots)

    @property
    def num_pixel_frames(self) -> int:
        """``1 + 4(2N + 4)``."""
        return 1 + PIXELS_PER_LATENT * (self.num_latent_frames - 1)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(s.camera for s in self.slots if s.kind == "image" and s.time == "current")

    def slot(self, name: str) -> Slot:
        """The slot called ``name``. Raises KeyError naming the known slots."""
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(f"no slot {name!r} in layout {self.embodiment!r} (slots: {', '.join(s.name for s in self.slots)})")

    def index(self, name: str) -> int:
        """Latent index of slot ``name``."""
        return self.slot(name).latent_index

    def indices(self, kind: SlotKind, time: SlotTime | None = None) -> list[int]:
        """Latent indices of every slot of ``kind`` (and ``time`` if given), in order."""
        return [s.latent_index for s in self.slots if s.kind == kind and (time is None or s.time == time)]

    # ------------------------------------------------------------------ masks
    def conditioning_mask(self, objective: str) -> tuple[bool, ...]:
        """Per latent frame, True where the frame is clean conditioning for ``objective`` (docs/method.md §2).

        Raises:
            ValueError: unknown objective.
        """
        groups = _objective(objective).conditioned
        return tuple(s.group in groups for s in self.slots)

    def loss_mask(self, objective: str, auxiliary: bool = True) -> tuple[bool, ...]:
        """Per latent frame, True where the frame carries loss for ``objective``.

        With ``auxiliary=False`` only the main target keeps its loss (policy: the action; world
        model: the future state); the auxiliary frames stay noised but carry no loss.

        Raises:
            ValueError: unknown objective.
        """
        o = _objective(objective)
        groups = o.targets | o.auxiliary if auxiliary else o.targets
        return tuple(s.group in groups for s in self.slots)

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the shape printed by ``cosmos-policy layout --json``)."""
        return {
            "embodiment": self.embodiment,
            "num_latent_frames": self.num_latent_frames,
            "num_pixel_frames": self.num_pixel_frames,
            "latent_frame_shape": list(self.latent_frame_shape),
            "slots": [
                {"name": s.name, "kind": s.kind, "time": s.time, "camera": s.camera,
                 "latent_index": s.latent_index, "pixel_frames": list(s.pixel_frames)}
                for s in self.slots
            ],
            "conditioning": {o: list(self.conditioning_mask(o)) for o in OBJECTIVES},
        }
