"""The reference's side files: dataset statistics JSON and T5 embedding pickle.

* ``dataset_statistics.json``: per-dimension ``actions_min / max / mean / std`` and
  ``proprio_min / max / mean / std`` lists (``actions_median`` / ``proprio_median`` may be there too),
  computed over every step of the training episodes. The reference scales both modalities with
  ``2 (x - min) / (max - min) - 1``, our ``minmax`` normalisation; :func:`read_reference_stats` turns
  the file into our :class:`~cosmos_policy_lightning.normalization.DatasetStats`.
* ``t5_embeddings.pkl``: a plain pickle of ``{instruction: tensor (1, 512, 1024)}``, T5-11B's last
  hidden state zero-padded to 512 tokens (bfloat16). :func:`read_t5_embeddings` unpickles it with a
  loader that only accepts tensors and arrays, and cuts the zero padding off: our text cache stores
  the real tokens and the model pads them back to 512 (``text.py``).
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..embodiment import Embodiment
from ..errors import CosmosPolicyError
from ..normalization import DatasetStats, Stats, fingerprint

#: The identity of the reference's text encoder (``google-t5/t5-11b``, 1024-d, 512 tokens).
REFERENCE_T5_IDENTITY = "t5:google-t5/t5-11b"
_STAT_NAMES = ("min", "max", "mean", "std")
_MODALITIES = {"action": "actions", "proprio": "proprio"}


def read_reference_stats(path: str | Path, embodiment: Embodiment) -> DatasetStats:
    """The reference's ``dataset_statistics.json`` as our statistics.

    The file has no percentiles, so ``q01`` / ``q99`` are set to min / max (``quantile`` normalisation
    then equals ``minmax``) and the row count is unknown (0). The same statistics serve as the
    successful-episode and all-episode ones. The fingerprint hashes the file's bytes.

    Args:
        path: the JSON file.
        embodiment: the robot; its action and proprio dimensions must match the file's.

    Returns:
        :class:`DatasetStats` with ``meta["source"]`` naming the file.

    Raises:
        CosmosPolicyError: unreadable JSON, a missing key, lists of the wrong length, non-finite
            values or ``max < min``.
    """
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
        data = json.loads(raw_bytes)
    except FileNotFoundError:
        raise CosmosPolicyError(f"{path}: statistics file not found") from None
    except (OSError, ValueError) as err:
        raise CosmosPolicyError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, Mapping):
        raise CosmosPolicyError(f"{path}: expected a JSON object with actions_min, ..., proprio_std")
    dims = {"action": embodiment.action.dim, "proprio": embodiment.proprio.dim}
    names = {"action": embodiment.action.names, "proprio": embodiment.proprio.names}
    per_modality: dict[str, Stats] = {}
    for modality, prefix in _MODALITIES.items():
        arrays = {}
        for stat in _STAT_NAMES:
            key = f"{prefix}_{stat}"
            if key not in data:
                raise CosmosPolicyError(f"{path}: missing key {key!r} (expected {prefix}_min/max/mean/std)")
            try:
                arr = np.asarray(data[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise CosmosPolicyError(f"{path}: {key} is not a list of numbers") from None
            if arr.shape != (dims[modality],):
                raise CosmosPolicyError(f"{path}: {key} has shape {arr.shape}, the embodiment {embodiment.name!r} "
                                        f"expects ({dims[modality]},)")
            if not np.isfinite(arr).all():
                raise CosmosPolicyError(f"{path}: {key} contains NaN or inf")
            arrays[stat] = arr
        if (arrays["max"] < arrays["min"]).any():
            dim = int(np.flatnonzero(arrays["max"] < arrays["min"])[0])
            raise CosmosPolicyError(f"{path}: {prefix}_max < {prefix}_min in dimension {dim}")
        per_modality[modality] = Stats(arrays["min"], arrays["max"], arrays["mean"], arrays["std"],
                                       q01=arrays["min"].copy(), q99=arrays["max"].copy(), count=0,
                                       names=tuple(names[modality]) if names[modality] else None)
    digest = hashlib.sha256(raw_bytes).hexdigest()[:16]
    fp = fingerprint(embodiment.action.dim, embodiment.proprio.dim, embodiment.action.chunk_size,
                     [f"reference-statistics:{digest}"])
    return DatasetStats(fp, dict(per_modality), dict(per_modality),
                        {"source": str(path), "format": "reference dataset_statistics.json"})


class _TensorsOnly(pickle.Unpickler):
    """Unpickles tensors, numpy arrays and dicts; refuses every other class (a pickle can run code)."""

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            # the tensor's storage, itself a torch.save stream: read it with torch's restricted loader
            return lambda data: torch.load(io.BytesIO(data), weights_only=True)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(importlib.import_module(module), name)
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only tensors and arrays are expected)")


def read_t5_embeddings(path: str | Path, dim: int | None = 1024) -> dict[str, np.ndarray]:
    """The reference's T5 embedding pickle as ``{instruction: (L, D) float32}``, real tokens only.

    Trailing all-zero token rows are the zero padding to 512 tokens and are cut off (a real token's
    hidden state is never exactly zero); at least one token is kept.

    Args:
        path: the ``.pkl`` file.
        dim: expected embedding width D (None: any, but the same for all instructions).

    Returns:
        instruction -> float32 array ``(L, D)``, ``1 <= L <= 512``, in the file's order.

    Raises:
        CosmosPolicyError: unreadable file, a refused pickle class, a non-string key, or a value that is
            not a finite ``(1, L, D)`` / ``(L, D)`` array of the expected width.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = _TensorsOnly(f).load()
    except FileNotFoundError:
        raise CosmosPolicyError(f"{path}: T5 embedding file not found") from None
    except Exception as err:  # pickle errors of all kinds
        raise CosmosPolicyError(f"{path}: not a readable T5 embedding pickle ({type(err).__name__}: {err})") from None
    if not isinstance(raw, Mapping) or not raw:
        raise CosmosPolicyError(f"{path}: expected a non-empty dict {{instruction: (1, 512, D) tensor}}")
    out: dict[str, np.ndarray] = {}
    width = dim
    for text, value in raw.items():
        if not isinstance(text, str):
            raise CosmosPolicyError(f"{path}: key {text!r} is not an instruction string")
        arr = value.float().cpu().numpy() if hasattr(value, "float") and hasattr(value, "cpu") else np.asarray(value)
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2 or arr.shape[0] < 1 or (width is not None and arr.shape[1] != width):
            raise CosmosPolicyError(f"{path}: embedding of {text!r} has shape {np.shape(value)}, expected (1, L, "
                                    f"{width if width is not None else 'D'})")
        if not np.isfinite(arr).all():
            raise CosmosPolicyError(f"{path}: embedding of {text!r} contains NaN or inf")
        width = arr.shape[1]
        nonzero = np.flatnonzero(np.abs(arr).max(axis=1) > 0)
        length = int(nonzero[-1]) + 1 if nonzero.size else 1
        out[text] = np.ascontiguousarray(arr[:length])
    return out


class PrecomputedTextEncoder:
    """A text "encoder" that looks instructions up in precomputed embeddings, so they can be written
    into a :class:`~cosmos_policy_lightning.text.TextEmbeddingCache` under the real encoder's
    identity.

    Args:
        identity: the identity of the encoder that computed them (e.g. ``t5:google-t5/t5-11b``).
        embeddings: instruction -> ``(L, D)`` array, all of width D.

    Raises:
        CosmosPolicyError: (in :meth:`encode`) an instruction without an embedding.
    """

    def __init__(self, identity: str, embeddings: Mapping[str, np.ndarray]):
        self.identity = identity
        self.embeddings = dict(embeddings)
        widths = {int(np.shape(e)[1]) for e in self.embeddings.values()}
        if len(widths) > 1:
            raise CosmosPolicyError(f"precomputed text embeddings of {identity!r} have several widths {sorted(widths)}")
        self.dim = widths.pop() if widths else 0

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        missing = [t for t in texts if t not in self.embeddings]
        if missing:
            raise CosmosPolicyError(f"no precomputed embedding of instruction {missing[0]!r} ({len(self.embeddings)} "
                                    f"available)")
        return [np.asarray(self.embeddings[t], dtype=np.float32) for t in texts]
