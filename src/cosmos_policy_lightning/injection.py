"""Writing low-dimensional vectors into latent frames and reading them back (docs/method.md §1).

Injection: flatten the (already normalised) vector row-major -- an action chunk ``(K, d)`` becomes
``a[0,0], a[0,1], ..., a[1,0], ...`` (time-major) -- tile it ``ceil(V / L)`` times, truncate to the frame
volume ``V = C'·H'·W'`` and reshape row-major to ``(C', H', W')``. A scalar (the value) therefore
fills the whole volume.

Extraction: flatten, keep the first ``floor(V / L) · L`` values, reshape to ``(floor(V/L), L)`` and
average the copies; a trailing partial copy is ignored. For ``L = 1`` this is the mean of the volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_fits(length: int, frame_shape: Sequence[int], what: str = "vector") -> None:
    """Raise ValueError if a vector of ``length`` values cannot be written into one latent frame."""
    volume = math.prod(frame_shape)
    if length <= 0:
        raise ValueError(f"{what}: expected at least one value, got length {length}")
    if length > volume:
        raise ValueError(f"{what}: {length} values do not fit in a latent frame of shape "
                         f"{tuple(frame_shape)} ({volume} values)")


def inject(vector: torch.Tensor, frame_shape: Sequence[int], vector_ndim: int = 1) -> torch.Tensor:
    """Tile a vector into a latent-frame volume.

    Args:
        vector: ``(..., L)`` (``vector_ndim=1``), or ``(..., K, d)`` for an action chunk
            (``vector_ndim=2``, flattened row-major, time-major), or a scalar-per-sample ``(...)`` with
            ``vector_ndim=0``. Values should already be normalised to [-1, 1].
        frame_shape: ``(C', H', W')``.
        vector_ndim: how many trailing dims of ``vector`` form one vector.

    Returns:
        ``(..., C', H', W')`` tensor, same dtype / device as ``vector``.

    Raises:
        ValueError: the flattened length exceeds the frame volume.
    """
    if vector_ndim == 0:
        vector = vector.unsqueeze(-1)
    elif vector_ndim == 2:
        vector = vector.flatten(-2)
    elif vector_ndim != 1:
        raise ValueError(f"vector_ndim must be 0, 1 or 2, got {vector_ndim}")
    length = vector.shape[-1]
    check_fits(length, frame_shape)
    volume = math.prod(frame_shape)
    reps = math.ceil(volume / length)
    tiled = vector.repeat(*([1] * (vector.dim() - 1)), reps)[..., :volume]
    return tiled.reshape(*vector.shape[:-1], *frame_shape)


def extract(volume: torch.Tensor, length: int, frame_ndim: int = 3) -> torch.Tensor:
    """Read a vector of ``length`` values back out of a latent-frame volume by averaging its copies.

    Args:
        volume: ``(..., C', H', W')`` generated latent frame (``frame_ndim`` trailing dims).
        length: ``L``, the vector length (``K * d`` for an action chunk, 1 for the value).

    Returns:
        ``(..., L)`` mean over the ``floor(V / L)`` full copies.

    Raises:
        ValueError: ``length`` exceeds the frame volume.
    """
    frame_shape = volume.shape[-frame_ndim:]
    check_fits(length, frame_shape)
    flat = volume.flatten(-frame_ndim)
    copies = flat.shape[-1] // length
    return flat[..., : copies * length].unflatten(-1, (copies, length)).mean(dim=-2)
