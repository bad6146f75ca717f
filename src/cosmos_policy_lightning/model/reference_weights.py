"""DiT weights from the reference's own checkpoint files (``.pt`` whole-model state dicts).

The Cosmos Policy reference and Cosmos-Predict2 release their models as one ``torch.save``-d state dict
of the whole diffusion model, in their own naming: the DiT under ``net.`` (and its EMA copy under
``net_ema.`` when EMA was on), e.g. ``net.x_embedder.proj.1.weight`` (2048, 72) or
``net.blocks.0.self_attn.q_proj.weight``, next to buffers that carry no weights (``pos_embedder.*``,
``accum_*`` counters, Transformer Engine ``*._extra_state``) and, possibly, other parts of the model.
Examples: ``nvidia/Cosmos-Policy-LIBERO-Predict2-2B/Cosmos-Policy-LIBERO-Predict2-2B.pt`` and the base
model's ``nvidia/Cosmos-Predict2-2B-Video2World/model-480p-16fps.pt``.

Key names are mapped to diffusers' ``CosmosTransformer3DModel`` by diffusers' own single-file
conversion for Cosmos 2.0 (``diffusers.loaders.single_file_utils.
convert_cosmos_transformer_checkpoint_to_diffusers``, the mapping behind ``from_single_file``), which
also drops the weightless buffers; no rename table is kept here. ``from_single_file`` itself is not
used because it fetches a configuration from the Hub and loads non-strictly; instead
``model/dit.py`` (``load_reference_transformer``, and ``build_transformer`` for a ``.pt``) builds the model
from our configuration (18 input channels: the released patch embedding has 18 x 1 x 2 x 2 = 72
columns in our channel order -- 16 latent, condition mask, padding mask) and every weight must match.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CosmosPolicyError, first_line

#: File suffixes of reference checkpoints.
REFERENCE_SUFFIXES = (".pt", ".pth")
#: Prefix of the DiT's weights, and of its EMA copy, in a reference state dict.
NET_PREFIX, EMA_PREFIX = "net.", "net_ema."
#: Containers the state dict may be wrapped in (as diffusers' conversion script unwraps them).
_CONTAINER_KEYS = ("model", "module", "state_dict")


def is_reference_checkpoint(source: Any) -> bool:
    """Whether ``source`` names a reference ``.pt`` / ``.pth`` file: a local file, or a Hub file given
    as ``<org>/<repo>/<path in repo>`` (at least three parts)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = os.fspath(source)
    if not text.endswith(REFERENCE_SUFFIXES) or os.path.isdir(text):
        return False
    return os.path.isfile(text) or len(text.strip("/").split("/")) >= 3


def fetch_file(source: str | os.PathLike, what: str = "file") -> Path:
    """A local path for ``source``: the file itself, or the Hub file ``<org>/<repo>/<path in repo>``
    downloaded (or found in the Hub cache, e.g. with ``HF_HUB_OFFLINE=1``) with ``huggingface_hub``.

    Raises:
        CosmosPolicyError: no such local file and not a Hub file name, or the Hub file cannot be
            fetched (one line).
    """
    text = os.fspath(source)
    if os.path.isfile(text):
        return Path(text)
    parts = text.strip("/").split("/")
    if len(parts) < 3 or text.startswith((".", "/")):
        raise CosmosPolicyError(f"{text}: {what} not found (a Hub file is written <org>/<repo>/<file>)")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as err:  # network, gated repository, missing file, offline cache miss
        first = first_line(err)
        raise CosmosPolicyError(f"{text}: cannot fetch {filename!r} from the Hub repository {repo_id!r} "
                                f"({type(err).__name__}: {first})") from None


def resolve_reference_file(source: str | os.PathLike) -> Path:
    """:func:`fetch_file` for a reference checkpoint (``.pt`` / ``.pth``).

    Raises:
        CosmosPolicyError: not a ``.pt`` / ``.pth`` file, or it cannot be found or fetched (one line).
    """
    text = os.fspath(source)
    if not os.path.isfile(text) and not text.endswith(REFERENCE_SUFFIXES):
        raise CosmosPolicyError(f"{text}: expected a reference checkpoint file ending in .pt or .pth")
    return fetch_file(text, "checkpoint file")


def read_reference_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """Read a reference checkpoint file, memory-mapped (a 2B state dict is not copied into memory).

    Args:
        path: a local ``.pt`` / ``.pth`` file.
        trust_pickle: load with ``weights_only=False`` (runs arbitrary pickled code: only for files
            from a source you trust) when the restricted loader refuses the file.

    Returns:
        the flat state dict (unwrapped from a ``model`` / ``module`` / ``state_dict`` container).

    Raises:
        CosmosPolicyError: unreadable file, objects the restricted loader refuses, or not a mapping.
    """
    path = Path(path)
    try:
        if trust_pickle:
            raw = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        else:
            # Transformer Engine's _extra_state may be pickled as io.BytesIO: allow that class (and bytes).
            with torch.serialization.safe_globals([io.BytesIO, bytes]):
                raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        # torch's restricted loader explains itself on its "WeightsUnpickler error" line
        reason = [line for line in lines if "WeightsUnpickler error" in line]
        first = (reason or lines or [type(err).__name__])[0]
        hint = "" if trust_pickle else " (if you trust its source, pass --trust_pickle true)"
        raise CosmosPolicyError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {first[:200]}){hint}") \
            from None
    for key in _CONTAINER_KEYS:
        if isinstance(raw, Mapping) and key in raw and isinstance(raw[key], Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping):
        raise CosmosPolicyError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                                f"{type(raw).__name__}")
    return dict(raw)


def reference_to_diffusers(state: Mapping[str, Any], ema: bool = False, source: str = "checkpoint") -> dict:
    """The DiT's weights of a reference state dict, renamed to diffusers' ``CosmosTransformer3DModel``.

    Takes the ``net.`` weights (``net_ema.`` with ``ema``), ignores every other part of the model, and
    renames them with diffusers' Cosmos 2.0 single-file conversion, which also drops the weightless
    buffers (``pos_embedder.*``, ``accum_*``, ``*._extra_state``).

    Args:
        state: the reference state dict (:func:`read_reference_state_dict`).
        ema: take the EMA weights.
        source: file name for messages.

    Returns:
        ``{diffusers key: tensor}``.

    Raises:
        CosmosPolicyError: no weights under the chosen prefix (naming the prefixes present).
    """
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    prefix = EMA_PREFIX if ema else NET_PREFIX
    # diffusers' conversion strips "net."; EMA keys are handed to it under that prefix.
    selected = {NET_PREFIX + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        present = sorted({k.split(".", 1)[0] + "." for k in state})[:6]
        other = "--ema false" if ema else "--ema true" if any(k.startswith(EMA_PREFIX) for k in state) else None
        raise CosmosPolicyError(f"{source}: no '{prefix}*' weights (top-level prefixes: {', '.join(present) or 'none'})"
                                + (f"; try {other}" if other else ""))
    return convert_cosmos_transformer_checkpoint_to_diffusers(selected)


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      torch_dtype: torch.dtype | None = None) -> None:
    """Load ``state`` into ``model`` (on the meta device or materialised), every weight accounted for.

    Args:
        model: a ``CosmosTransformer3DModel`` built with the configuration to load into.
        state: diffusers-named weights.
        source: file name for messages.
        torch_dtype: cast the weights to this dtype (None: keep the file's).

    Raises:
        CosmosPolicyError: one line naming the first missing, unexpected or differently shaped weight
            (and how many there are).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weight {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected weight {unexpected[0]!r}"
                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
        raise CosmosPolicyError(f"{source}: does not match the transformer configuration: {'; '.join(parts)} "
                                f"(diffusers names; choose the matching --transformer config)")
    for key, value in own.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise CosmosPolicyError(f"{source}: weight {key!r} has shape {tuple(state[key].shape)}, the transformer "
                                    f"configuration expects {tuple(value.shape)} (choose the matching --transformer "
                                    f"config or text width)")
    tensors = {}
    for key, value in state.items():
        if not torch.is_floating_point(value) or not torch.isfinite(value).all():
            raise CosmosPolicyError(f"{source}: weight {key!r} is not a finite floating-point tensor")
        tensors[key] = value.to(torch_dtype) if torch_dtype is not None else value
    meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(tensors, strict=True, assign=meta)
