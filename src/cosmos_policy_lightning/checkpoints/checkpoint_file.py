"""Checkpoint files of ``cosmos-policy fit`` (single-file Lightning ``.ckpt``): cheap integrity checks and reading.

Both refuse a bad file in one line: a truncated or corrupt archive, a sharded (FSDP) folder where one
file is needed, a file that is not a Cosmos Policy checkpoint.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from ..errors import CosmosPolicyError


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse a checkpoint file that cannot be a whole ``torch.save`` archive, cheaply: a truncated
    ``.ckpt`` (a full disk, a copy or a job killed while saving) lacks the zip central directory at its
    end, or has members that reach past its end. Reads only the archive's directory; a distributed
    (sharded) checkpoint folder is left to its loader.

    Raises:
        CosmosPolicyError: one line naming the file and what is wrong.
    """
    path = Path(path)
    if path.is_dir() or not path.exists():
        return  # sharded checkpoint folder, or missing: Lightning names a missing file itself
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename} reaches past the end of the file")
    except zipfile.BadZipFile as err:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80" and str(err) == "File is not a zip file":
                return  # a legacy (pre-zip) torch.save file: nothing cheap to check
        raise CosmosPolicyError(f"{path}: not a readable checkpoint ({err}; {size} bytes): truncated or corrupt "
                                f"-- use another checkpoint (e.g. an earlier one) or start without --ckpt_path") from None


def read_checkpoint_file(path: str | Path) -> dict:
    """Load a ``cosmos-policy fit`` checkpoint's dict (memory-mapped: the weights are not read twice).

    Raises:
        CosmosPolicyError: a sharded (FSDP) directory, a missing or unreadable file, or a file without the
            ``cosmos_policy`` entry (one line each).
    """
    from ..model.module import CHECKPOINT_KEY

    path = Path(path)
    if path.is_dir():
        raise CosmosPolicyError(f"{path}: a sharded (FSDP) checkpoint directory; consolidate it into one file "
                                f"first: python -m lightning.fabric.utilities.consolidate_checkpoint {path}")
    if not path.is_file():
        raise CosmosPolicyError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # pickle / zip errors of a corrupt file
        raise CosmosPolicyError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or CHECKPOINT_KEY not in raw:
        raise CosmosPolicyError(f"{path}: not a Cosmos Policy checkpoint (no {CHECKPOINT_KEY!r} entry)")
    return raw


__all__ = ["check_checkpoint_file", "read_checkpoint_file"]
