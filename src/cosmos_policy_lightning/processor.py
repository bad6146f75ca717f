"""The one path between robot units and the model's normalised vectors and text tokens.

Training's ``test_step`` / ``predict_step`` (``model/predict.py``) and deployment
(``inference/policy.py``, the policy server) both go through a :class:`PolicyProcessor` built from
the checkpoint's :class:`~cosmos_policy_lightning.inference_record.InferenceRecord`, so a number
means the same thing on both sides: proprio and candidate actions are normalised with the
record's statistics, instructions are looked up and padded like training batches
(``text.InstructionEmbeddings``, ``text.pad_text_batch``), and generated vectors go back to robot
units (actions clamped to the normalised range first) with the value mapped to [0, 1]
(docs/method.md §1, §4). Camera frames are prepared in ``inference/observation.py`` (training reads
them already prepared from the shards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import CosmosPolicyError
from .inference_record import InferenceRecord
from .normalization import Normalizer
from .text import InstructionEmbeddings, TextEncoder


def value_to_unit(value: torch.Tensor) -> torch.Tensor:
    """Map a value in [-1, 1] to [0, 1] by ``(v + 1) / 2`` and clamp (docs/method.md §1)."""
    return ((value + 1) / 2).clamp(0, 1)


def normalize_proprio(proprio: Sequence[Any], normalizer: Normalizer, dim: int,
                      embodiment: str | None = None) -> torch.Tensor:
    """B proprio vectors in robot units -> float32 ``(B, P)`` normalised (docs/method.md §4).

    Warns (once per dimension and normalizer) when a value lies far outside the training range
    (:meth:`~cosmos_policy_lightning.normalization.Normalizer.warn_out_of_range`).

    Raises:
        CosmosPolicyError: not numbers, wrong length (names ``embodiment``, the policy's robot: an observation
            of another robot) or non-finite values (names the observation).
    """
    rows = []
    for b, raw in enumerate(proprio):
        try:
            p = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise CosmosPolicyError(f"observation {b}: proprio must be numbers (robot units), got "
                                    f"{str(raw)[:60]!r}") from None
        if p.shape != (dim,) and embodiment is not None:
            raise CosmosPolicyError(f"observation {b}: expected proprio of shape ({dim},), got {p.size} values "
                                    f"{p[:8].tolist()}: this policy's embodiment {embodiment!r} has proprio.dim = "
                                    f"{dim} (an observation of another robot?)")
        if p.shape != (dim,) or not np.isfinite(p).all():
            raise CosmosPolicyError(f"observation {b}: expected finite proprio of shape ({dim},), got "
                                    f"{np.asarray(raw).shape} {p[:8].tolist()}")
        rows.append(p)
    batch = np.stack(rows)
    normalizer.warn_out_of_range(batch, "proprio")
    return torch.as_tensor(np.asarray(normalizer.normalize(batch)), dtype=torch.float32)


class PolicyProcessor:
    """Normalise inputs and un-normalise outputs with one checkpoint's record.

    Args:
        record: the checkpoint's inference record.
        text_encoder: an encoder object to use instead of building the recorded one.
        text_embeddings: instruction -> ``(L, D)`` embeddings by the recorded encoder (see
            :class:`~cosmos_policy_lightning.text.InstructionEmbeddings`).
    """

    def __init__(self, record: InferenceRecord, text_encoder: TextEncoder | None = None,
                 text_embeddings: Mapping[str, Any] | None = None):
        self.record = record
        self.action_normalizer = record.normalizer("action")
        self.proprio_normalizer = record.normalizer("proprio")
        self.instructions = InstructionEmbeddings(record.max_text_tokens, identity=record.text_encoder,
                                                  encoder=text_encoder, precomputed=text_embeddings)

    # ------------------------------------------------------------------ inputs
    def text(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``text`` float32 ``(B, L, D)`` and ``text_mask`` bool ``(B, L)`` of B instructions, padded like
        a training batch (``(B, 0, 0)`` / ``(B, 0)`` for a text-free model)."""
        return self.instructions.batch(instructions)

    def normalize_proprio(self, proprio: Sequence[Any]) -> torch.Tensor:
        """B proprio vectors in robot units -> float32 ``(B, P)`` in [-1, 1] (:func:`normalize_proprio`)."""
        emb = self.record.embodiment
        return normalize_proprio(proprio, self.proprio_normalizer, emb.proprio.dim, emb.name)

    def normalize_actions(self, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Candidate action chunks ``(N, K, A)`` in robot units -> float32 normalised (e.g. another
        checkpoint's proposals, judged with this model's statistics).

        Raises:
            CosmosPolicyError: not finite or not of shape ``(N, K, A)``.
        """
        acts = actions.double() if isinstance(actions, torch.Tensor) else \
            torch.as_tensor(np.asarray(actions, dtype=np.float64))
        k, a = self.record.embodiment.action.chunk_size, self.record.embodiment.action.dim
        if acts.dim() != 3 or tuple(acts.shape[1:]) != (k, a) or not torch.isfinite(acts).all():
            raise CosmosPolicyError(f"policy: expected finite candidate actions of shape (N, {k}, {a}), got "
                                    f"{tuple(acts.shape)}")
        return self.action_normalizer.normalize(acts).float()

    # ------------------------------------------------------------------ outputs
    def clamp_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Generated normalised actions, clamped to [-1, 1]: inside the demonstrations' range for
        ``minmax`` (the reference clamps the same way)."""
        return actions.clamp(-1, 1)

    def to_robot(self, vectors: Mapping[str, torch.Tensor], clamp: bool = True) -> dict[str, torch.Tensor]:
        """Normalised vectors -> robot units, float32 on the CPU.

        Args:
            vectors: any of ``actions`` ``(..., K, A)``, ``future_proprio`` / ``proprio`` ``(..., P)``,
                ``value`` ``(...)`` in [-1, 1].
            clamp: clamp generated actions to [-1, 1] first (False for ground truth).

        Returns:
            the same keys: actions and proprio un-normalised; the value mapped to [0, 1].
        """
        out = {}
        for name, x in vectors.items():
            if name == "actions":
                out[name] = self.action_normalizer.unnormalize((self.clamp_actions(x) if clamp else x).double()).float().cpu()
            elif name in ("future_proprio", "proprio"):
                out[name] = self.proprio_normalizer.unnormalize(x.double()).float().cpu()
            elif name == "value":
                out[name] = value_to_unit(x.float()).cpu()
            else:
                raise KeyError(f"to_robot: unknown vector {name!r}")
        return out


__all__ = ["PolicyProcessor", "normalize_proprio", "value_to_unit"]
