"""LoRA adapters on the Cosmos DiT through peft and diffusers' PEFT integration (one-GPU fine-tuning).

Nothing here computes a low-rank update: ``CosmosTransformer3DModel.add_adapter(LoraConfig(...))``
(diffusers' ``PeftAdapterMixin``, peft's ``inject_adapter_in_model``) wraps the target linear layers,
peft's ``merge`` folds them back, ``get_peft_model_state_dict`` gives the adapter's tensors in peft's
own naming. This module chooses the settings, freezes the base, fingerprints it and maps checkpoints.

Defaults (``LoraSettings``), from the published recipes: cosmos-predict2's LoRA post-training of the
2B (rank 16, alpha 16, range 8-32, on the attention projections and both MLP layers); diffusers'
Cosmos LoRA example (rank 32, bf16 base, LoRA weights in float32, gradient checkpointing). Targets per
block: ``attn1`` / ``attn2`` ``to_q, to_k, to_v, to_out.0``, ``ff.net.0.proj``, ``ff.net.2``: rank 16
on the 2B is 22.9 M trainable parameters (1.2 % of 1.956 B).

Layers trained fully (peft ``modules_to_save``), and why: Cosmos Policy writes robot vectors *into*
latent frames (``injection.py``: proprio, action chunk and value tiled over a 16 x h x w frame). The
base model only ever mapped Wan-VAE latents of images to tokens and back, so the two layers that sit
between the latent space and the tokens are the ones that must learn the new content:

- ``patch_embed.proj`` (2B: 72 x 2048 = 147 K parameters): latent (+ condition-mask channel) patches
  -> tokens; a tiled action frame is nothing like an image latent, and the condition-mask column is
  zero in a base loaded from a 16-channel checkpoint (``dit.adapt_input_channels_``);
- ``proj_out`` (2B: 2048 x 64 = 131 K): tokens -> latent patches; the vector frames must be predicted
  to within the readout's averaging (``injection.py``), which a low-rank correction of a frozen image
  head approximates poorly.

Both together are 0.28 M parameters on the 2B (1.2 % of the adapter). The time embedding is left
frozen: conditioning frames at time 0 are what Video2World already does.

The base's identity (:func:`base_fingerprint`: names, shapes and a strided sample of every base
tensor) goes into every LoRA checkpoint, so an adapter is never loaded onto another base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CosmosPolicyError

#: Linear layers of every transformer block that get an adapter (peft ``target_modules``, name suffixes).
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
#: Layers trained fully (peft ``modules_to_save``): the latent <-> token maps (module docstring).
DEFAULT_MODULES_TO_SAVE: tuple[str, ...] = ("patch_embed.proj", "proj_out")
#: peft's adapter name for ours (the only one).
ADAPTER_NAME = "default"
#: Where a LoRA checkpoint keeps its settings and the base's identity (next to ``cosmos_policy``).
LORA_CHECKPOINT_KEY = "cosmos_policy_lora"
_BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoraSettings:
    """``model.init_args.lora`` of a recipe.

    Attributes:
        rank: LoRA rank r (>= 1; published 2B recipes: 16, range 8-32).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input, in [0, 1).
        targets: linear-layer name suffixes that get adapters (peft ``target_modules``).
        modules_to_save: modules trained fully and stored whole (peft ``modules_to_save``).
        base_dtype: dtype of the frozen base weights: ``float32`` (default) or ``bfloat16`` / ``float16``
            (half the base's memory; needs ``trainer.precision: bf16-mixed`` so that matmuls of float32
            activations with half-precision weights run under autocast). Adapters stay float32.
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    modules_to_save: tuple[str, ...] = DEFAULT_MODULES_TO_SAVE
    base_dtype: str = "float32"

    @classmethod
    def from_value(cls, value: Any, where: str = "model.lora") -> "LoraSettings | None":
        """None / False -> no LoRA; True -> the defaults; a mapping -> those fields over the defaults.

        Raises:
            CosmosPolicyError: an unknown key, or a value out of range (one line naming ``where``).
        """
        if value is None or value is False:
            return None
        if isinstance(value, LoraSettings):
            return value
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise CosmosPolicyError(f"{where}: expected a mapping {{rank, alpha, dropout, targets, modules_to_save, "
                                    f"base_dtype}}, true or null, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise CosmosPolicyError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        kwargs = dict(value)
        for key in ("targets", "modules_to_save"):
            if key in kwargs:
                items = kwargs[key]
                items = [items] if isinstance(items, str) else list(items or [])
                kwargs[key] = tuple(str(x) for x in items)
        settings = cls(**kwargs)
        if int(settings.rank) != settings.rank or settings.rank < 1:
            raise CosmosPolicyError(f"{where}.rank: expected an integer >= 1, got {settings.rank!r}")
        if not settings.alpha > 0:
            raise CosmosPolicyError(f"{where}.alpha: expected > 0, got {settings.alpha!r}")
        if not 0 <= settings.dropout < 1:
            raise CosmosPolicyError(f"{where}.dropout: expected in [0, 1), got {settings.dropout!r}")
        if not settings.targets:
            raise CosmosPolicyError(f"{where}.targets: expected at least one linear-layer name")
        if settings.base_dtype not in _BASE_DTYPES:
            raise CosmosPolicyError(f"{where}.base_dtype: expected one of {sorted(_BASE_DTYPES)}, got "
                                    f"{settings.base_dtype!r}")
        return settings

    def to_dict(self) -> dict[str, Any]:
        """Plain types (lists for the name tuples), as stored in hyperparameters and checkpoints."""
        out = asdict(self)
        out["targets"], out["modules_to_save"] = list(self.targets), list(self.modules_to_save)
        return out

    def peft_config(self):
        """The ``peft.LoraConfig`` of these settings."""
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                          target_modules=list(self.targets), modules_to_save=list(self.modules_to_save) or None,
                          init_lora_weights=True)


def check_precision(settings: LoraSettings | None, precision: str) -> None:
    """Refuse a half-precision base without autocast (``trainer.precision`` ``bf16-mixed`` / ``16-mixed``):
    float32 activations would meet bf16 weights in a matmul.

    Raises:
        CosmosPolicyError: one line naming both settings.
    """
    if settings is not None and settings.base_dtype != "float32" and "mixed" not in str(precision):
        raise CosmosPolicyError(f"model.lora.base_dtype={settings.base_dtype} needs trainer.precision bf16-mixed "
                                f"(autocast), got {precision!r}; or set base_dtype: float32")


def base_fingerprint(transformer: nn.Module) -> str:
    """Identity of a DiT's (base) weights: SHA-256 over every tensor's name, shape and up to 4,096 values
    taken at an even stride (as float32), 16 hex digits. Cheap (a few MB read for the 2B) and
    different for any two bases that differ in architecture or training. Call it before
    :func:`add_lora` (or on a merged model); peft's wrapper names are mapped back to the base's.

    Returns:
        e.g. ``"3f2a9c0d11e4b7a8"`` (of a ``meta``-device model: names and shapes only).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(plain_state_dict(transformer.state_dict()).items()):
        if tensor.is_meta:  # no weights yet (a model built for FSDP or counting): the names and shapes only
            digest.update(f"{name}:{tuple(tensor.shape)}:meta".encode())
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def add_lora(transformer: nn.Module, settings: LoraSettings) -> dict[str, int]:
    """Add the adapters in place (diffusers ``add_adapter``): the base is frozen, the adapters and
    ``modules_to_save`` train; the frozen base is cast to ``settings.base_dtype``.

    Args:
        transformer: a ``CosmosTransformer3DModel`` with its base weights loaded (not sharded).

    Returns:
        ``{"trainable": n, "base": N}``: adapter + ``modules_to_save`` parameters, and the base's.

    Raises:
        CosmosPolicyError: a target or module name that matches no layer (one line naming it).
    """
    names = {n for n, _ in transformer.named_modules()}
    for target in settings.targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise CosmosPolicyError(f"model.lora.targets: {target!r} names no layer of the DiT (e.g. to_q, "
                                    f"ff.net.0.proj)")
    for module in settings.modules_to_save:
        if module not in names:
            raise CosmosPolicyError(f"model.lora.modules_to_save: {module!r} names no module of the DiT (e.g. "
                                    f"patch_embed.proj, proj_out)")
    try:
        transformer.add_adapter(settings.peft_config(), adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: e.g. a target that is not a supported layer type
        raise CosmosPolicyError(f"model.lora: peft refused the settings ({str(err).splitlines()[0]})") from None
    dtype = _BASE_DTYPES[settings.base_dtype]
    with torch.no_grad():
        for param in transformer.parameters():
            if not param.requires_grad and param.dtype != dtype and param.is_floating_point():
                param.data = param.data.to(dtype)
            elif param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" not in n and not _is_adapter_copy(n))
    return {"trainable": trainable, "base": base}


def has_lora(transformer: nn.Module) -> bool:
    """Whether peft adapters are in ``transformer``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in transformer.modules())


def _is_adapter_copy(name: str) -> bool:
    # peft's trained copy of a modules_to_save module (the original stays as original_module)
    return ".modules_to_save." in name


def plain_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiT state dict without peft's wrappers, as a model without adapters names it: adapter tensors
    (``lora_A`` / ``lora_B``) dropped, ``<layer>.base_layer.<p>`` -> ``<layer>.<p>``, and of a
    ``modules_to_save`` module the *original* (``original_module``) kept. On a merged model, or one
    without adapters, it is the identity."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key or _is_adapter_copy(key):
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def merge_lora_(transformer: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove every peft wrapper, in place (peft's
    ``merge``; ``modules_to_save`` modules are replaced by their trained copies). The result is a plain
    ``CosmosTransformer3DModel`` whose ``state_dict`` loads into a model built without LoRA, in float32.

    Returns:
        ``transformer``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    transformer.float()  # merge into float32 base weights (a bf16 base would round the update)
    replacements = []
    for name, module in transformer.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            replacements.append((name, module.modules_to_save[ADAPTER_NAME]))
        elif isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            replacements.append((name, module.get_base_layer()))
    for name, replacement in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, replacement)
    for param in transformer.parameters():
        param.requires_grad_(True)
    if hasattr(transformer, "peft_config"):  # diffusers' PEFT bookkeeping: no adapter is left
        del transformer.peft_config
    transformer._hf_peft_config_loaded = False
    return transformer


def adapter_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and ``modules_to_save`` tensors in peft's file naming (``get_peft_model_state_dict``:
    ``...to_q.lora_A.weight``, ``proj_out.weight``), float32 on CPU, for ``adapter_model.safetensors``."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def load_adapter_state_(transformer: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load peft-named adapter tensors (from :func:`adapter_state_dict`) into a model with adapters.

    Raises:
        CosmosPolicyError: tensors missing or left over (other targets or rank), one line naming ``where``.
    """
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_dict(transformer))
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CosmosPolicyError(f"{where}: the adapter does not fit the LoRA settings ({what}; {len(missing)} "
                                f"missing, {len(extra)} unexpected tensors)")
    set_peft_model_state_dict(transformer, dict(state), adapter_name=ADAPTER_NAME)


@dataclass
class LoraCounts:
    """Parameter counts of a LoRA configuration on a DiT (see :func:`count_lora_parameters`)."""

    adapter: int
    modules_to_save: int
    base: int
    per_target: dict[str, int] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return self.adapter + self.modules_to_save


def count_lora_parameters(transformer: nn.Module, settings: LoraSettings) -> LoraCounts:
    """Trainable parameters of ``settings`` on ``transformer`` without building adapters (works on a
    ``meta``-device model): ``rank x (in + out)`` per targeted linear layer, plus the full
    ``modules_to_save`` modules. The same numbers as peft builds (checked in ``tests/model/test_lora.py``)."""
    adapter, per_target, kept = 0, {}, 0
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in settings.targets):
            n = int(settings.rank) * (module.in_features + module.out_features)
            adapter += n
            suffix = next(t for t in settings.targets if name == t or name.endswith("." + t))
            per_target[suffix] = per_target.get(suffix, 0) + n
        if name in settings.modules_to_save:
            kept += sum(p.numel() for p in module.parameters())
    base = sum(p.numel() for p in transformer.parameters())
    return LoraCounts(adapter, kept, base, per_target)




# --------------------------------------------------------------------------------------- checkpoints


def base_identity(transformer: nn.Module, source: str | None, config: Any) -> dict[str, Any]:
    """What a LoRA checkpoint records about its base: ``{"source": hub id / file / None (random init),
    "revision": the Hub cache's commit of a Hub source (None otherwise or when not cached), "transformer":
    the DiT configuration, "fingerprint": base_fingerprint(...)}``. Call before :func:`add_lora`."""
    return {"source": source, "revision": _hub_revision(source), "transformer": config,
            "fingerprint": base_fingerprint(transformer)}


def _hub_revision(source: Any) -> str | None:
    """The cached commit of ``org/repo`` (or ``org/repo/file``) in the local Hub cache; nothing is downloaded."""
    import os

    if not isinstance(source, str) or os.path.exists(source) or source.startswith((".", "/", "~")) \
            or source.count("/") < 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return os.path.basename(snapshot_download(repo_id="/".join(source.split("/")[:2]), local_files_only=True))
    except Exception:  # not cached, or not a repository id
        return None


def adapter_checkpoint_state(state: Mapping[str, torch.Tensor], trainable: set[str],
                             prefix: str = "dit.") -> dict[str, torch.Tensor]:
    """The entries of a LightningModule ``state_dict`` that a LoRA checkpoint keeps: every trainable
    DiT tensor (adapters, ``modules_to_save`` copies) and everything outside the DiT (``prefix``);
    the frozen base is left out (it is rebuilt from its source)."""
    return {k: v for k, v in state.items() if not k.startswith(prefix) or k in trainable}


def check_lora_checkpoint(checkpoint: Mapping[str, Any], settings: LoraSettings | None,
                          identity: Mapping[str, Any] | None, expected_keys: set[str], where: Any,
                          prefix: str = "dit.") -> None:
    """Refuse, before any weight is copied, a checkpoint that does not fit this model's LoRA setup.

    Args:
        checkpoint: the Lightning checkpoint dict (``state_dict``, maybe :data:`LORA_CHECKPOINT_KEY`).
        settings: this model's LoRA settings (None: a model without LoRA).
        identity: this model's :func:`base_identity` (None without LoRA).
        expected_keys: the ``state_dict`` keys under ``prefix`` this model's LoRA checkpoints hold.
        where: the checkpoint's name for the message.

    Raises:
        CosmosPolicyError: one line: a LoRA checkpoint for a model without LoRA, a full checkpoint for a
            LoRA model, an adapter trained on another base (the fingerprints and sources named), or an
            adapter of other settings (rank, targets, modules_to_save).
    """
    where = where or "checkpoint"
    stored = checkpoint.get(LORA_CHECKPOINT_KEY)
    if stored and settings is None:
        raise CosmosPolicyError(f"{where}: a LoRA checkpoint (adapter only, base {stored['base'].get('source')!r}) "
                                f"for a model without model.lora; give the same lora settings, or merge it first: "
                                f"cosmos-policy export {where} --output merged.ckpt")
    if settings is None:
        return
    if not stored:
        raise CosmosPolicyError(f"{where}: a full checkpoint (no LoRA adapter) for a model with model.lora; start "
                                f"a LoRA fine-tune from its weights with model.init_from_checkpoint={where}")
    theirs, ours = stored.get("base") or {}, identity or {}
    if theirs.get("fingerprint") != ours.get("fingerprint"):
        raise CosmosPolicyError(f"{where}: LoRA adapter trained on base {theirs.get('source')!r} (fingerprint "
                                f"{theirs.get('fingerprint')}), but this model's base is {ours.get('source')!r} "
                                f"(fingerprint {ours.get('fingerprint')}); load it onto the base it was trained on")
    keys = {k for k in checkpoint.get("state_dict", {}) if k.startswith(prefix)}
    missing, extra = sorted(expected_keys - keys), sorted(keys - expected_keys)
    shape = ("rank", "alpha", "targets", "modules_to_save")  # what the adapter's tensors and scale depend on
    theirs_settings = stored.get("settings") or {}
    differs = [k for k in shape if list(np.atleast_1d(theirs_settings.get(k))) != list(np.atleast_1d(
        settings.to_dict()[k]))]
    if missing or extra or differs:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else \
            f"{differs[0]} {theirs_settings.get(differs[0])!r} vs {settings.to_dict()[differs[0]]!r}"
        raise CosmosPolicyError(f"{where}: the LoRA adapter (settings {stored.get('settings')}) does not fit "
                                f"model.lora {settings.to_dict()} ({what}; {len(missing)} missing, {len(extra)} "
                                f"unexpected tensors)")


__all__ = ["ADAPTER_NAME", "DEFAULT_MODULES_TO_SAVE", "DEFAULT_TARGETS", "LORA_CHECKPOINT_KEY", "LoraCounts",
           "LoraSettings", "adapter_checkpoint_state", "adapter_state_dict", "add_lora", "base_fingerprint",
           "check_precision",
           "base_identity", "check_lora_checkpoint", "count_lora_parameters", "has_lora", "load_adapter_state_",
           "merge_lora_", "plain_state_dict"]
