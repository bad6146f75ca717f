"""Robot observations -> the model's input tensors, the way training saw them (docs/method.md §4).

Training images went through the converter (resized to the embodiment's ``image_size`` with PIL's
bilinear filter, stored as JPEG quality 95) and, for a model trained with augmentation, the test-time
centre crop of 90% area. :func:`prepare_images` repeats exactly those steps on a live camera frame, so a
policy sees the same pixels in deployment as in validation. Proprio is normalised with the checkpoint's
statistics; instructions are encoded once by the checkpoint's text encoder and kept in memory
(:class:`InstructionCache`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.augment import test_transform
from ..data.images import encode_jpeg, to_pil
from ..embodiment import Embodiment
from ..errors import CosmosPolicyError
from ..normalization import Normalizer
from ..text import TextEncoder, build_text_encoder


@dataclass
class Observation:
    """What the robot sees at one step.

    Attributes:
        images: camera name -> ``(H, W, 3)`` uint8 RGB frame (any H x W; float frames in [0, 1] are
            accepted too). Every camera of the embodiment must be present.
        proprio: ``(P,)`` proprioception in robot units (the embodiment's ``proprio`` order).
        instruction: the task instruction (ignored by a model trained without text).
    """

    images: Mapping[str, np.ndarray]
    proprio: np.ndarray
    instruction: str = ""

    @classmethod
    def coerce(cls, obs: "Observation | Mapping[str, Any]", instruction: str | None = None) -> "Observation":
        """Accept an :class:`Observation` or a dict with ``images``, ``proprio`` and optionally
        ``instruction`` (the shape :class:`~cosmos_policy_lightning.sim.metaworld.MetaWorldEnv` returns).

        Raises:
            CosmosPolicyError: a required key is missing.
        """
        if isinstance(obs, Observation):
            return obs if instruction is None else Observation(obs.images, obs.proprio, instruction)
        if not isinstance(obs, Mapping) or "images" not in obs or "proprio" not in obs:
            raise CosmosPolicyError("observation: expected an Observation or a dict with 'images' (camera -> "
                                    "HxWx3 uint8) and 'proprio' (robot units)")
        text = instruction if instruction is not None else obs.get("instruction", "")
        return cls(obs["images"], obs["proprio"], str(text or ""))


def prepare_image(frame: Any, size_hw: tuple[int, int], where: str, jpeg_quality: int | None = 95) -> np.ndarray:
    """One camera frame -> ``(H, W, 3)`` uint8 at the model's ``size_hw``, as the converter stores it.

    Args:
        frame: ``(h, w, 3)`` uint8 (or float in [0, 1], checked) array or tensor.
        size_hw: the embodiment's ``image_size`` ``(H, W)``.
        where: message prefix (names the camera).
        jpeg_quality: round-trip through JPEG of this quality like the shards do (None: skip).

    Raises:
        CosmosPolicyError: not an ``(h, w, 3)`` image; a float image outside [0, 1] or with NaN / inf; any
            dtype but uint8 and float (``data.images.frame_to_uint8``; the message gives the observed range).
    """
    arr = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise CosmosPolicyError(f"{where}: expected an (H, W, 3) RGB image, got shape {arr.shape}")
    img = to_pil(arr, size_hw, where)
    if jpeg_quality is not None:
        img = Image.open(io.BytesIO(encode_jpeg(img, jpeg_quality))).convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def prepare_images(observations: Sequence[Observation], embodiment: Embodiment, center_crop: bool,
                   jpeg_quality: int | None = 95) -> torch.Tensor:
    """Camera frames of B observations -> uint8 ``(B, N, H, W, 3)``, cameras in embodiment order.

    Applies :func:`prepare_image` and, when the model was trained with augmentation
    (``center_crop``), the docs/method.md §4 test-time centre crop.

    Raises:
        CosmosPolicyError: a camera is missing or a frame is malformed.
    """
    names = embodiment.camera_names
    out = np.empty((len(observations), len(names), *embodiment.image_size, 3), dtype=np.uint8)
    for b, obs in enumerate(observations):
        missing = [c for c in names if c not in obs.images]
        if missing:
            raise CosmosPolicyError(f"observation {b}: camera {missing[0]!r} missing; embodiment {embodiment.name} "
                                    f"needs {', '.join(names)}, got {', '.join(map(str, obs.images)) or 'none'}")
        for n, cam in enumerate(names):
            out[b, n] = prepare_image(obs.images[cam], embodiment.image_size, f"observation {b}: camera {cam!r}",
                                      jpeg_quality)
    images = torch.from_numpy(out)
    if center_crop:
        flat = images.flatten(0, 1)
        images = test_transform(flat).view_as(images)
    return images


def prepare_proprio(observations: Sequence[Observation], normalizer: Normalizer, dim: int) -> torch.Tensor:
    """Proprio of B observations in robot units -> float32 ``(B, P)`` normalised (docs/method.md §4).

    Warns (once per dimension and normalizer) when a value lies far outside the training range
    (:meth:`~cosmos_policy_lightning.normalization.Normalizer.warn_out_of_range`).

    Raises:
        CosmosPolicyError: not numbers, wrong length or non-finite values.
    """
    rows = []
    for b, obs in enumerate(observations):
        try:
            p = np.asarray(obs.proprio, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise CosmosPolicyError(f"observation {b}: proprio must be numbers (robot units), got "
                                    f"{str(obs.proprio)[:60]!r}") from None
        if p.shape != (dim,) or not np.isfinite(p).all():
            raise CosmosPolicyError(f"observation {b}: expected finite proprio of shape ({dim},), got "
                                    f"{np.asarray(obs.proprio).shape} {p[:8].tolist()}")
        rows.append(p)
    batch = np.stack(rows)
    normalizer.warn_out_of_range(batch, "proprio")
    return torch.as_tensor(np.asarray(normalizer.normalize(batch)), dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def shared_text_encoder(identity: str) -> TextEncoder:
    """The text encoder of ``identity``, built once per process: two policies of the same encoder
    (planning's dual deployment) share one copy of its weights."""
    return build_text_encoder(identity)


class InstructionCache:
    """Instruction -> per-token embedding, encoded once per distinct instruction and kept in memory.

    Embeddings are rounded through float16 and cut to ``max_tokens`` exactly like the dataset's
    ``text_embeddings/`` cache that the model was trained on.

    Args:
        identity: the text encoder identity recorded in the checkpoint (``minilm:...``, ``t5:...``,
            ``none``); ignored when ``encoder`` is given.
        encoder: an already built encoder (``identity``, ``dim``, ``encode``), e.g. to share one.
        max_tokens: token limit (the data module's ``max_text_tokens``).
        precomputed: instruction -> ``(L, D)`` embedding computed beforehand by the same encoder (e.g. the
            reference's T5 embeddings inside an imported checkpoint, or those shipped with a Hub policy);
            these instructions never load the encoder.

    Raises:
        CosmosPolicyError: neither an identity nor an encoder (at the first :meth:`batch`).
    """

    def __init__(self, identity: str | None, encoder: TextEncoder | None = None, max_tokens: int = 512,
                 precomputed: Mapping[str, Any] | None = None):
        self.identity = encoder.identity if encoder is not None else identity
        self._encoder = encoder
        self.max_tokens = int(max_tokens)
        self._cache: dict[str, torch.Tensor] = {}
        self._precomputed = dict(precomputed or {})

    @property
    def encoder(self) -> TextEncoder:
        """The encoder, built on first use from the recorded identity (loading a text model is slow)."""
        if self._encoder is None:
            if not self.identity:
                raise CosmosPolicyError("policy: the checkpoint records no text encoder; pass text_encoder=... "
                                        "(e.g. build_text_encoder('minilm'))")
            self._encoder = shared_text_encoder(self.identity)
        return self._encoder

    def get(self, instruction: str) -> torch.Tensor:
        """``(L, D)`` float32 embedding of ``instruction`` (``(0, 0)`` for a text-free model)."""
        if instruction not in self._cache:
            if not isinstance(instruction, str):
                raise CosmosPolicyError(f"policy: instruction must be a string, got {type(instruction).__name__}")
            if instruction in self._precomputed:
                emb = self._precomputed[instruction]
                emb = emb.float().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb, dtype=np.float32)
            else:
                emb = np.asarray(self.encoder.encode([instruction])[0])
            emb = emb[: self.max_tokens].astype(np.float16).astype(np.float32)
            self._cache[instruction] = torch.from_numpy(np.ascontiguousarray(emb))
        return self._cache[instruction]

    def batch(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of B instructions, zero-padded like the data module's collate.

        Returns:
            ``text`` float32 ``(B, L, D)`` and ``text_mask`` bool ``(B, L)`` (True on real tokens);
            ``(B, 0, 0)`` / ``(B, 0)`` for a text-free model.
        """
        embs = [self.get(t) for t in instructions]
        dim = embs[0].shape[1] if embs[0].ndim == 2 else 0
        length = max(e.shape[0] for e in embs)
        text = torch.zeros(len(embs), length, dim)
        mask = torch.zeros(len(embs), length, dtype=torch.bool)
        for i, e in enumerate(embs):
            text[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return text, mask
