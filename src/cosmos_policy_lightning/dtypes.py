"""Floating dtype names (``"bfloat16"``, ``"float32"``, ...) as they appear in configs and on the command line."""

from __future__ import annotations

from .errors import CosmosPolicyError


def dtype_from_name(name, where: str = "dtype"):
    """``"bfloat16"`` / ``"float32"`` / ``"float16"`` (or a ``torch.dtype``) -> ``torch.dtype``; None -> float32.

    Raises:
        CosmosPolicyError: not the name of a floating torch dtype (the message starts with ``where``).
    """
    import torch

    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise CosmosPolicyError(f"{where}: must be a floating dtype such as float32, bfloat16 or float16, got {name!r}")
    return dt


__all__ = ["dtype_from_name"]
