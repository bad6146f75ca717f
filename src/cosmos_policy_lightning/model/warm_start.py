"""Start a fit from another checkpoint's DiT weights only (the planning fine-tune of docs/method.md §2, §5).

``--ckpt_path`` resumes a run: optimizer state, step counter and schedule included. Fine-tuning a
trained model on rollouts is a new run (new data, new objective mix, fresh optimizer and warm-up),
so only the network weights are taken over. Normalisation statistics are *not* taken over: they come
from the new data module like in any run, so the checkpoint written by the fine-tune is
self-consistent (its statistics are the ones its training batches were normalised with).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CosmosPolicyError

DIT_PREFIX = "dit."


def load_dit_weights(dit: nn.Module, path: str | Path) -> int:
    """Copy the ``dit.*`` weights of a Lightning checkpoint into ``dit`` (strict: same architecture).

    Args:
        dit: the freshly built :class:`~cosmos_policy_lightning.model.dit.VideoDiT` (before sharding).
        path: a checkpoint written by ``cosmos-policy fit`` (a single ``.ckpt`` file).

    Returns:
        the number of tensors loaded.

    Raises:
        CosmosPolicyError: missing / unreadable file, no DiT weights, or a different architecture
            (missing, unexpected or differently shaped tensors; the message names the first).
    """
    path = Path(path)
    if not path.is_file():
        raise CosmosPolicyError(f"init_from_checkpoint: {path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # corrupt zip / pickle
        raise CosmosPolicyError(f"init_from_checkpoint: {path}: not a readable checkpoint "
                                f"({type(err).__name__})") from None
    state = {k[len(DIT_PREFIX):]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith(DIT_PREFIX)}
    if not state:
        raise CosmosPolicyError(f"init_from_checkpoint: {path}: no '{DIT_PREFIX}*' weights in its state_dict")
    own = dit.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CosmosPolicyError(f"init_from_checkpoint: {path}: DiT architecture differs ({what}; "
                                f"{len(missing)} missing, {len(extra)} unexpected tensors)")
    for key, value in own.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise CosmosPolicyError(f"init_from_checkpoint: {path}: {key} has shape {tuple(state[key].shape)}, the "
                                    f"model expects {tuple(value.shape)} (different transformer config or text width)")
    meta = any(p.is_meta for p in dit.parameters())
    dit.load_state_dict(state, strict=True, assign=meta)
    return len(state)
