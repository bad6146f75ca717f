"""What inference needs to turn observations into model inputs and model outputs into actions.

One typed record travels from the data module (which knows the dataset) through the model (which
stores it in every checkpoint under ``checkpoint["cosmos_policy"]``) to deployment (``inference/``),
the policy server and the Hub folder (``checkpoints/policy_folder.py``). Nothing downstream reads the data
module's settings or the dataset again: the record is the one metadata channel.

=====================  ======================================================================
field                  meaning
=====================  ======================================================================
``embodiment``         the robot (cameras in layout order, image size, dims, chunk size, modes)
``layout``             the sequence layout derived from it (stored for readers; checked on load)
``stats``              the normalisation statistics of the training data (docs/method.md §4)
``text_encoder``       identity of the instruction encoder (``minilm:...``, ``t5:...``, ``none``)
``max_text_tokens``    instruction embeddings are cut to this many tokens
``objective_mix``      the training objective mix (which value objective a planner uses)
``test_transform``     ``center_crop`` (trained with augmentation: the test-time crop of
                       docs/method.md §4) or ``none``
=====================  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .embodiment import Embodiment
from .errors import CosmosPolicyError
from .layout import OBJECTIVES, SequenceLayout
from .normalization import DatasetStats, Normalizer

TestTransform = Literal["center_crop", "none"]
TEST_TRANSFORMS: tuple[str, ...] = ("center_crop", "none")


@dataclass(frozen=True)
class InferenceRecord:
    """The data-side facts a trained model needs at inference (see the module docstring).

    Attributes:
        embodiment: the robot.
        stats: normalisation statistics (action and proprio, robot units).
        text_encoder: encoder identity; ``"none"`` for a model trained without text.
        max_text_tokens: token limit of instruction embeddings (>= 1).
        objective_mix: ``{objective: weight}`` of training, weights > 0 (names of ``layout.OBJECTIVES``).
        test_transform: ``center_crop`` or ``none``.
    """

    embodiment: Embodiment
    stats: DatasetStats
    text_encoder: str = "none"
    max_text_tokens: int = 512
    objective_mix: dict[str, float] = field(default_factory=dict)
    test_transform: TestTransform = "none"

    def __post_init__(self) -> None:
        if self.test_transform not in TEST_TRANSFORMS:
            raise CosmosPolicyError(f"inference record: test_transform must be one of {', '.join(TEST_TRANSFORMS)}, "
                                    f"got {self.test_transform!r}")
        unknown = [o for o in self.objective_mix if o not in OBJECTIVES]
        if unknown:
            raise CosmosPolicyError(f"inference record: unknown objective {unknown[0]!r} in objective_mix "
                                    f"(expected {', '.join(OBJECTIVES)})")
        if isinstance(self.max_text_tokens, bool) or not isinstance(self.max_text_tokens, int) \
                or self.max_text_tokens < 1:
            raise CosmosPolicyError(f"inference record: max_text_tokens must be an integer >= 1, "
                                    f"got {self.max_text_tokens!r}")

    @property
    def layout(self) -> SequenceLayout:
        """The sequence layout of :attr:`embodiment` (docs/method.md §1)."""
        return SequenceLayout.from_embodiment(self.embodiment)

    @property
    def center_crop(self) -> bool:
        """Whether observations get the test-time centre crop (docs/method.md §4)."""
        return self.test_transform == "center_crop"

    @property
    def objectives(self) -> tuple[str, ...]:
        """Names of the objectives the model was trained on, in ``layout.OBJECTIVES`` order."""
        return tuple(o for o in OBJECTIVES if self.objective_mix.get(o, 0) > 0)

    def normalizer(self, modality: str) -> Normalizer:
        """Normaliser of ``action`` or ``proprio`` (the embodiment's mode over :attr:`stats`)."""
        return self.stats.normalizer(modality, self.embodiment.normalization[modality])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the checkpoint's ``cosmos_policy`` entry, the Hub folder's config)."""
        return {
            "embodiment": self.embodiment.to_dict(),
            "layout": self.layout.to_dict(),
            "stats": self.stats.to_dict(),
            "text_encoder": self.text_encoder,
            "max_text_tokens": int(self.max_text_tokens),
            "objective_mix": {k: float(v) for k, v in self.objective_mix.items()},
            "test_transform": self.test_transform,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "checkpoint") -> "InferenceRecord":
        """Read a record written by :meth:`to_dict`.

        Records written before ``max_text_tokens``, ``objective_mix`` and ``test_transform`` were part
        of it (they held ``center_crop: bool``) read with the defaults 512, ``{}`` and that flag.

        Raises:
            CosmosPolicyError: one line naming ``where`` and the missing or malformed field, or a
                stored layout that differs from the one this version derives from the embodiment.
        """
        if not isinstance(data, dict):
            raise CosmosPolicyError(f"{where}: the inference record must be a mapping, got {type(data).__name__}")
        for key in ("embodiment", "stats"):
            if not isinstance(data.get(key), dict):
                raise CosmosPolicyError(f"{where}: the inference record lacks {key!r} (a checkpoint saved without a "
                                        f"data module has no statistics; train with one)")
        embodiment = Embodiment.from_dict(data["embodiment"], source=f"{where}:embodiment")
        try:
            stats = DatasetStats.from_dict(data["stats"])
        except (KeyError, TypeError, ValueError) as err:
            raise CosmosPolicyError(f"{where}: malformed statistics in the inference record ({err})") from None
        transform = data.get("test_transform")
        if transform is None:
            transform = "center_crop" if data.get("center_crop") else "none"
        try:
            record = cls(embodiment=embodiment, stats=stats, text_encoder=str(data.get("text_encoder") or "none"),
                         max_text_tokens=data.get("max_text_tokens", 512),
                         objective_mix=dict(data.get("objective_mix") or {}), test_transform=transform)
        except CosmosPolicyError as err:
            raise CosmosPolicyError(f"{where}: {err}") from None
        stored = data.get("layout")
        if stored is not None and stored != record.layout.to_dict():
            raise CosmosPolicyError(f"{where}: the stored sequence layout differs from the one derived from its "
                                    f"embodiment {embodiment.name!r}; the checkpoint was written by an incompatible "
                                    f"version")
        return record


__all__ = ["InferenceRecord", "TEST_TRANSFORMS", "TestTransform"]
