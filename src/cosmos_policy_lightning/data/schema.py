"""The shard sample schema: the one contract between ``data/convert.py`` (writer) and
``data/datamodule.py`` (reader).

A converted dataset directory holds::

    train-000000.tar ...          webdataset shards (ShardWriter naming), samples of training episodes
    validation-000000.tar ...     samples of held-out episodes
    stats.json                    normalisation statistics (normalization.DatasetStats) + fingerprint
    manifest.json                 source, embodiment, counts, shard list, settings, finished episodes
    text_embeddings/index.json    instruction -> embedding file, plus the text encoder's identity
    text_embeddings/<sha1>.npy    (L, D) float16 per-token embedding of one instruction

One sample = the tuple ``(s, a, s', V(s'))`` at step ``t`` of an episode (docs/method.md §1), stored under the key
``<episode_id>_<t:06d>`` (episode ids contain no dots) with the members:

==========================  =====================================================================
member                      content
==========================  =====================================================================
``image.<cam>.jpg``         camera ``cam`` at step t, (H, W, 3) uint8 at the embodiment's image_size, JPEG q95
``future_image.<cam>.jpg``  camera ``cam`` at step ``t' = min(t + K, T - 1)``
``proprio.npy``             (proprio_dim,) float32, robot units, step t
``future_proprio.npy``      (proprio_dim,) float32, robot units, step t'
``actions.npy``             (K, action_dim) float32, robot units, ``actions[t:t+K]`` padded by
                            repeating the episode's last action
``meta.json``               {"episode": str, "step": t, "future_step": t', "length": T,
                             "success": bool, "score": float in [0, 1], "value": V(s') in [-1, 1],
                             "instruction": str}
==========================  =====================================================================

Values are not normalised in the shards (statistics are applied when batches are built), so one
conversion serves any normalisation mode.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..storage import is_url, location

IMAGE = "image"
FUTURE_IMAGE = "future_image"
PROPRIO = "proprio.npy"
FUTURE_PROPRIO = "future_proprio.npy"
ACTIONS = "actions.npy"
META = "meta.json"
META_FIELDS = ("episode", "step", "future_step", "length", "success", "score", "value", "instruction")

MANIFEST = "manifest.json"
STATS = "stats.json"
TEXT_DIR = "text_embeddings"
SPLITS = ("train", "validation")


def image_member(camera: str, future: bool = False) -> str:
    """Member name of a camera image: ``image.<cam>.jpg`` or ``future_image.<cam>.jpg``."""
    return f"{FUTURE_IMAGE if future else IMAGE}.{camera}.jpg"


_EPISODE_ID_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


def sanitize_episode_id(raw: str) -> str:
    """Make an episode id safe as a webdataset key prefix (no dots, slashes or spaces)."""
    return _EPISODE_ID_BAD.sub("-", raw).strip("-") or "episode"


def sample_key(episode_id: str, step: int) -> str:
    """Key of the sample at ``step`` of ``episode_id``: ``<episode_id>_<step:06d>``."""
    return f"{episode_id}_{step:06d}"


def load_json(path: str | Path) -> Any:
    """Read a dataset's JSON file (a local path or a URL, ``storage.py``).

    Raises:
        DataError: missing (with the conversion hint) or not valid JSON.
    """
    remote = is_url(path)
    path = location(path)
    if not path.is_file():  # one probe (for a URL, a request)
        if remote:
            raise DataError(f"{path}: not found or not reachable (check the URL, the network and the filesystem's "
                            f"credentials; a dataset gets there with cosmos-policy push-dataset)")
        raise DataError(f"{path}: not found (convert the dataset first: cosmos-policy convert ...)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


