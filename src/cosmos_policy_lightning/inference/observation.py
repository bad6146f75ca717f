"""Robot observations -> the model's input tensors, the way training saw them (docs/method.md §4).

Training images went through the converter (resized to the embodiment's ``image_size`` with PIL's
bilinear filter, stored as JPEG quality 95) and, for a model trained with augmentation, the test-time
centre crop of 90% area. :func:`prepare_images` repeats exactly those steps on a live camera frame, so a
policy sees the same pixels in deployment as in validation. Proprio, actions and instructions go
through ``processor.py``, shared with training.
"""

from __future__ import annotations

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


@dataclass
class Observation:
    """What the robot sees at one step.

    Attributes:
        images: camera name -> ``(H, W, 3)`` uint8 RGB frame (any H x W; float frames in [0, 1] are
            accepted too). Every camera of the embodiment must be present.
        proprio: ``(P,)`` proprioception in robot units (the embodiment's ``proprio`` order).
        instruction: the task instruction (ignored by a model trained without text); None: not given (a
            text-conditioned policy refuses it, as the server does).
    """

    images: Mapping[str, np.ndarray]
    proprio: np.ndarray
    instruction: str | None = None

    @classmethod
    def coerce(cls, obs: "Observation | Mapping[str, Any]", instruction: str | None = None) -> "Observation":
        """Accept an :class:`Observation` or a dict with ``images``, ``proprio`` and optionally
        ``instruction`` (the observation of a simulator environment, ``sim/env.py``).

        Raises:
            CosmosPolicyError: a required key is missing.
        """
        if isinstance(obs, Observation):
            return obs if instruction is None else Observation(obs.images, obs.proprio, instruction)
        if not isinstance(obs, Mapping) or "images" not in obs or "proprio" not in obs:
            raise CosmosPolicyError("observation: expected an Observation or a dict with 'images' (camera -> "
                                    "HxWx3 uint8) and 'proprio' (robot units)")
        text = instruction if instruction is not None else obs.get("instruction", obs.get("prompt"))
        return cls(obs["images"], obs["proprio"], None if text is None else str(text))


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
        CosmosPolicyError: a camera is missing, one the embodiment does not have is given (misnamed, or
            another robot's), or a frame is malformed.
    """
    names = embodiment.camera_names
    out = np.empty((len(observations), len(names), *embodiment.image_size, 3), dtype=np.uint8)
    for b, obs in enumerate(observations):
        extra = [str(c) for c in obs.images if c not in names]
        if extra:
            raise CosmosPolicyError(f"observation {b}: camera {extra[0]!r} is not a camera of embodiment "
                                    f"{embodiment.name!r} (cameras {', '.join(names)}): misnamed, or an observation "
                                    f"of another robot")
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


__all__ = ["Observation", "prepare_image", "prepare_images"]
