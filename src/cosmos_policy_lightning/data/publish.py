"""``cosmos-policy push-dataset``: put a converted dataset (and its latent cache) where other machines read
it by URL (``storage.py``): a Hugging Face Hub dataset repository, or any fsspec destination (``s3://``,
``gs://``, ``file://``, ...).

The upload goes through the engines, not our own transport: ``huggingface_hub.HfApi.upload_folder`` (one
commit, resumable large-file uploads) for a Hub repository, ``fsspec``'s ``put`` for a URL. For a URL the
shards, statistics and text embeddings go first and ``manifest.json`` last, so a reader never finds a
manifest whose shards are not there yet. Before anything is sent, the dataset's metadata is cross-checked
and every shard's size compared with its manifest (``data/integrity.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CosmosPolicyError, first_line
from ..storage import is_url, location
from . import schema as S
from .dataset_info import read_dataset_info
from .integrity import check_shard_sizes


def _files(data_dir: Path, include_latents: bool) -> list[Path]:
    """The dataset's files, relative to ``data_dir``; no lock files or temporary names (``atomic.py``)."""
    files = []
    for p in sorted(data_dir.rglob("*")):
        rel = p.relative_to(data_dir)
        if not p.is_file() or p.name.startswith(".") or ".tmp" in p.name or p.suffix == ".lock":
            continue
        if rel.parts[0] == "latents" and not include_latents:
            continue
        files.append(rel)
    return files


def push_dataset(data_dir: Path, destination: str, include_latents: bool = True, private: bool = False,
                 commit_message: str = "Upload Cosmos Policy dataset") -> dict[str, Any]:
    """Upload a converted dataset so that ``data.data_dir`` can name it by URL.

    Args:
        data_dir: a finished conversion (``cosmos-policy convert`` output), local.
        destination: ``<org>/<name>`` for a Hub dataset repository (created if missing; log in with
            ``hf auth login`` or set ``HF_TOKEN``), then read as ``hf://datasets/<org>/<name>``; or a URL
            of any fsspec filesystem (credentials from its usual environment), read at the same URL.
        include_latents: also upload the latent cache in ``<data_dir>/latents`` (when there is one), so
            the machines that train need neither the VAE encoder pass nor the pixel shards' decoding.
        private: create the Hub repository private.
        commit_message: the Hub commit's message.

    Returns:
        ``{"url": the data_dir to train from, "files": [relative paths]}``.

    Raises:
        DataError: the dataset is unfinished or damaged (sizes), one line naming the file.
        CosmosPolicyError: a malformed destination, or the upload fails (one line).
    """
    data_dir = Path(data_dir)
    info = read_dataset_info(data_dir)
    check_shard_sizes([(p, b) for split in S.SPLITS for p, b in
                       zip(info.splits[split].shards, info.splits[split].bytes or (None,) * len(info.splits[split].shards))],
                      data_dir / S.MANIFEST)
    files = _files(data_dir, include_latents)
    # manifests last: a reader that finds one finds everything it lists
    files.sort(key=lambda rel: (rel.name == S.MANIFEST, len(rel.parts), str(rel)))
    if is_url(destination):
        url = str(destination).rstrip("/")
        target = location(url)
        try:
            fs = target.fs
            for rel in files:
                remote = "/".join([target.path.rstrip("/"), *rel.parts])
                fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(data_dir / rel), remote)
        except Exception as err:  # credentials, network, permissions
            first = first_line(err)
            raise CosmosPolicyError(f"push-dataset {url}: upload failed ({type(err).__name__}: {first})") from None
    else:
        if destination.count("/") != 1 or not all(destination.split("/")):
            raise CosmosPolicyError(f"push-dataset: destination must be <org>/<name> (a Hub dataset repository) "
                                    f"or a URL such as s3://bucket/path, got {destination!r}")
        from huggingface_hub import HfApi

        ignore = ["*.lock", ".*", "*.tmp*"] + ([] if include_latents else ["latents/*"])
        try:
            api = HfApi()
            api.create_repo(destination, repo_type="dataset", private=private, exist_ok=True)
            api.upload_folder(repo_id=destination, repo_type="dataset", folder_path=str(data_dir),
                              commit_message=commit_message, ignore_patterns=ignore)
        except Exception as err:  # auth, network, permissions
            first = first_line(err)
            raise CosmosPolicyError(f"push-dataset {destination}: upload failed ({type(err).__name__}: {first})") \
                from None
        url = f"hf://datasets/{destination}"
    names = [str(rel) for rel in files]
    print(f"uploaded {len(names)} files of {data_dir} to {url}; train from it with --data.init_args.data_dir {url}")
    return {"url": url, "files": names}


__all__ = ["push_dataset"]
