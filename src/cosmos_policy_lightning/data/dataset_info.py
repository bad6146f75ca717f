"""A converted dataset's metadata, read and cross-checked without opening a shard (docs/method.md §4).

``manifest.json`` (written by ``data/convert.py``, schema in ``data/schema.py``), ``stats.json`` and
``text_embeddings/index.json`` become one :class:`DatasetInfo`: the robot, the statistics (fingerprint
checked against the manifest), the text encoder and, per split, the shards with their sample counts,
sizes and checksums. The data module, the latent cache and the CLI links read datasets through
:func:`read_dataset_info` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..embodiment import Embodiment
from ..errors import CosmosPolicyError, DataError
from ..normalization import DatasetStats
from ..storage import is_url, location
from ..text import INDEX_FILE, TextEmbeddingCache
from . import schema as S
from .schema import load_json


@dataclass(frozen=True)
class SplitInfo:
    """One split of a converted dataset.

    Attributes:
        shards: absolute shard paths, in manifest order.
        samples: samples per shard (None where the manifest does not say).
        success_episodes, failure_episodes: episode counts by outcome (None = unknown).
        bytes, sha256: per shard, the size and checksum the manifest records (None where it does not;
            ``data/integrity.py``).
    """

    shards: tuple[str, ...]
    samples: tuple[int | None, ...]
    success_episodes: int | None = None
    failure_episodes: int | None = None
    bytes: tuple[int | None, ...] = ()
    sha256: tuple[str | None, ...] = ()

    @property
    def total_samples(self) -> int | None:
        """Sum of :attr:`samples`, or None when any shard's count is unknown."""
        return None if any(n is None for n in self.samples) else sum(self.samples)  # type: ignore[arg-type]

    @property
    def has_success(self) -> bool | None:
        return None if self.success_episodes is None else self.success_episodes > 0

    @property
    def has_failure(self) -> bool | None:
        return None if self.failure_episodes is None else self.failure_episodes > 0


@dataclass(frozen=True)
class DatasetInfo:
    """Everything about a converted dataset that is known without reading a shard.

    Attributes:
        data_dir: the dataset directory: a ``pathlib.Path``, or a ``UPath`` for a URL (``storage.py``).
        embodiment: the robot (the given one, checked against the manifest's; else the manifest's).
        stats: normalisation statistics (``stats.json``), fingerprint checked against the manifest.
        manifest: ``manifest.json`` as a dict.
        text_encoder: identity of the encoder of ``text_embeddings/`` (e.g. ``minilm:all-MiniLM-L6-v2``);
            ``"none"`` for a dataset converted without text (then ``text`` is ``(B, 0, 0)``).
        text_dim: its embedding width D (0 without text).
        splits: ``{"train": SplitInfo, "validation": SplitInfo}``.
    """

    data_dir: Path
    embodiment: Embodiment
    stats: DatasetStats
    manifest: dict
    text_encoder: str
    text_dim: int
    splits: dict[str, SplitInfo] = field(default_factory=dict)



def is_converted(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds a finished conversion (its manifest says ``complete``).

    Raises:
        DataError: the manifest exists but is not valid JSON.
    """
    manifest = location(data_dir) / S.MANIFEST
    return manifest.is_file() and load_json(manifest).get("status") == "complete"


def _check_same_robot(given: Embodiment, stored: Embodiment, manifest_path: Path) -> None:
    """Refuse shards written for another robot: everything baked into the shards must agree (camera
    set, image size, dims, chunk size, discount of the stored values). Camera *order* may differ:
    images are stored by camera name and batched in the given embodiment's order."""
    diff = given.difference(stored, "data")  # the one rule (embodiment.COMPATIBILITY)
    if diff is not None:
        name, mine, theirs = diff
        name = "cameras" if name == "camera_set" else name
        raise DataError(f"{manifest_path}: shards were written for embodiment {stored.name!r} with {name} = "
                            f"{theirs}, but embodiment {given.source} has {name} = {mine}")


def _outcome(counts: dict, key: str) -> int | None:
    value = counts.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _split_info(manifest: dict, split: str, data_dir: Path, manifest_path: Path) -> SplitInfo:
    """The shards of ``split`` as the converter lists them: one flat ``shards`` list of
    ``{"name", "split", "samples", "bytes", "sha256", ...}`` entries (``bytes`` / ``sha256`` are absent from
    datasets converted before the integrity checks existed), and per-split episode ``counts``."""
    listed = manifest.get("shards")
    if not isinstance(listed, list):
        raise DataError(f"{manifest_path}: expected a 'shards' list (re-run the conversion)")
    shards, samples, sizes, digests = [], [], [], []
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{manifest_path}: shard entry {i} has no file name")
        if entry.get("split") != split:
            continue
        path = data_dir / entry["name"]
        # (remote shards are not probed one by one here: set-up checks every size, data/integrity.py)
        if not is_url(path) and not path.is_file():
            raise DataError(f"{manifest_path}: lists shard {entry['name']}, which is missing from {data_dir}")
        shards.append(str(path))
        samples.append(int(entry["samples"]) if entry.get("samples") is not None else None)
        sizes.append(int(entry["bytes"]) if entry.get("bytes") is not None else None)
        digests.append(entry.get("sha256"))
    counts = (manifest.get("counts") or {}).get(split) or {}
    # Presence of successes / failures is what the mixer needs (episode counts).
    return SplitInfo(tuple(shards), tuple(samples), _outcome(counts, "successes"), _outcome(counts, "failures"),
                     tuple(sizes), tuple(digests))


def read_dataset_info(data_dir: str | Path, embodiment: str | Path | None = None) -> DatasetInfo:
    """Read and cross-check a converted dataset's metadata without opening a shard (cheap: a few
    small JSON files). This is what the CLI links into the model (embodiment, text width).

    Args:
        data_dir: the converted dataset directory, or its URL (any fsspec protocol, ``storage.py``).
        embodiment: embodiment YAML path to use instead of the manifest's; it must describe the same
            robot (cameras, image size, dims, chunk size, gamma) -- its normalisation modes may differ.

    Returns:
        the :class:`DatasetInfo`.

    Raises:
        DataError: a file is missing or malformed, the statistics' fingerprint differs from the
            manifest's ``stats_fingerprint``, or the embodiment does not match the shards.
        EmbodimentError: the embodiment YAML (or the manifest's copy) is invalid.
    """
    data_dir = location(data_dir)
    if not is_url(data_dir) and not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset directory not found")
    manifest_path, stats_path = data_dir / S.MANIFEST, data_dir / S.STATS
    manifest = load_json(manifest_path)
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path}: expected a JSON object")
    status = manifest.get("status", "complete")
    if status != "complete":
        raise DataError(f"{manifest_path}: conversion not finished (status {status!r}); run the same "
                        f"cosmos-policy convert command again to complete it")
    if not isinstance(manifest.get("embodiment"), dict):
        raise DataError(f"{manifest_path}: missing the 'embodiment' mapping")
    stored = Embodiment.from_dict(manifest["embodiment"], source=f"{manifest_path}:embodiment")
    if embodiment is not None:
        robot = Embodiment.from_yaml(embodiment)
        _check_same_robot(robot, stored, manifest_path)
    else:
        robot = stored

    if not stats_path.is_file():
        raise DataError(f"{stats_path}: statistics file not found")
    try:
        stats = DatasetStats.load(stats_path)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(str(err)) from None
    expected = manifest.get("stats_fingerprint")
    if not isinstance(expected, str):
        raise DataError(f"{manifest_path}: missing 'stats_fingerprint'")
    if stats.fingerprint != expected:
        raise DataError(f"{stats_path}: fingerprint {stats.fingerprint} does not match stats_fingerprint {expected} "
                        f"of {manifest_path}; the statistics are stale -- re-run the conversion")
    digest = manifest.get("stats_sha256")  # absent from datasets converted before it was recorded
    if isinstance(digest, str):
        from .integrity import file_sha256

        got = file_sha256(stats_path)
        if got != digest:
            raise DataError(f"{stats_path}: content differs from the stats_sha256 recorded in {manifest_path} "
                            f"(expected {digest[:16]}..., got {got[:16]}...): the statistics were changed after "
                            f"the conversion -- re-run the conversion (--overwrite) instead of editing them")
    for modality, dim in (("action", robot.action.dim), ("proprio", robot.proprio.dim)):
        have = (stats.successful.get(modality) or stats.all.get(modality))
        if have is None or have.dim != dim:
            raise DataError(f"{stats_path}: {modality} statistics have dim {None if have is None else have.dim}, "
                            f"expected {dim} ({robot.source})")

    text_dir = data_dir / S.TEXT_DIR
    try:
        cache = TextEmbeddingCache(text_dir)
    except CosmosPolicyError as err:
        raise DataError(str(err)) from None
    if cache.identity is None:
        # A conversion with --text_encoder none writes no cache: no text conditioning, D = 0.
        if "text_encoder" in manifest and manifest["text_encoder"] in (None, "none"):
            identity, dim = "none", 0
        else:
            raise DataError(f"{text_dir / INDEX_FILE}: text-embedding index not found (convert the dataset first)")
    else:
        identity, dim = cache.identity, int(cache.dim)
        declared = manifest.get("text_encoder")
        if declared not in (None, identity):
            raise DataError(f"{text_dir / INDEX_FILE}: embeddings of encoder {identity!r}, but {manifest_path} "
                            f"names text_encoder {declared!r}")

    splits = {split: _split_info(manifest, split, data_dir, manifest_path) for split in S.SPLITS}
    return DatasetInfo(data_dir, robot, stats, manifest, identity, dim, splits)


__all__ = ["DatasetInfo", "SplitInfo", "is_converted", "read_dataset_info"]
