"""Batch -> pixel sequence -> latents with injected vectors, and back (docs/method.md §1).

The steps between a collated batch (see ``data/datamodule.py``) and the diffusion model:

1. :func:`build_pixel_sequence`: one black frame, then 4 identical pixel frames per slot (an image
   slot holds its camera's image, every other slot black).
2. :func:`encode_pixel_sequence`: the VAE encodes the sequence in one call (causal VAE: never frame
   by frame), up to the last camera slot.
3. :func:`inject_vectors`: overwrite the placeholder latents of proprio / action / value slots.
4. :func:`read_vectors`: the inverse of 3 on generated latents (average over tiled copies).
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
def encode_pixel_sequence(layout: SequenceLayout, vae, images: torch.Tensor,
                          future_images: torch.Tensor) -> torch.Tensor:
    """VAE latents of the layout's pixel sequence (steps 1-2 of the module docstring).

    The Wan VAE is causal (latent frame i depends only on pixel frames up to 4i), so only the pixel
    prefix up to the last camera slot is encoded; the latent frames after it (the value slot, and any
    other vector slot there) are zeros -- :func:`inject_vectors` overwrites them anyway. The result
    equals encoding the whole sequence in one call on every frame that survives injection, at 8/9 of
    the cost for one- to three-camera layouts.

    Args:
        layout: the sequence layout.
        vae: a :class:`~cosmos_policy_lightning.model.vae.VideoVAE`.
        images, future_images: uint8 ``(B, N, H, W, 3)``, cameras in layout order.

    Returns:
        float32 ``(B, 16, T, H / 8, W / 8)`` normalised latents.
    """
    last = last_image_latent(layout)
    pixels = build_pixel_sequence(layout, images, future_images)[:, :, : layout.slots[last].pixel_frames[1] + 1]
    prefix = vae.encode(pixels).float()
    if last + 1 == layout.num_latent_frames:
        return prefix
    b, c, _, h, w = prefix.shape
    latents = prefix.new_zeros(b, c, layout.num_latent_frames, h, w)
    latents[:, :, : last + 1] = prefix
    return latents


def inject_vectors(latents: torch.Tensor, layout: SequenceLayout, proprio: torch.Tensor,
                   future_proprio: torch.Tensor, actions: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write normalised vectors into their slots (docs/method.md §1), in place, and return ``latents``.

    Args:
        latents: ``(B, C, T, h, w)`` VAE latents of the pixel sequence.
        proprio, future_proprio: ``(B, P)`` in [-1, 1].
        actions: ``(B, K, A)`` in [-1, 1] (flattened row-major, time-major).
        value: ``(B,)`` in [-1, 1].
    """
    shape = latents.shape[1:2] + latents.shape[3:]
    dt = latents.dtype
    latents[:, :, layout.index("proprio")] = inject(proprio.to(dt), shape)
    latents[:, :, layout.index("future_proprio")] = inject(future_proprio.to(dt), shape)
    latents[:, :, layout.index("action")] = inject(actions.to(dt), shape, vector_ndim=2)
    latents[:, :, layout.index("value")] = inject(value.to(dt), shape, vector_ndim=0)
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


def value_to_unit(value: torch.Tensor) -> torch.Tensor:
    """Map a value in [-1, 1] to [0, 1] by ``(v + 1) / 2`` and clamp (docs/method.md §1)."""
    return ((value + 1) / 2).clamp(0, 1)
