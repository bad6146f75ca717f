"""``cosmos-policy export``: a LoRA checkpoint (``model.lora``) as a plain merged checkpoint, or as a
peft adapter folder.

A LoRA checkpoint holds only the adapter, the fully trained layers (``modules_to_save``) and the base's
identity (``model/lora.py``); loading it rebuilds the base from its recorded source. ``--merge`` (the
default) folds the adapter into the base with peft's ``merge`` and writes an ordinary checkpoint: the
whole DiT, no adapter, no base needed, loadable anywhere a ``fit`` checkpoint is (``CosmosPolicy``,
``serve``, ``evaluate``, ``push-to-hub``, ``model.init_from_checkpoint``). It is a deployment and
initialisation file: the optimizer state is not carried over (resume with the LoRA checkpoint).
``--merge false`` writes peft's adapter format instead (``adapter_config.json``,
``adapter_model.safetensors``) plus ``cosmos_policy_base.json`` naming the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json_atomic, write_path_atomic
from ..errors import CosmosPolicyError
from .checkpoint_file import read_checkpoint_file

#: Where a merged checkpoint records what it was merged from (the adapter file and the base's identity).
MERGED_FROM_KEY = "cosmos_policy_merged_from"
BASE_FILE = "cosmos_policy_base.json"
TRANSFORMER_PREFIX = "dit.transformer."


def load_lora_module(path: str | Path):
    """The :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule` of a LoRA checkpoint, on
    CPU, with its adapters on the rebuilt base (checked against the recorded fingerprint).

    Returns:
        ``(module, raw)``: the module and the checkpoint dict.

    Raises:
        CosmosPolicyError: not a (single-file) Cosmos Policy checkpoint, not a LoRA one, or its base
            is not the one it was trained on (one line).
    """
    import warnings

    from ..model.lora import LORA_CHECKPOINT_KEY
    from ..model.module import CosmosPolicyModule

    path = Path(path)
    raw = read_checkpoint_file(path)
    if not raw.get(LORA_CHECKPOINT_KEY):
        raise CosmosPolicyError(f"{path}: not a LoRA checkpoint (no adapter; it already holds the whole DiT)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        try:
            module = CosmosPolicyModule.load_from_checkpoint(str(path), map_location="cpu")
        except CosmosPolicyError as err:
            text = str(err)
            raise CosmosPolicyError(f"{path}{text[len('checkpoint'):]}" if text.startswith("checkpoint:")
                                    else text) from None
    return module, raw


def merged_transformer_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """The merged DiT of a LoRA checkpoint.

    Returns:
        ``(state, lora_entry, module)``: the plain ``CosmosTransformer3DModel`` state dict (float32, names
        of a model without adapters), the checkpoint's ``cosmos_policy_lora`` entry (settings, base), and
        the module holding the merged DiT.

    Raises:
        CosmosPolicyError: see :func:`load_lora_module`.
    """
    from ..model.lora import LORA_CHECKPOINT_KEY, merge_lora_

    module, raw = load_lora_module(path)
    merge_lora_(module.dit.transformer)
    state = {k: v.detach().clone() for k, v in module.dit.transformer.state_dict().items()}
    return state, raw[LORA_CHECKPOINT_KEY], module


def export(checkpoint: Path, output: Path | None = None, merge: bool = True) -> Path:
    """Write a LoRA checkpoint as a merged plain checkpoint (``--merge``, default) or a peft adapter folder.

    Args:
        checkpoint: a LoRA ``.ckpt`` of ``cosmos-policy fit`` (``model.lora`` set).
        output: the ``.ckpt`` to write (``--merge true``; default ``<checkpoint>.merged.ckpt`` beside it) or
            the folder (``--merge false``; default ``<checkpoint>.adapter/``).
        merge: fold the adapter into the base (an ordinary checkpoint of the whole DiT); false: peft's
            adapter format (``adapter_config.json``, ``adapter_model.safetensors``) and the base's identity.

    Returns:
        ``output``.

    Raises:
        CosmosPolicyError: not a LoRA checkpoint, or its base is missing / another base (one line).
    """
    from ..model.lora import LORA_CHECKPOINT_KEY

    path = Path(checkpoint)
    output = Path(output) if output is not None else \
        path.with_name(path.stem + (".merged.ckpt" if merge else ".adapter"))
    if not merge:
        module, raw = load_lora_module(path)
        entry = raw[LORA_CHECKPOINT_KEY]
        output.mkdir(parents=True, exist_ok=True)
        _write_adapter_folder(module.dit.transformer, module.lora_settings, entry["base"], output)
        print(f"wrote {output}: adapter_config.json, adapter_model.safetensors, {BASE_FILE}")
        return output
    state, entry, module = merged_transformer_state(path)
    raw = read_checkpoint_file(path)
    out: dict[str, Any] = {k: v for k, v in raw.items()
                           if k not in ("optimizer_states", "lr_schedulers", LORA_CHECKPOINT_KEY, "loops", "callbacks")}
    others = {k: v for k, v in raw["state_dict"].items() if not k.startswith("dit.")}
    out["state_dict"] = {**others, **{TRANSFORMER_PREFIX + k: v for k, v in state.items()}}
    hp = dict(raw["hyper_parameters"])
    # The weights are all in this file: no adapter, no base to rebuild (the card's base_model comes from MERGED_FROM).
    hp.update(lora=None, init_from_checkpoint=None, pretrained_transformer=None)
    out["hyper_parameters"] = hp
    out[MERGED_FROM_KEY] = {"adapter_checkpoint": path.name, "global_step": raw.get("global_step"),
                            "settings": entry["settings"], "base": entry["base"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    write_path_atomic(output, lambda tmp: torch.save(out, str(tmp)))
    n = sum(v.numel() for v in state.values())
    print(f"wrote {output}: merged DiT ({n:,} parameters; adapter of {path.name} on base "
          f"{entry['base'].get('source')!r})")
    return output


def _write_adapter_folder(transformer, settings, base: dict, folder: Path) -> None:
    """peft's adapter files (``LoraConfig.save_pretrained`` + ``adapter_model.safetensors``) and the base."""
    from safetensors.torch import save_file

    from ..model.lora import adapter_state_dict

    config = settings.peft_config()
    config.base_model_name_or_path = base.get("source") if _is_hub_source(base.get("source")) else None
    write_path_atomic(folder / "adapter_config.json",
                      lambda tmp: tmp.write_text(json.dumps(config.to_dict(), indent=2, default=list)))
    tensors = adapter_state_dict(transformer)
    write_path_atomic(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    portable = {**base, "source": base.get("source") if _is_hub_source(base.get("source")) else
                (Path(str(base["source"])).name if base.get("source") else None)}
    write_json_atomic(folder / BASE_FILE, portable)


def _is_hub_source(source: Any) -> bool:
    """``org/repo`` or ``org/repo/file.pt`` that is not a local path."""
    import os

    return isinstance(source, str) and source.count("/") >= 1 and not source.startswith((".", "/", "~")) \
        and not os.path.exists(source)


__all__ = ["BASE_FILE", "MERGED_FROM_KEY", "export", "load_lora_module", "merged_transformer_state"]
