"""Batch -> pixel sequence -> latents with injected vectors, and back (docs/method.md §1).

The steps between a collated batch (see ``data/datamodule.py``) and the diffusion model:

1. :func:`build_pixel_sequence`: one black frame, then 4 identical pixel frames per slot (an image
   slot holds its camera's image, every other slot black).
2. :func:`encode_pixel_sequence`: the VAE encodes the sequence in one call (causal VAE: never frame
   by frame), up to the last camera slot.
3. :func:`inject_vectors`: overwrite the placeholder latents of proprio / action / value slots.
4. :func:`read_vectors`: the inverse of 3 on generated latents (average over tiled copies).

Training, the latent cache (through :class:`PixelSequenceEncoder`) and deployment
(``inference/policy.py``) all call these functions; none of them builds or reads a sequence its own way.
"""

from __future__ import annotations

import torch

from ..injection import extract, inject
from ..layout import PIXELS_PER_LATENT, SequenceLayout


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` in [0, 255] -> float ``(..., 3, H, W)`` in [-1, 1]."""
    return images.permute(*range(images.dim() - 3), -1, -3, -2).float().div(127.5).sub(1.0)


def unit_range_to_images(pixels: torch.Tensor) -> torch.Tensor:
    """float ``(..., 3, H, W)`` in [-1, 1] -> uint8 ``(..., H, W, 3)``."""
    x = pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(*range(x.dim() - 3), -2, -1, -3)


def build_pixel_sequence(layout: SequenceLayout, images: torch.Tensor, future_images: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Assemble the VAE input clip.

    Args:
        layout: the sequence layout.
        images, future_images: uint8 ``(B, N, H, W, 3)``, cameras in layout order.

    Returns:
        ``(B, 3, num_pixel_frames, H, W)`` in [-1, 1]; black (-1) everywhere but the image slots.
    """
    b, n, h, w, _ = images.shape
    if n != len(layout.camera_names):
        raise ValueError(f"batch has {n} cameras, layout {layout.embodiment!r} expects {len(layout.camera_names)}")
    cur = images_to_unit_range(images).to(dtype)          # (B, N, 3, H, W)
    fut = images_to_unit_range(future_images).to(dtype)
    pixels = torch.full((b, 3, layout.num_pixel_frames, h, w), -1.0, dtype=dtype, device=images.device)
    for i, cam in enumerate(layout.camera_names):
        for frames, slot in ((cur, f"image/{cam}"), (fut, f"future_image/{cam}")):
            first, last = layout.slot(slot).pixel_frames
            pixels[:, :, first:last + 1] = frames[:, i].unsqueeze(2).expand(-1, -1, PIXELS_PER_LATENT, -1, -1)
    return pixels


def last_image_latent(layout: SequenceLayout) -> int:
    """Latent index of the last camera slot (current or future) of the layout."""
    return max(s.latent_index for s in layout.slots if s.name.startswith(("image/", "future_image/")))


@torch.no_grad()
def encode_pixel_sequence(layout: SequenceLayout, vae, images: torch.Tensor, future_images: torch.Tensor | None,
                          through: str = "all") -> torch.Tensor:
    """VAE latents of the layout's pixel sequence (steps 1-2 of the module docstring).

    The Wan VAE is causal (latent frame i depends only on pixel frames up to 4i), so only the pixel
    prefix up to the last camera slot that is needed is encoded; the latent frames after it are zeros
    (:func:`inject_vectors` overwrites the vector slots anyway). The result equals encoding the whole
    sequence in one call on every frame it keeps, at 8/9 of the cost for one- to three-camera layouts.

    Args:
        layout: the sequence layout.
        vae: a :class:`~cosmos_policy_lightning.model.vae.VideoVAE`.
        images, future_images: uint8 ``(B, N, H, W, 3)``, cameras in layout order.
        through: ``all`` (training, the latent cache: current and future camera slots) or ``current``
            (deployment: the future is unknown, so only up to the last *current* camera slot;
            ``future_images`` is ignored and may be None).

    Returns:
        float32 ``(B, 16, T, H / 8, W / 8)`` normalised latents.
    """
    if through == "current":
        last = max(layout.indices("image", "current"))
        future_images = images  # never encoded: the prefix ends before the first future slot
    elif through == "all":
        last = last_image_latent(layout)
    else:
        raise ValueError(f"encode_pixel_sequence: through must be 'all' or 'current', got {through!r}")
    pixels = build_pixel_sequence(layout, images, future_images)[:, :, : layout.slots[last].pixel_frames[1] + 1]
    prefix = vae.encode(pixels).float()
    if last + 1 == layout.num_latent_frames:
        return prefix
    b, c, _, h, w = prefix.shape
    latents = prefix.new_zeros(b, c, layout.num_latent_frames, h, w)
    latents[:, :, : last + 1] = prefix
    return latents


class PixelSequenceEncoder:
    """:func:`encode_pixel_sequence` bound to one VAE, with that VAE's identity: what the latent cache
    (``data/latent_cache.py``) needs from the model, without the data package importing it.

    Attributes:
        fingerprint: the VAE's :meth:`~cosmos_policy_lightning.model.vae.VideoVAE.weights_fingerprint`.
    """

    def __init__(self, vae):
        self.vae = vae
        self.fingerprint: str = vae.weights_fingerprint()

    def __call__(self, layout: SequenceLayout, images: torch.Tensor, future_images: torch.Tensor) -> torch.Tensor:
        """``(B, 16, T, h, w)`` latents of B samples (uint8 ``(B, N, H, W, 3)`` images each)."""
        return encode_pixel_sequence(layout, self.vae, images, future_images)


def write_slot(latents: torch.Tensor, layout: SequenceLayout, slot: str, vector: torch.Tensor) -> torch.Tensor:
    """Write one normalised vector into its slot's latent frame (tiled, docs/method.md §1), in place.

    Args:
        latents: ``(B, C, T, h, w)``.
        slot: ``proprio`` / ``future_proprio`` (``(B, P)``), ``action`` (``(B, K, A)``, flattened row-major,
            time-major) or ``value`` (``(B,)``); values in [-1, 1].

    Returns:
        ``latents``.
    """
    ndim = {"action": 2, "value": 0}.get(slot, 1)
    shape = latents.shape[1:2] + latents.shape[3:]
    latents[:, :, layout.index(slot)] = inject(vector.to(latents.dtype), shape, vector_ndim=ndim)
    return latents


def inject_vectors(latents: torch.Tensor, layout: SequenceLayout, proprio: torch.Tensor,
                   future_proprio: torch.Tensor, actions: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write all four normalised vectors of a training sample into their slots (:func:`write_slot`), in
    place, and return ``latents``.

    Args:
        latents: ``(B, C, T, h, w)`` VAE latents of the pixel sequence.
        proprio, future_proprio: ``(B, P)`` in [-1, 1].
        actions: ``(B, K, A)`` in [-1, 1].
        value: ``(B,)`` in [-1, 1].
    """
    for slot, vector in (("proprio", proprio), ("future_proprio", future_proprio), ("action", actions),
                         ("value", value)):
        write_slot(latents, layout, slot, vector)
    return latents


def read_vectors(latents: torch.Tensor, layout: SequenceLayout, proprio_dim: int, chunk_size: int,
                 action_dim: int) -> dict[str, torch.Tensor]:
    """Extract normalised vectors from generated latents ``(B, C, T, h, w)`` (docs/method.md §1).

    Returns:
        ``{"actions": (B, K, A), "future_proprio": (B, P), "proprio": (B, P), "value": (B,)}``, in the
        normalised [-1, 1] space (value not yet mapped to [0, 1]).
    """
    frame = lambda name: latents[:, :, layout.index(name)].float()  # noqa: E731
    return {
        "actions": extract(frame("action"), chunk_size * action_dim).unflatten(-1, (chunk_size, action_dim)),
        "future_proprio": extract(frame("future_proprio"), proprio_dim),
        "proprio": extract(frame("proprio"), proprio_dim),
        "value": extract(frame("value"), 1).squeeze(-1),
    }
