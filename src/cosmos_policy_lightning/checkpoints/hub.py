"""Policies on the Hugging Face Hub: ``cosmos-policy push-to-hub`` and ``CosmosPolicy.from_pretrained``.

A policy folder (what is uploaded, and what :func:`load_policy_folder` reads back)::

    README.md                       model card: base_model, pipeline_tag: robotics, licence, training data
    config.json                     embodiment, latent layout, normalisation, text encoder, VAE, DiT
                                    configuration, sampling settings ("format": "cosmos-policy-lightning")
    transformer/                    the DiT in diffusers ``save_pretrained`` format (config + safetensors)
    statistics.json                 normalisation statistics (``normalization.DatasetStats``)
    text_embeddings.safetensors     one (L, D) tensor per instruction; the instructions and the encoder's
                                    identity are in the file's metadata

The VAE is recorded by identity (hub id or path), not copied: the released models use Wan2.1's.
The text embeddings let a robot run the instructions the policy was trained on without the text
encoder (T5-11B is 11 B parameters); other instructions are encoded by the recorded encoder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_bytes_atomic, write_json_atomic, write_path_atomic
from ..errors import CosmosPolicyError
from ..inference_record import InferenceRecord

FORMAT = "cosmos-policy-lightning"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATS_FILE = "statistics.json"
TEXT_FILE = "text_embeddings.safetensors"
TRANSFORMER_DIR = "transformer"
CARD_FILE = "README.md"

#: The licence of the Cosmos-Predict2 weights (and so of models fine-tuned from them), as Hub metadata.
NVIDIA_OPEN_MODEL_LICENSE = {
    "license": "other", "license_name": "nvidia-open-model-license",
    "license_link": "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/",
}


# --------------------------------------------------------------------------------------- export


def _read_checkpoint(path: Path) -> dict:
    from .checkpoint_file import read_checkpoint_file

    raw = read_checkpoint_file(path)
    if "hyper_parameters" not in raw:
        raise CosmosPolicyError(f"{path}: not a Cosmos Policy checkpoint (no 'hyper_parameters' entry)")
    return raw


def _hub_repo_of(source: Any) -> str | None:
    """``org/repo`` of a Hub source (``org/repo`` or ``org/repo/file.pt``); None for local paths."""
    if not isinstance(source, str) or not source or os.path.exists(source) or source.startswith((".", "/")):
        return None
    parts = source.strip("/").split("/")
    return "/".join(parts[:2]) if len(parts) >= 2 else None


def _text_embeddings(raw: dict, text_embeddings: Path | None) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(encoder identity, instruction -> (L, D) float16) from a cache directory, the checkpoint's
    embedded embeddings (imported checkpoints) or its data module's ``text_embeddings/``."""
    from ..model.module import CHECKPOINT_KEY
    from ..text import TextEmbeddingCache

    extra = raw[CHECKPOINT_KEY]
    directory = text_embeddings
    if directory is None and extra.get("text_embeddings"):
        return extra.get("text_encoder"), {k: torch.as_tensor(v).to(torch.float16) for k, v in
                                           extra["text_embeddings"].items()}
    if directory is None:
        data_dir = (raw.get("datamodule_hyper_parameters") or {}).get("data_dir")
        candidate = Path(data_dir) / "text_embeddings" if data_dir else None
        directory = candidate if candidate is not None and (candidate / "index.json").is_file() else None
    if directory is None:
        return extra.get("text_encoder"), {}
    cache = TextEmbeddingCache(directory)
    if len(cache) == 0:
        raise CosmosPolicyError(f"{directory}: no text-embedding index (expected a text_embeddings/ directory)")
    if extra.get("text_encoder") and cache.identity != extra.get("text_encoder"):
        raise CosmosPolicyError(f"{directory}: embeddings of {cache.identity!r}, but the checkpoint was trained with "
                                f"{extra.get('text_encoder')!r}")
    return cache.identity, {t: torch.from_numpy(cache.get(t)).to(torch.float16) for t in cache.instructions}


def _model_card(repo_id: str, config: dict, card_meta: dict, training_data: str, stats_source: str | None,
                num_instructions: int) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(pipeline_tag="robotics", library_name=FORMAT, tags=["cosmos-policy", "robotics",
                         "video-diffusion", f"embodiment-{config['embodiment']['name']}"], **card_meta)
    emb = config["embodiment"]
    cams = ", ".join(f"{c['name']} ({c['role']})" for c in emb["cameras"])
    base = card_meta.get("base_model")
    body = f"""
# {repo_id.split('/')[-1]}

A Cosmos Policy for the **{emb['name']}** embodiment: a latent video diffusion model
({'fine-tuned from `' + base + '`' if base else 'Cosmos-Predict2 DiT architecture'}) acting as policy, world model
and value function at once (Kim et al., 2026, *Cosmos Policy*, arXiv 2601.16163), packaged by
`cosmos-policy-lightning` (`cosmos-policy push-to-hub`).

| | |
|---|---|
| cameras (latent-slot order) | {cams} |
| image size | {emb['image_size'][0]} x {emb['image_size'][1]} |
| proprio / action dims | {emb['proprio']['dim']} / {emb['action']['dim']} |
| action chunk (executed) | {emb['action']['chunk_size']} ({emb['action']['execute_steps']}) |
| normalisation | {json.dumps(emb.get('normalization', {}))} |
| text encoder | `{config['text_encoder']}` ({config['text_dim']}-d, {config['text_conditioning']} conditioning) |
| VAE | `{config['vae'] if isinstance(config['vae'], str) else 'inline config'}` |
| denoising steps | {config['test_num_steps']} |

## Use

```python
from cosmos_policy_lightning.inference.policy import CosmosPolicy

policy = CosmosPolicy.from_pretrained("{repo_id}")
out = policy({{"images": {{...}}, "proprio": proprio, "instruction": "..."}})
out.actions, out.future_proprio, out.value
```

## Training data

{training_data}

Normalisation statistics: `statistics.json`{' (from ' + stats_source + ')' if stats_source else ''}.
{f'Embeddings of the {num_instructions} training instructions: `text_embeddings.safetensors`.'
 if num_instructions else 'No instruction embeddings are included: the text encoder encodes every instruction.'}

## Licence

{'The weights derive from NVIDIA Cosmos-Predict2 and are distributed under the NVIDIA Open Model License.'
 if card_meta.get('license_name') == 'nvidia-open-model-license' else 'Licence: ' + str(card_meta.get('license'))}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def export_folder(checkpoint: str | Path, folder: str | Path, repo_id: str = "local/cosmos-policy",
                  base_model: str | None = None, license: str | None = None, datasets: list[str] | None = None,
                  text_embeddings: str | Path | None = None) -> Path:
    """Write a checkpoint as a policy folder (layout in the module docstring).

    Args:
        checkpoint: a single-file ``.ckpt`` of ``cosmos-policy fit`` or ``import-checkpoint``.
        folder: where to write (created; existing files of the same names are replaced).
        repo_id: the Hub id the card names.
        base_model: the card's ``base_model``; default: the Hub repository the weights started from
            (``pretrained_transformer``, or the imported file's repository).
        license: the card's licence; default: the NVIDIA Open Model License for Cosmos-derived weights,
            else Apache-2.0.
        datasets: Hub dataset ids of the training data (the card's ``datasets``).
        text_embeddings: a text cache directory; default: the checkpoint's own embeddings or its data
            module's ``text_embeddings/``.

    Returns:
        the folder.

    Raises:
        CosmosPolicyError: not a (single-file) Cosmos Policy checkpoint, or no statistics in it.
    """
    from ..model.dit import build_transformer
    from ..model.module import CHECKPOINT_KEY
    from ..model.reference_weights import load_state_strict

    path, folder = Path(checkpoint), Path(folder)
    raw = _read_checkpoint(path)
    hp, extra = raw["hyper_parameters"], raw[CHECKPOINT_KEY]
    if not extra.get("stats"):
        raise CosmosPolicyError(f"{path}: the checkpoint has no normalisation statistics; a shared policy needs "
                                f"them (import with --stats, or train with a data module)")
    record = InferenceRecord.from_dict(extra, str(path))
    # Where the training data was (the card, and its text embeddings by default): not part of the record.
    data_dir = (raw.get("datamodule_hyper_parameters") or {}).get("data_dir")
    prefix = "dit.transformer."
    state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    dit = build_transformer(hp.get("transformer", "tiny"), text_embed_dim=hp.get("text_dim") or None, device="meta")
    load_state_strict(dit, state, str(path))
    folder.mkdir(parents=True, exist_ok=True)
    dit.save_pretrained(str(folder / TRANSFORMER_DIR), safe_serialization=True)

    identity, texts = _text_embeddings(raw, Path(text_embeddings) if text_embeddings is not None else None)
    # The inference record (statistics in their own file), then what rebuilds the network.
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        **{k: v for k, v in record.to_dict().items() if k != "stats"},
        "text_encoder": record.text_encoder if record.text_encoder != "none" else (identity or "none"),
        "normalization": record.embodiment.normalization,
        "text_dim": int(hp.get("text_dim", 0)), "text_conditioning": hp.get("text_conditioning", "auto"),
        "vae": hp.get("vae"), "transformer": hp.get("transformer", "tiny"),
        "test_num_steps": int(hp.get("test_num_steps", 5)),
        "source_checkpoint": {"file": path.name, "global_step": raw.get("global_step"),
                              "imported_from": extra.get("imported_from")},
    }
    write_json_atomic(folder / CONFIG_FILE, config)
    write_json_atomic(folder / STATS_FILE, extra["stats"])
    if texts:
        from safetensors.torch import save_file

        names = list(texts)
        tensors = {str(i): texts[t].contiguous() for i, t in enumerate(names)}
        meta = {"instructions": json.dumps(names, ensure_ascii=False), "encoder": str(config["text_encoder"]),
                "dim": str(next(iter(tensors.values())).shape[1])}
        write_path_atomic(folder / TEXT_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    elif (folder / TEXT_FILE).exists():
        (folder / TEXT_FILE).unlink()

    if base_model is None:
        source = hp.get("pretrained_transformer") or (extra.get("imported_from") or {}).get("source")
        base_model = _hub_repo_of(source)
    cosmos_derived = bool(base_model and "cosmos" in base_model.lower()) or \
        "cosmos-predict2" in json.dumps(hp.get("transformer"))
    card_meta: dict[str, Any] = dict(NVIDIA_OPEN_MODEL_LICENSE) if (license is None and cosmos_derived) else \
        {"license": license or "apache-2.0"}
    if base_model:
        card_meta["base_model"] = base_model
    if datasets:
        card_meta["datasets"] = list(datasets)
    training = []
    if datasets:
        training.append("Hub datasets: " + ", ".join(f"`{d}`" for d in datasets) + ".")
    if data_dir:
        mix = record.objective_mix
        training.append(f"Converted dataset `{Path(str(data_dir)).name}`" + (f", objective mix {json.dumps(mix)}"
                                                                              if mix else "") + ".")
    if extra.get("imported_from"):
        training.append(f"Imported from the reference checkpoint `{extra['imported_from']['source']}` (trained by its "
                        f"authors on their data).")
    stats_source = (extra["stats"].get("meta") or {}).get("source")
    card = _model_card(repo_id, config, card_meta, " ".join(training) or "Not recorded.",
                       Path(str(stats_source)).name if stats_source else None, len(texts))
    write_bytes_atomic(folder / CARD_FILE, lambda f: f.write(card.encode("utf-8")))
    return folder


def push_to_hub(ckpt: Path, repo_id: str, local_dir: Path | None = None, private: bool = False,
                base_model: str | None = None, license: str | None = None, datasets: list[str] | None = None,
                text_embeddings: Path | None = None, commit_message: str = "Upload Cosmos Policy") -> dict[str, Any]:
    """Write a checkpoint as a Hub model folder and upload it with ``huggingface_hub``.

    Args:
        ckpt: a single-file ``.ckpt`` (``fit`` or ``import-checkpoint``; consolidate sharded ones first).
        repo_id: ``<user or org>/<name>`` on the Hub (created if missing; log in with ``hf auth login``).
        local_dir: only write the folder here, upload nothing (inspect it, or upload it later with
            ``hf upload REPO_ID DIR``).
        private: create the repository private.
        base_model, license, datasets, text_embeddings: see :func:`export_folder`.
        commit_message: the Hub commit's message.

    Returns:
        ``{"folder": ..., "files": [...], "url": ... or None}``.

    Raises:
        CosmosPolicyError: bad checkpoint, malformed ``repo_id``, or the upload fails (one line).
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CosmosPolicyError(f"push-to-hub: repo_id must be <user or org>/<name>, got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="cosmos-policy-hub-") as tmp:
        folder = export_folder(ckpt, local_dir or tmp, repo_id=repo_id, base_model=base_model, license=license,
                               datasets=datasets, text_embeddings=text_embeddings)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        url = None
        if local_dir is None:
            from huggingface_hub import HfApi

            try:
                api = HfApi()
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
                url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
            except Exception as err:  # auth, network, permissions
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CosmosPolicyError(f"push-to-hub {repo_id}: upload failed ({type(err).__name__}: {first})") \
                    from None
    result = {"folder": str(local_dir) if local_dir else None, "files": files, "url": url}
    print(f"{'wrote ' + str(local_dir) if local_dir else 'uploaded to ' + str(url)}: {', '.join(files)}")
    return result


# --------------------------------------------------------------------------------------- load


def resolve_folder(source: str | Path) -> Path:
    """A local policy folder for ``source``: the folder itself, or the Hub repository ``org/name``
    downloaded (or read from the Hub cache; ``HF_HUB_OFFLINE=1`` reads only the cache).

    Raises:
        CosmosPolicyError: neither a folder nor a reachable / cached Hub repository (one line).
    """
    text = os.fspath(source)
    if os.path.isdir(text):
        return Path(text)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CosmosPolicyError(f"{text}: not a policy folder, nor a Hub id <org>/<name>")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CosmosPolicyError(f"{text}: cannot fetch the policy from the Hub ({type(err).__name__}: {first})") \
            from None


def read_text_embeddings(path: str | Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """``text_embeddings.safetensors`` -> (encoder identity, instruction -> (L, D) float16 tensor).

    Raises:
        CosmosPolicyError: unreadable file or metadata that does not list the instructions.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = json.loads(meta["instructions"])
            table = {text: f.get_tensor(str(i)) for i, text in enumerate(names)}
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise CosmosPolicyError(f"{path}: not a text-embedding file ({type(err).__name__}: {err})") from None
    return meta.get("encoder"), table


def load_policy_folder(source: str | Path):
    """The model of a policy folder or Hub id, for
    :meth:`~cosmos_policy_lightning.inference.policy.CosmosPolicy.from_pretrained`.

    Args:
        source: a folder written by ``push-to-hub --local_dir`` / :func:`export_folder`, or a Hub
            repository id ``org/name``.

    Returns:
        ``(module, text_embeddings)``: the :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule`
        with its inference record, and the folder's instruction embeddings (None without them).

    Raises:
        CosmosPolicyError: not a policy folder, a missing file, or a layout that the embodiment does not
            give (a folder edited by hand).
    """
    from ..model.module import CosmosPolicyModule

    def read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CosmosPolicyError(f"{path}: not readable ({type(err).__name__})") from None

    folder = resolve_folder(source)
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, Mapping) or config.get("format") != FORMAT:
        raise CosmosPolicyError(f"{folder / CONFIG_FILE}: not a Cosmos Policy folder (expected \"format\": {FORMAT!r})")
    for name in (STATS_FILE, TRANSFORMER_DIR):
        if not (folder / name).exists():
            raise CosmosPolicyError(f"{folder}: {name} is missing")
    stats = read_json(folder / STATS_FILE)
    # Checks the stored layout against the one the embodiment gives (a folder edited by hand).
    record = InferenceRecord.from_dict({**config, "stats": stats}, str(folder / CONFIG_FILE))
    module = CosmosPolicyModule(embodiment=record.embodiment.to_dict(), text_dim=int(config["text_dim"]),
                                transformer=config["transformer"], pretrained_transformer=str(folder / TRANSFORMER_DIR),
                                vae=config["vae"], test_num_steps=int(config.get("test_num_steps", 5)),
                                text_conditioning=config.get("text_conditioning", "auto"), image_log_every_n_steps=0,
                                inference_record=record)
    texts = None
    if (folder / TEXT_FILE).is_file():
        identity, texts = read_text_embeddings(folder / TEXT_FILE)
        if identity and record.text_encoder != "none" and identity != record.text_encoder:
            raise CosmosPolicyError(f"{folder / TEXT_FILE}: embeddings of {identity!r}, but the policy uses "
                                    f"{record.text_encoder!r}")
    return module, texts
