"""Policies on the Hugging Face Hub: ``cosmos-policy push-to-hub`` and ``CosmosPolicy.from_pretrained``.

A policy folder (what is uploaded, and what :func:`load_policy_folder` reads back)::

    README.md                       model card: base_model, pipeline_tag: robotics, licence, training data
    config.json                     embodiment, latent layout, normalisation, text encoder, VAE, DiT
                                    configuration, sampling settings ("format": "cosmos-policy-lightning")
    transformer/                    the DiT in diffusers ``save_pretrained`` format (config + safetensors);
                                    of a LoRA checkpoint, the merged DiT (it loads without the base)
    adapter/                        a LoRA checkpoint's adapter in peft's format (adapter_config.json,
                                    adapter_model.safetensors, cosmos_policy_base.json naming the base)
    vae/                            the VAE, when it was a local folder (a Hub id or the shipped tiny VAE
                                    is named instead)
    statistics.json                 normalisation statistics (``normalization.DatasetStats``)
    text_embeddings.safetensors     one (L, D) tensor per instruction; the instructions and the encoder's
                                    identity are in the file's metadata

A folder is portable: nothing in it names a path of the machine that wrote it. The VAE goes into the
folder or is named by Hub id (and the revision of the Hub cache, when it holds it) or by the shipped
name ``assets/tiny_wan_vae``; the text encoder is named by its identity (``minilm:...``, a Hub
``t5:<org>/<name>``, with the Hub cache's revision when it has it; a local T5 folder is refused unless ``--text_encoder`` names it on the Hub); any
other absolute path in the record (statistics source, imported file) is cut to its file name. The text
embeddings (from the checkpoint itself: ``fit`` stores the training instructions', ``import-checkpoint``
the reference's) let a robot run the instructions the policy was trained on without the text encoder
(T5-11B is 11 B parameters); other instructions are encoded by the recorded encoder.
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
from ..errors import CosmosPolicyError, first_line
from ..inference_record import InferenceRecord

FORMAT = "cosmos-policy-lightning"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATS_FILE = "statistics.json"
TEXT_FILE = "text_embeddings.safetensors"
TRANSFORMER_DIR = "transformer"
VAE_DIR = "vae"
ADAPTER_DIR = "adapter"
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
    """(encoder identity, instruction -> (L, D) float16) from a cache directory or the checkpoint's own
    embeddings (``fit`` and ``import-checkpoint`` store them); never from the training data folder."""
    from ..model.module import CHECKPOINT_KEY
    from ..text import TextEmbeddingCache

    extra = raw[CHECKPOINT_KEY]
    directory = text_embeddings
    if directory is None and extra.get("text_embeddings"):
        return extra.get("text_encoder"), {k: torch.as_tensor(v).to(torch.float16) for k, v in
                                           extra["text_embeddings"].items()}
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


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "./", "../")))


def _scrub_paths(value: Any) -> Any:
    """Every absolute (or ``~`` / ``./``) path string in a JSON-like value cut to its file name."""
    if isinstance(value, Mapping):
        return {k: _scrub_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_paths(v) for v in value]
    return Path(value).name if _is_local_path(value) else value


def _hub_revision(repo_id: str) -> str | None:
    """The commit of ``repo_id`` in the local Hub cache, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, local_files_only=True)).name
    except Exception:  # not cached, or not a repository id
        return None


def _portable_vae(vae: Any, folder: Path, override: str | None) -> tuple[Any, str | None]:
    """(the folder config's ``vae``, its Hub revision or None): an inline config dict, the shipped
    ``assets/...`` name, a Hub id, or ``"vae"`` after copying a local VAE folder into ``folder/vae``.

    Raises:
        CosmosPolicyError: a recorded local VAE folder that is not on this machine (one line, ``--vae``).
    """
    import shutil

    from ..shipped import resolve_path
    from ..shipped import shipped_path

    vae = override if override is not None else vae
    if not isinstance(vae, str):
        return vae, None  # an inline AutoencoderKLWan config (tests)
    if not Path(vae).is_absolute() and shipped_path(vae) is not None:
        return vae, None  # shipped with every install
    local = resolve_path(vae)
    if os.path.isdir(local):
        source = Path(local)
        if not (source / "config.json").is_file() and (source / VAE_DIR / "config.json").is_file():
            source = source / VAE_DIR
        target = folder / VAE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(source.iterdir()):
            if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
                write_path_atomic(target / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
        return VAE_DIR, None
    if _is_local_path(vae) or os.path.exists(vae) or vae.count("/") != 1:
        raise CosmosPolicyError(f"push-to-hub: the checkpoint's VAE {vae!r} is not on this machine; pass --vae "
                                f"<Hub id or local VAE folder> (the same weights)")
    return vae, _hub_revision(vae)


def _portable_text_encoder(identity: str, override: str | None) -> str:
    """The encoder identity a folder may record: a local T5 folder (``t5:/path``) is refused unless
    ``override`` names the same encoder (e.g. ``t5:google-t5/t5-11b``).

    Raises:
        CosmosPolicyError: a local text-encoder path without ``--text_encoder`` (one line).
    """
    if override is not None:
        return override
    if identity.startswith("t5:") and (_is_local_path(identity[3:]) or os.path.exists(identity[3:])):
        raise CosmosPolicyError(f"push-to-hub: the text encoder {identity!r} is a folder of this machine; pass "
                                f"--text_encoder t5:<Hub id> naming the same weights (e.g. t5:google-t5/t5-11b)")
    return identity


def export_folder(checkpoint: str | Path, folder: str | Path, repo_id: str = "local/cosmos-policy",
                  base_model: str | None = None, license: str | None = None, datasets: list[str] | None = None,
                  text_embeddings: str | Path | None = None, vae: str | None = None,
                  text_encoder: str | None = None) -> Path:
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
        text_embeddings: a text cache directory; default: the checkpoint's own embeddings.
        vae: the VAE to record instead of the checkpoint's (a Hub id, or a local folder, copied in).
        text_encoder: the encoder identity to record instead of a local one (``t5:<Hub id>``).

    A LoRA checkpoint (``model.lora``) is written merged (``transformer/`` loads without the base), with
    its adapter in peft's format in ``adapter/``.

    Returns:
        the folder.

    Raises:
        CosmosPolicyError: not a (single-file) Cosmos Policy checkpoint, no statistics in it, a VAE not on
            this machine, a local text-encoder folder without ``text_encoder``, or a LoRA checkpoint
            whose base is missing or another one.
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
    from ..model.lora import LORA_CHECKPOINT_KEY, merge_lora_
    from .export import MERGED_FROM_KEY, _write_adapter_folder, load_lora_module

    lora_entry = raw.get(LORA_CHECKPOINT_KEY)
    folder.mkdir(parents=True, exist_ok=True)
    if lora_entry:  # the adapter in peft's format, then merged: transformer/ needs no base
        module, _ = load_lora_module(path)
        (folder / ADAPTER_DIR).mkdir(exist_ok=True)
        _write_adapter_folder(module.dit.transformer, module.lora_settings, lora_entry["base"], folder / ADAPTER_DIR)
        state = dict(merge_lora_(module.dit.transformer).state_dict())
        del module
    else:
        prefix = "dit.transformer."
        state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    dit = build_transformer(hp.get("transformer", "tiny"), text_embed_dim=hp.get("text_dim") or None, device="meta")
    load_state_strict(dit, state, str(path))
    dit.save_pretrained(str(folder / TRANSFORMER_DIR), safe_serialization=True)

    identity, texts = _text_embeddings(raw, Path(text_embeddings) if text_embeddings is not None else None)
    vae_entry, vae_revision = _portable_vae(hp.get("vae"), folder, vae)
    encoder = record.text_encoder if record.text_encoder != "none" else (identity or "none")
    encoder = _portable_text_encoder(str(encoder), text_encoder)
    merged_from = raw.get(MERGED_FROM_KEY)
    # The inference record (statistics in their own file), then what rebuilds the network.
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        **{k: v for k, v in record.to_dict().items() if k != "stats"},
        "normalization": record.embodiment.normalization,
        "text_dim": int(hp.get("text_dim", 0)), "text_conditioning": hp.get("text_conditioning", "auto"),
        "transformer": hp.get("transformer", "tiny"),
        "test_num_steps": int(hp.get("test_num_steps", 5)),
        "source_checkpoint": {"file": path.name, "global_step": raw.get("global_step"),
                              "imported_from": extra.get("imported_from")},
    }
    if lora_entry or merged_from:
        entry = lora_entry or merged_from
        config["lora"] = {"settings": entry["settings"], "base": entry["base"], "merged_into_transformer": True}
    config = _scrub_paths(config)  # no path of this machine in a shared folder
    config.update(text_encoder=encoder, vae=vae_entry)
    if vae_revision:
        config["vae_revision"] = vae_revision
    encoder_revision = _hub_revision(encoder[3:]) if encoder.startswith("t5:") and encoder[3:].count("/") == 1 else None
    if encoder_revision:
        config["text_encoder_revision"] = encoder_revision  # the Hub cache's commit of the encoder
    write_json_atomic(folder / CONFIG_FILE, config)
    write_json_atomic(folder / STATS_FILE, _scrub_paths(extra["stats"]))
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
        lora_base = ((lora_entry or merged_from or {}).get("base") or {}).get("source")
        source = hp.get("pretrained_transformer") or lora_base or (extra.get("imported_from") or {}).get("source")
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
    if record.objective_mix and not extra.get("imported_from"):
        training.append(f"Objective mix {json.dumps(record.objective_mix)}.")
    if lora_entry or merged_from:
        entry = lora_entry or merged_from
        training.append(f"Fine-tuned with LoRA (rank {entry['settings']['rank']}, alpha {entry['settings']['alpha']}) "
                        f"on base `{_scrub_paths(entry['base'].get('source'))}`; `transformer/` holds the merged "
                        f"weights" + (", `adapter/` the adapter in peft's format." if lora_entry else "."))
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
                text_embeddings: Path | None = None, commit_message: str = "Upload Cosmos Policy",
                vae: str | None = None, text_encoder: str | None = None) -> dict[str, Any]:
    """Write a checkpoint as a Hub model folder and upload it with ``huggingface_hub``.

    Args:
        ckpt: a single-file ``.ckpt`` (``fit`` or ``import-checkpoint``; consolidate sharded ones first).
        repo_id: ``<user or org>/<name>`` on the Hub (created if missing; log in with ``hf auth login``).
        local_dir: only write the folder here, upload nothing (inspect it, or upload it later with
            ``hf upload REPO_ID DIR``).
        private: create the repository private.
        base_model, license, datasets, text_embeddings, vae, text_encoder: see :func:`export_folder`.
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
                               datasets=datasets, text_embeddings=text_embeddings, vae=vae, text_encoder=text_encoder)
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
                first = first_line(err)
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
        first = first_line(err)
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
    vae = config["vae"]
    if isinstance(vae, str) and not os.path.isabs(vae) and (folder / vae).is_dir():
        vae = str(folder / vae)  # copied into the folder (a local VAE of the machine that wrote it)
    module = CosmosPolicyModule(embodiment=record.embodiment.to_dict(), text_dim=int(config["text_dim"]),
                                transformer=config["transformer"], pretrained_transformer=str(folder / TRANSFORMER_DIR),
                                vae=vae, test_num_steps=int(config.get("test_num_steps", 5)),
                                text_conditioning=config.get("text_conditioning", "auto"), image_log_every_n_steps=0,
                                inference_record=record)
    texts = None
    if (folder / TEXT_FILE).is_file():
        identity, texts = read_text_embeddings(folder / TEXT_FILE)
        if identity and record.text_encoder != "none" and identity != record.text_encoder:
            raise CosmosPolicyError(f"{folder / TEXT_FILE}: embeddings of {identity!r}, but the policy uses "
                                    f"{record.text_encoder!r}")
    return module, texts
