"""Datasets named by a Hugging Face Hub id instead of a local path.

``SOURCE`` is a Hub dataset when it is ``hf://datasets/<org>/<name>[@<revision>]``, or
``<org>/<name>`` and no such local path exists. The files are fetched with
``huggingface_hub.snapshot_download(repo_type="dataset")`` into the usual Hugging Face cache
(``HF_HUB_CACHE`` / ``HF_HOME``), limited to the patterns the reader needs; with ``HF_HUB_OFFLINE=1``
the cached snapshot is used and nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import DataError

HUB_PREFIX = "hf://datasets/"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def parse_hub_source(source: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` if ``source`` names a Hub dataset, else None (a local path).

    ``hf://datasets/lerobot/pusht@v3.0`` -> ``("lerobot/pusht", "v3.0")``; ``lerobot/pusht`` ->
    ``("lerobot/pusht", None)`` unless a local ``lerobot/pusht`` exists.

    Raises:
        DataError: an ``hf://`` address that is not ``hf://datasets/<org>/<name>``.
    """
    text = str(source)
    if text.startswith("hf://"):
        if not text.startswith(HUB_PREFIX):
            raise DataError(f"{text}: expected hf://datasets/<org>/<name> (only Hub datasets can be converted)")
        repo, _, revision = text[len(HUB_PREFIX):].strip("/").partition("@")
        if not _REPO_ID.fullmatch(repo):
            raise DataError(f"{text}: expected hf://datasets/<org>/<name>[@<revision>]")
        return repo, revision or None
    if _REPO_ID.fullmatch(text) and not Path(text).exists():
        return text, None
    return None


def snapshot(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    """Local folder of the dataset snapshot holding (at least) the files matching ``allow_patterns``.

    Returns:
        ``<cache>/datasets--<org>--<name>/snapshots/<commit>``.

    Raises:
        DataError: the dataset or revision cannot be fetched (offline and not cached, unknown id,
            gated without a token ...), one line.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      allow_patterns=allow_patterns))
    except Exception as err:  # huggingface_hub raises one of many HTTP / cache error types
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        raise DataError(f"hf://datasets/{repo_id}: cannot fetch the Hub dataset (revision {revision or 'main'}): "
                        f"{type(err).__name__}: {first}") from None


__all__ = ["parse_hub_source", "snapshot", "HUB_PREFIX"]
