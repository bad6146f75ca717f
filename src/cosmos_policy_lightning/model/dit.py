"""The Cosmos-Predict2 DiT, taken from diffusers (``CosmosTransformer3DModel``; docs/method.md §1, §6).

Nothing here reimplements a layer; this module only chooses configurations, loads weights and adapts
tensor layouts:

- :func:`build_transformer` makes a DiT from a named configuration (``cosmos-predict2-2b``, ``small``
  or ``tiny``) or a dict, randomly initialised, on any device including ``meta``, or from pretrained
  weights (hub id, local directory or the reference ``.pt``).
- :class:`VideoDiT` feeds it: 16 latent channels + condition-mask channel + all-zero padding-mask
  channel = 18 input channels, built here rather than by diffusers (whose padding-mask path needs
  torchvision), and a per-frame time of shape ``(B, 1, T, 1, 1)``.

The frozen VAE is in ``model/vae.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CosmosPolicyError
from .loading import diffusers_module, from_pretrained
from .reference_weights import (is_reference_checkpoint, load_state_strict, read_reference_state_dict,
                                reference_to_diffusers, resolve_reference_file)
from .vae import LATENT_CHANNELS

#: DiT input channels: 16 latent + 1 condition mask + 1 padding mask (docs/method.md §2, §6).
DIT_IN_CHANNELS = LATENT_CHANNELS + 2

# Cosmos-Predict2-2B-Video2World (docs/method.md §6): hidden 2048, 28 blocks, ~1.96 B parameters.
_COSMOS_PREDICT2_2B: dict[str, Any] = dict(
    in_channels=DIT_IN_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=28,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 3.0, 3.0),
    concat_padding_mask=False,
    extra_pos_embed_type=None,
)

#: Named DiT configurations, in diffusers' ``CosmosTransformer3DModel`` argument names.
TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "cosmos-predict2-2b": _COSMOS_PREDICT2_2B,
    # The same architecture, CPU sized: hidden 128, 2 blocks, text width of MiniLM (384).
    # RoPE splits each head's 32 dims 12 (t) / 10 (h) / 10 (w); max_size only bounds RoPE positions.
    "tiny": {**_COSMOS_PREDICT2_2B, "num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 2,
             "text_embed_dim": 384, "adaln_lora_dim": 32},
    # CPU sized for training from the latent cache: hidden 192, 4 blocks, 3.3 M parameters. Chosen by
    # tools/benchmark_train.py on 2 cores (64x64 Meta-World layout): ~60 samples/s at batch 32 on one core,
    # about 4x the tiny model's cost per sample, i.e. roughly 9 minutes per 1,000 steps of batch 32.
    # RoPE splits each head's 48 dims 16 (t) / 16 (h) / 16 (w).
    "small": {**_COSMOS_PREDICT2_2B, "num_attention_heads": 4, "attention_head_dim": 48, "num_layers": 4,
              "text_embed_dim": 384, "adaln_lora_dim": 48},
}

#: Default pretrained weights per named configuration: (hub id, subfolder). The hub repository is
#: gated: accept its licence on huggingface.co and log in (``hf auth login``) before the first download.
PRETRAINED_TRANSFORMERS: dict[str, tuple[str, str]] = {
    "cosmos-predict2-2b": ("nvidia/Cosmos-Predict2-2B-Video2World", "transformer"),
}

# Configuration keys that describe the architecture; a pretrained checkpoint must agree on them.
_ARCHITECTURE_KEYS = (
    "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "mlp_ratio", "text_embed_dim",
    "adaln_lora_dim", "max_size", "patch_size", "rope_scale", "extra_pos_embed_type",
)




def transformer_config(config: str | Mapping[str, Any] = "tiny", text_embed_dim: int | None = None) -> dict[str, Any]:
    """Resolve a DiT configuration to ``CosmosTransformer3DModel`` keyword arguments.

    Args:
        config: a name in :data:`TRANSFORMER_CONFIGS`, or a dict of overrides applied on top of the
            named configuration given by its optional ``"base"`` key (default ``"tiny"``).
        text_embed_dim: if given, overrides ``text_embed_dim`` (the width D of the text embeddings,
            e.g. 384 for MiniLM, 1024 for T5-11B).

    Returns:
        A new dict of keyword arguments (tuples for ``max_size`` / ``patch_size`` / ``rope_scale``).

    Raises:
        CosmosPolicyError: unknown name or key, or input/output channels other than 18 / 16 with
            ``concat_padding_mask=False`` (the layout :class:`VideoDiT` feeds).
    """
    if isinstance(config, str):
        base_name, overrides = config, {}
    elif isinstance(config, Mapping):
        overrides = dict(config)
        base_name = overrides.pop("base", "tiny")
    else:
        raise CosmosPolicyError(f"transformer config: expected a name or a mapping, got {type(config).__name__}")
    if base_name not in TRANSFORMER_CONFIGS:
        raise CosmosPolicyError(f"transformer config: unknown name {base_name!r}; expected one of "
                                f"{sorted(TRANSFORMER_CONFIGS)}")
    kwargs = dict(TRANSFORMER_CONFIGS[base_name])
    allowed = set(inspect.signature(diffusers_module().CosmosTransformer3DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise CosmosPolicyError(f"transformer config: unknown key(s) {unknown} for CosmosTransformer3DModel")
    kwargs.update(overrides)
    if text_embed_dim is not None:
        kwargs["text_embed_dim"] = int(text_embed_dim)
    for key in ("max_size", "patch_size", "rope_scale"):
        kwargs[key] = tuple(kwargs[key])
    if (kwargs["in_channels"], kwargs["out_channels"], bool(kwargs["concat_padding_mask"])) != (
            DIT_IN_CHANNELS, LATENT_CHANNELS, False):
        raise CosmosPolicyError(
            f"transformer config: expected in_channels={DIT_IN_CHANNELS}, out_channels={LATENT_CHANNELS}, "
            f"concat_padding_mask=False (VideoDiT concatenates the condition and padding masks itself), got "
            f"{kwargs['in_channels']}, {kwargs['out_channels']}, {kwargs['concat_padding_mask']}")
    if kwargs["text_embed_dim"] < 1:
        raise CosmosPolicyError(f"transformer config: text_embed_dim must be >= 1, got {kwargs['text_embed_dim']}")
    return kwargs


def build_transformer(
    config: str | Mapping[str, Any] = "tiny",
    text_embed_dim: int | None = None,
    pretrained: str | bool | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    subfolder: str | None = None,
):
    """Build the Cosmos DiT (``diffusers.CosmosTransformer3DModel``) with 18 input channels (docs/method.md §6).

    Args:
        config: named configuration (``"cosmos-predict2-2b"``, ``"tiny"``) or dict, see
            :func:`transformer_config`.
        text_embed_dim: text embedding width D, overriding the configuration's.
        pretrained: None for random initialisation (PyTorch's default layer init, as diffusers does);
            a hub id or a local directory (diffusers ``save_pretrained`` layout, the weights directly
            inside or in a ``transformer/`` subfolder) to load with ``from_pretrained``; True for the
            configuration's default (``nvidia/Cosmos-Predict2-2B-Video2World`` for the 2B one); or a
            reference ``.pt`` / ``.pth`` whole-model checkpoint, local or on the Hub as
            ``<org>/<repo>/<file>.pt`` (e.g. the base model's
            ``nvidia/Cosmos-Predict2-2B-Video2World/model-480p-16fps.pt`` or a released Cosmos Policy),
            loaded strictly through diffusers' Cosmos key conversion (``model/reference_weights.py``). The
            checkpoint's input channels are adapted to the 18-channel layout: a checkpoint built with
            17 channels + padding mask (the released Video2World one) loads unchanged; one with fewer
            (16 latent, with or without padding mask) gets its latent (and padding) weights copied and
            the missing channels' weights zeroed, so it computes what it computed before.
        torch_dtype: parameter dtype (default float32).
        device: where to create the parameters for random initialisation, e.g. ``"meta"`` to build
            the 2B model without allocating memory (then ``to_empty`` + :func:`reset_parameters_`).
        subfolder: checkpoint subfolder; default ``"transformer"`` for hub ids and for local
            directories that have one.

    Returns:
        ``diffusers.CosmosTransformer3DModel`` with ``config.in_channels == 18`` and
        ``config.concat_padding_mask == False``.

    Raises:
        CosmosPolicyError: bad configuration; checkpoint not found or unreadable; checkpoint
            architecture differing from the requested configuration.
    """
    kwargs = transformer_config(config, text_embed_dim)
    model_cls = diffusers_module().CosmosTransformer3DModel
    if pretrained is None or pretrained is False:
        context = torch.device(device) if device is not None else contextlib.nullcontext()
        with context:
            model = model_cls(**kwargs)
        return model.to(torch_dtype) if torch_dtype is not None else model
    if device is not None and torch.device(device).type == "meta":
        raise CosmosPolicyError("build_transformer: pretrained weights cannot be loaded on the meta device")
    if pretrained is True:
        name = config if isinstance(config, str) else None
        if name not in PRETRAINED_TRANSFORMERS:
            raise CosmosPolicyError(f"build_transformer: configuration {name or 'dict'!r} has no default pretrained "
                                    f"weights; pass a hub id or a directory")
        source, default_subfolder = PRETRAINED_TRANSFORMERS[name]
        subfolder = subfolder or default_subfolder
    else:
        source = os.fspath(pretrained)
        if is_reference_checkpoint(source):
            model = load_reference_transformer(source, config, text_embed_dim, torch_dtype=torch_dtype or torch.float32)
            return model.to(device) if device is not None else model
    model = from_pretrained(model_cls, source, subfolder, "transformer", torch_dtype)
    _check_architecture(model.config, kwargs, source)
    adapt_input_channels_(model)
    return model.to(device) if device is not None else model


def load_reference_transformer(source: str | os.PathLike, config: str | Mapping[str, Any] = "cosmos-predict2-2b",
                               text_embed_dim: int | None = None, ema: bool = False,
                               torch_dtype: torch.dtype | None = torch.float32, trust_pickle: bool = False):
    """A ``CosmosTransformer3DModel`` with the weights of a reference checkpoint (read and key-converted by
    ``model/reference_weights.py``, loaded strictly into a model of our configuration).

    Args:
        source: local ``.pt`` / ``.pth`` file or Hub file ``<org>/<repo>/<path>``.
        config: our transformer configuration (``model/dit.py``; 18 input channels).
        text_embed_dim: overrides the configuration's text width.
        ema: take the EMA weights (``net_ema.``).
        torch_dtype: parameter dtype (float32 for training; None keeps the file's, e.g. bfloat16).
        trust_pickle: see :func:`~.reference_weights.read_reference_state_dict`.

    Returns:
        the model, in eval mode on the CPU.

    Raises:
        CosmosPolicyError: file not found / unreadable, or weights not matching the configuration.
    """
    path = resolve_reference_file(source)
    state = reference_to_diffusers(read_reference_state_dict(path, trust_pickle), ema=ema, source=os.fspath(source))
    model = build_transformer(config, text_embed_dim=text_embed_dim, device="meta")
    load_state_strict(model, state, os.fspath(source), torch_dtype)
    return model.eval()


def _check_architecture(loaded: Mapping[str, Any], requested: Mapping[str, Any], source: str) -> None:
    for key in _ARCHITECTURE_KEYS:
        have, want = loaded.get(key), requested.get(key)
        if isinstance(have, list):
            have = tuple(have)
        if have != want:
            raise CosmosPolicyError(f"{source}: checkpoint has {key}={have!r} but the requested configuration has "
                                    f"{want!r}; choose the matching config (e.g. 'cosmos-predict2-2b')")


def adapt_input_channels_(model) -> None:
    """Give a loaded ``CosmosTransformer3DModel`` the 18-channel input layout, in place.

    The patch embedding is a linear layer over ``channels x prod(patch_size)`` columns, channel-major.
    The target channel order is ``[16 latent, condition mask, padding mask]``, which is also what a
    17-channel + ``concat_padding_mask`` checkpoint (the released Video2World one) computes: its
    weights are kept as they are. Other checkpoints (16 latent channels, with or without padding
    mask) get their columns copied to the matching channels and zeros elsewhere. The model's config
    is updated (``in_channels=18, concat_padding_mask=False``) so ``save_pretrained`` round-trips.

    Raises:
        CosmosPolicyError: the checkpoint's input channels are not 16 or 17 (or 18 without padding
            mask, a no-op), or output channels not 16.
    """
    cfg = model.config
    in_channels, padding = int(cfg.in_channels), bool(cfg.concat_padding_mask)
    if (in_channels, padding) == (DIT_IN_CHANNELS, False):
        return  # already in our layout (a checkpoint saved by this framework)
    if in_channels not in (LATENT_CHANNELS, LATENT_CHANNELS + 1) or int(cfg.out_channels) != LATENT_CHANNELS:
        raise CosmosPolicyError(f"checkpoint: expected 16 or 17 input channels (or 18 without padding mask) and "
                                f"16 output channels, got {in_channels} and {cfg.out_channels}")
    # Target channel index of every source channel.
    source_to_target = list(range(LATENT_CHANNELS))
    if in_channels == LATENT_CHANNELS + 1:
        source_to_target.append(LATENT_CHANNELS)  # condition mask
    if padding:
        source_to_target.append(LATENT_CHANNELS + 1)  # padding mask
    if source_to_target != list(range(DIT_IN_CHANNELS)):
        proj = model.patch_embed.proj
        per_channel = math.prod(cfg.patch_size)
        new = nn.Linear(DIT_IN_CHANNELS * per_channel, proj.out_features, bias=proj.bias is not None,
                        device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            for src, dst in enumerate(source_to_target):
                new.weight[:, dst * per_channel:(dst + 1) * per_channel] = \
                    proj.weight[:, src * per_channel:(src + 1) * per_channel]
            if proj.bias is not None:
                new.bias.copy_(proj.bias)
        model.patch_embed.proj = new
    model.register_to_config(in_channels=DIT_IN_CHANNELS, concat_padding_mask=False)


def reset_parameters_(module: nn.Module) -> nn.Module:
    """Initialise every parameter of a (materialised) DiT as its constructor would.

    For models built on the ``meta`` device and then ``to_empty``-ed: calls ``reset_parameters()``
    where a submodule has it (``nn.Linear``, ``nn.LayerNorm``) and sets the weights of diffusers'
    ``RMSNorm`` (which has none: QK norms and the time-embedding norm) to one.

    Returns:
        ``module``, initialised in place.
    """
    rms_norm = diffusers_module().models.normalization.RMSNorm
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, rms_norm):
                if getattr(sub, "weight", None) is not None:
                    sub.weight.fill_(1.0)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
            elif hasattr(sub, "reset_parameters") and any(True for _ in sub.parameters(recurse=False)):
                sub.reset_parameters()
    return module


class VideoDiT(nn.Module):
    """The DiT as the framework calls it: latents, per-frame time, conditioning mask, text (docs/method.md §2, §6).

    Builds the 18-channel input itself: 16 latent channels, a condition-mask channel (1 on
    conditioning frames, broadcast over height and width) and an all-zero padding-mask channel.
    Time goes to diffusers as ``(B, 1, T, 1, 1)`` (one AdaLN time embedding per latent frame).

    Args:
        config, text_embed_dim, pretrained, torch_dtype, device: passed to :func:`build_transformer`
            (ignored when ``transformer`` is given).
        transformer: an already built ``CosmosTransformer3DModel`` with the 18-channel layout.
        fps: frame rate for diffusers' RoPE temporal scaling. Default None: no scaling, as
            Cosmos-Predict2-2B was trained (its RoPE has fps modulation disabled); diffusers' own
            Video2World pipeline passes 16, which stretches temporal positions by 24/16.
    """

    def __init__(
        self,
        config: str | Mapping[str, Any] = "tiny",
        text_embed_dim: int | None = None,
        pretrained: str | bool | None = None,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        transformer: nn.Module | None = None,
        fps: float | None = None,
    ) -> None:
        super().__init__()
        if transformer is None:
            transformer = build_transformer(config, text_embed_dim, pretrained, torch_dtype, device)
        cfg = transformer.config
        if (cfg.in_channels, bool(cfg.concat_padding_mask)) != (DIT_IN_CHANNELS, False):
            raise CosmosPolicyError(f"VideoDiT: transformer must have in_channels={DIT_IN_CHANNELS} and "
                                    f"concat_padding_mask=False, got {cfg.in_channels}, {cfg.concat_padding_mask}")
        self.transformer = transformer
        self.fps = fps

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (the units to ``fully_shard`` / checkpoint)."""
        return self.transformer.transformer_blocks

    @property
    def text_embed_dim(self) -> int:
        """Width D of the text embeddings the cross-attention expects."""
        return int(self.transformer.config.text_embed_dim)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """(t, h, w) patch size; latent height and width must be multiples of h and w."""
        return tuple(self.transformer.config.patch_size)

    def enable_activation_checkpointing(self) -> None:
        """Recompute every transformer block in the backward pass (diffusers' gradient checkpointing,
        ``torch.utils.checkpoint`` with ``use_reentrant=False``; docs/method.md §5)."""
        self.transformer.enable_gradient_checkpointing()

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        condition_mask: torch.Tensor,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output ``F`` of docs/method.md §3 (feed it ``c_in * x_sigma``; see ``Denoiser``).

        Args:
            x: ``(B, 16, T, h, w)`` preconditioned latents; h, w multiples of the patch size.
            t: ``(B, T)`` rectified-flow time ``sigma / (1 + sigma)`` per frame, in [0, 1) (0 on
                conditioning frames).
            condition_mask: ``(B, T)`` bool, True on conditioning frames.
            text: ``(B, L, D)`` text embeddings, D = :attr:`text_embed_dim`; None or ``L = 0`` means
                no text (a single zero token, which adds exactly nothing through cross-attention).
            text_mask: ``(B, L)`` bool, True on real tokens, or None to attend to all L tokens (the
                released Cosmos-Predict2 saw T5 embeddings zero-padded to 512 tokens without a mask).
                Masked tokens are ignored; a sample with no real token gets no text contribution.

        Returns:
            ``(B, 16, T, h, w)`` in ``x``'s dtype.

        Raises:
            CosmosPolicyError: mismatched shapes.
        """
        if x.dim() != 5 or x.shape[1] != LATENT_CHANNELS:
            raise CosmosPolicyError(f"VideoDiT: expected x of shape (B, {LATENT_CHANNELS}, T, h, w), got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        _, p_h, p_w = self.patch_size
        if height % p_h or width % p_w:
            raise CosmosPolicyError(f"VideoDiT: latent height/width {height}x{width} must be multiples of the patch "
                                    f"size {p_h}x{p_w}")
        if tuple(t.shape) != (batch, frames):
            raise CosmosPolicyError(f"VideoDiT: expected t of shape {(batch, frames)}, got {tuple(t.shape)}")
        if tuple(condition_mask.shape) != (batch, frames):
            raise CosmosPolicyError(f"VideoDiT: expected condition_mask of shape {(batch, frames)}, "
                                    f"got {tuple(condition_mask.shape)}")
        dtype = self.transformer.patch_embed.proj.weight.dtype
        text, attention_mask = self._prepare_text(text, text_mask, batch, x.device, dtype)

        cond = condition_mask.to(dtype)[:, None, :, None, None].expand(batch, 1, frames, height, width)
        padding = torch.zeros(batch, 1, frames, height, width, dtype=dtype, device=x.device)
        hidden = torch.cat([x.to(dtype), cond, padding], dim=1)
        timestep = t.to(torch.float32).view(batch, 1, frames, 1, 1)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=text,
            attention_mask=attention_mask,
            fps=self.fps,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def _prepare_text(self, text, text_mask, batch: int, device, dtype):
        dim = self.text_embed_dim
        if text is None or text.shape[1] == 0:
            if text is not None and (text.dim() != 3 or text.shape[0] != batch):
                raise CosmosPolicyError(f"VideoDiT: expected text of shape ({batch}, L, {dim}), got {tuple(text.shape)}")
            # One zero token: keys and values are zero (no biases), so cross-attention adds zero.
            return torch.zeros(batch, 1, dim, dtype=dtype, device=device), None
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != dim:
            raise CosmosPolicyError(f"VideoDiT: expected text of shape ({batch}, L, {dim}), got {tuple(text.shape)}")
        text = text.to(dtype)
        if text_mask is None:
            return text, None
        if tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise CosmosPolicyError(f"VideoDiT: expected text_mask of shape {tuple(text.shape[:2])}, "
                                    f"got {tuple(text_mask.shape)}")
        mask = text_mask.to(device=device, dtype=torch.bool)
        # Zero the padding tokens, and let a sample without any real token attend to all of its
        # (now zero) tokens: an all-False row would make the attention softmax NaN. No host sync.
        text = text * mask[..., None].to(dtype)
        mask = mask | ~mask.any(dim=1, keepdim=True)
        return text, mask
