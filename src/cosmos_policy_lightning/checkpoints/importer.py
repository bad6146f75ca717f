"""``cosmos-policy import-checkpoint``: a released reference checkpoint becomes one of ours.

The output is a ``.ckpt`` with the layout ``cosmos-policy fit`` writes (``state_dict`` with ``dit.*``
weights, ``hyper_parameters`` of :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule`,
and the ``cosmos_policy`` entry with embodiment, layout, statistics and text encoder), so it works
wherever a trained checkpoint does:

* ``CosmosPolicy.from_checkpoint(OUT.ckpt)`` and ``cosmos-policy evaluate ... --checkpoint OUT.ckpt``
  (the reference's T5 embeddings travel inside the checkpoint, so no T5-11B is needed for the
  instructions it was trained on);
* ``cosmos-policy fit ... --model.init_args.init_from_checkpoint OUT.ckpt`` to fine-tune on your robot.

The DiT weights are read with ``model/reference_weights.py`` (diffusers' Cosmos key conversion,
strict); the statistics JSON and T5 pickle with ``checkpoints/reference_side_files.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..embodiment import load_embodiment
from ..errors import CosmosPolicyError
from ..inference_record import InferenceRecord
from ..layout import SequenceLayout
from ..model.vae import WAN21_VAE
from ..model.dit import load_reference_transformer
from ..model.reference_weights import fetch_file
from ..text import T5_MAX_TOKENS, TextEmbeddingCache
from .reference_side_files import (REFERENCE_T5_IDENTITY, PrecomputedTextEncoder, read_reference_stats,
                                   read_t5_embeddings)

#: Key of the embedded instruction embeddings inside ``checkpoint["cosmos_policy"]``.
TEXT_EMBEDDINGS_KEY = "text_embeddings"


def _recipe_test_steps(name: str, default: int = 5) -> int:
    """``model.init_args.test_num_steps`` of the source checkout's recipe named after the embodiment (recipes
    are not in the wheel), else ``default``."""
    import yaml

    from ..shipped import checkout_path

    recipe = checkout_path(f"recipes/{name}.yaml")
    if recipe is None or not recipe.is_file():
        return default
    init = ((yaml.safe_load(recipe.read_text()) or {}).get("model") or {}).get("init_args") or {}
    return int(init.get("test_num_steps", default))


def import_checkpoint(
    source: str,
    embodiment: Path | None = None,
    output: Path | None = None,
    transformer: str | dict = "cosmos-predict2-2b",
    stats: str | None = None,
    t5_embeddings: str | None = None,
    ema: bool = False,
    vae: str = WAN21_VAE[0],
    text_encoder: str = REFERENCE_T5_IDENTITY,
    text_cache: Path | None = None,
    test_num_steps: int | None = None,
    center_crop: bool = True,
    dtype: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Import a reference whole-model ``.pt`` checkpoint (a released Cosmos Policy or the base model).

    Args:
        source: local ``.pt`` / ``.pth`` file or Hub file ``<org>/<repo>/<file>.pt``, e.g.
            ``nvidia/Cosmos-Policy-ALOHA-Predict2-2B/Cosmos-Policy-ALOHA-Predict2-2B.pt``.
        embodiment: the robot's embodiment YAML (its cameras in the reference's latent-slot order); required.
        output: the ``.ckpt`` to write; required.
        transformer: DiT configuration the weights must match (``cosmos-predict2-2b``, or a dict).
        stats: the reference's ``dataset_statistics.json``, local or ``<org>/<repo>/<file>`` on the Hub
            (e.g. ``nvidia/Cosmos-Policy-LIBERO-Predict2-2B/libero_dataset_statistics.json``); needed for
            inference (fine-tuning takes the statistics of its own data).
        t5_embeddings: the reference's T5 pickle ({instruction: (1, 512, 1024)}), local or on the Hub
            (e.g. ``nvidia/Cosmos-Policy-LIBERO-Predict2-2B/libero_t5_embeddings.pkl``).
        ema: take the EMA weights (``net_ema.``) instead of ``net.``.
        vae: the VAE the checkpoint records (hub id or directory; the reference uses Wan2.1's).
        text_encoder: identity recorded for the text (the reference's ``t5:google-t5/t5-11b``): the
            model attends to it padded to 512 tokens, and unseen instructions are encoded with it.
        text_cache: also write the T5 embeddings as a text cache directory here (default: beside
            ``output``, ``<output stem>.text_embeddings/``, when ``t5_embeddings`` is given).
        test_num_steps: denoising steps recorded for test / predict / planning proposals; default: the
            ``test_num_steps`` of ``recipes/<embodiment name>.yaml`` when there is one (the reference's:
            5 for LIBERO and RoboCasa, 10 for ALOHA), else 5.
        center_crop: the test-time centre crop of augmented training (the released models used it).
        dtype: store the DiT weights in this dtype (``float32``, ``bfloat16``); default: the file's.
        trust_pickle: allow arbitrary pickled objects in ``source`` (only for files you trust).

    Returns:
        a summary: output path, number of weights, parameters, text instructions, statistics source.

    Raises:
        CosmosPolicyError: unreadable inputs, weights not matching the configuration (one line naming the
            first missing / unexpected weight), statistics or embeddings not matching the embodiment.
    """
    from ..model.module import CHECKPOINT_KEY

    if embodiment is None or output is None:
        raise CosmosPolicyError("import-checkpoint: --embodiment E.yaml and --output OUT.ckpt are required")
    emb = load_embodiment(embodiment)
    layout = SequenceLayout.from_embodiment(emb)
    if test_num_steps is None:
        test_num_steps = _recipe_test_steps(emb.name)
    torch_dtype = None if dtype is None else dtype_from_name(dtype, "import-checkpoint: --dtype")
    print(f"reading {source} ...", flush=True)
    dit = load_reference_transformer(source, transformer, ema=ema, torch_dtype=torch_dtype, trust_pickle=trust_pickle)
    text_dim = int(dit.config.text_embed_dim)
    dataset_stats = None
    if stats is not None:
        dataset_stats = read_reference_stats(fetch_file(stats, "statistics file"), emb)
        dataset_stats.meta["source"] = os.fspath(stats)  # the name given (a Hub file, not its cache path)

    embeddings: dict[str, Any] = {}
    cache_dir = None
    if t5_embeddings is not None:
        table = read_t5_embeddings(fetch_file(t5_embeddings, "T5 embedding file"), dim=text_dim)
        embeddings = {text: torch.from_numpy(e).to(torch.float16) for text, e in table.items()}
        if not all(torch.isfinite(e).all() for e in embeddings.values()):
            raise CosmosPolicyError(f"{t5_embeddings}: embeddings overflow float16")
        cache_dir = Path(text_cache) if text_cache is not None else Path(output).with_suffix(".text_embeddings")
        TextEmbeddingCache(cache_dir).add(PrecomputedTextEncoder(text_encoder, table), list(table))

    hyper_parameters = {
        "embodiment": emb.to_dict(), "text_dim": text_dim, "transformer": transformer,
        "pretrained_transformer": None, "vae": vae, "test_num_steps": int(test_num_steps),
        "init_from_checkpoint": None, "text_conditioning": "auto",
    }
    import lightning

    checkpoint = {
        "state_dict": {f"dit.transformer.{k}": v for k, v in dit.state_dict().items()},
        "hyper_parameters": hyper_parameters,
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        CHECKPOINT_KEY: {
            # Without --stats the checkpoint holds weights only (a record needs statistics).
            **(InferenceRecord(emb, dataset_stats, text_encoder, T5_MAX_TOKENS,
                               test_transform="center_crop" if center_crop else "none").to_dict()
               if dataset_stats is not None else {"embodiment": emb.to_dict(), "layout": layout.to_dict()}),
            TEXT_EMBEDDINGS_KEY: embeddings,
            "imported_from": {"source": os.fspath(source), "ema": bool(ema),
                              "stats": None if stats is None else os.fspath(stats),
                              "t5_embeddings": None if t5_embeddings is None else os.fspath(t5_embeddings)},
        },
    }
    print(f"writing {output} ...", flush=True)
    write_bytes_atomic(output, lambda f: torch.save(checkpoint, f))
    summary = {
        "output": str(output),
        "weights": len(checkpoint["state_dict"]),
        "parameters": sum(p.numel() for p in dit.parameters()),
        "instructions": len(embeddings),
        "text_cache": None if cache_dir is None else str(cache_dir),
        "statistics": None if stats is None else str(stats),
    }
    print(", ".join(f"{k}: {v}" for k, v in summary.items()))
    return summary
