"""Sequence layout: where every modality sits in the video model's latent sequence (docs/method.md §1, §2).

For an embodiment with cameras ``c1..cN`` the latent sequence is::

    0 blank | 1 proprio | 2..N+1 cameras | N+2 action | N+3 future proprio | N+4..2N+3 future cameras | 2N+4 value

so ``2N + 5`` latent frames. The pixel sequence fed to the causal VAE is one black frame followed by 4
pixel frames per slot, ``1 + 4(2N + 4)`` frames: latent frame 0 comes from pixel frame 0 alone, latent
frame ``i >= 1`` from pixel frames ``1 + 4(i-1) .. 4i``.

Conditioning masks (True = clean conditioning frame, False = noised target), docs/method.md §2:

==================== ================== =========================================
objective            conditioned on     frames with loss
==================== ================== =========================================
policy               blank, s           a, s', V (s' and V auxiliary)
world_model          blank, s, a        s', V (V auxiliary)
value                blank, s, a, s'    V
value_future_state   blank, s'          V      (s, a noised, no loss)
q_value              blank, s, a        V      (s' noised, no loss)
==================== ================== =========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .embodiment import Embodiment

SlotKind = Literal["blank", "proprio", "image", "action", "value"]
SlotTime = Literal["current", "future"]

#: Every training / inference objective, in a fixed order.
OBJECTIVES: tuple[str, ...] = ("policy", "world_model", "value", "value_future_state", "q_value")

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


# Which sample groups are clean conditioning per objective (docs/method.md §2 table).
_CONDITIONED: dict[str, frozenset[str]] = {
    "policy": frozenset({"blank", "s"}),
    "world_model": frozenset({"blank", "s", "a"}),
    "value": frozenset({"blank", "s", "a", "s'"}),
    "value_future_state": frozenset({"blank", "s'"}),
    "q_value": frozenset({"blank", "s", "a"}),
}
# Which groups carry loss: (main targets, auxiliary targets).
_LOSS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "policy": (frozenset({"a"}), frozenset({"s'", "V"})),
    "world_model": (frozenset({"s'"}), frozenset({"V"})),
    "value": (frozenset({"V"}), frozenset()),
    "value_future_state": (frozenset({"V"}), frozenset()),
    "q_value": (frozenset({"V"}), frozenset()),
}


def value_objectives() -> tuple[str, ...]:
    """The objectives that train the value function alone (the value is their only loss target): the
    conditionings a planner may judge candidate actions with (docs/method.md §2, §7)."""
    return tuple(o for o in OBJECTIVES if _LOSS[o] == (frozenset({"V"}), frozenset()))


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
    @staticmethod
    def _check_objective(objective: str) -> None:
        if objective not in _CONDITIONED:
            raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")

    def conditioning_mask(self, objective: str) -> tuple[bool, ...]:
        """Per latent frame, True where the frame is clean conditioning for ``objective`` (docs/method.md §2).

        Raises:
            ValueError: unknown objective.
        """
        self._check_objective(objective)
        groups = _CONDITIONED[objective]
        return tuple(s.group in groups for s in self.slots)

    def loss_mask(self, objective: str, auxiliary: bool = True) -> tuple[bool, ...]:
        """Per latent frame, True where the frame carries loss for ``objective``.

        With ``auxiliary=False`` only the main target keeps its loss (policy: the action; world
        model: the future state); the auxiliary frames stay noised but carry no loss.

        Raises:
            ValueError: unknown objective.
        """
        self._check_objective(objective)
        main, aux = _LOSS[objective]
        groups = main | aux if auxiliary else main
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
