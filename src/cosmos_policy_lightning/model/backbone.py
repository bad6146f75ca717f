"""The video model's two networks, taken from diffusers (docs/method.md §1, §6): the Cosmos-Predict2 DiT
(``CosmosTransformer3DModel``) and the Wan2.1 causal video VAE (``AutoencoderKLWan``).

Nothing here reimplements a layer; this module only chooses configurations, loads weights and adapts
tensor layouts:

- :func:`build_transformer` makes a DiT from a named configuration (``cosmos-predict2-2b`` or
  ``tiny``) or a dict, randomly initialised, on any device including ``meta``, or from pretrained
  weights (hub id or local directory).
- :class:`VideoDiT` feeds it: 16 latent channels + condition-mask channel + all-zero padding-mask
  channel = 18 input channels, built here rather than by diffusers (whose padding-mask path needs
  torchvision), and a per-frame time of shape ``(B, 1, T, 1, 1)``.
- :class:`VideoVAE` wraps the frozen VAE: whole pixel sequence in one call, posterior mean,
  per-channel latent normalisation.
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

#: Latent channels of the Wan2.1 VAE (docs/method.md §1).
LATENT_CHANNELS = 16
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

#: The Wan2.1 VAE in diffusers format (the one Cosmos-Predict2 uses): (hub id, subfolder).
WAN21_VAE: tuple[str, str] = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae")

# Configuration keys that describe the architecture; a pretrained checkpoint must agree on them.
_ARCHITECTURE_KEYS = (
    "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "mlp_ratio", "text_embed_dim",
    "adaln_lora_dim", "max_size", "patch_size", "rope_scale", "extra_pos_embed_type",
)


def _diffusers():
    # Imported lazily: diffusers takes seconds to import and most commands never need it.
    import diffusers

    return diffusers


# ----------------------------------------------------------------------------------------- the DiT


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
    allowed = set(inspect.signature(_diffusers().CosmosTransformer3DModel.__init__).parameters) - {"self"}
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
    model_cls = _diffusers().CosmosTransformer3DModel
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
        from .reference_weights import is_reference_checkpoint, load_reference_transformer

        if is_reference_checkpoint(source):
            model = load_reference_transformer(source, config, text_embed_dim, torch_dtype=torch_dtype or torch.float32)
            return model.to(device) if device is not None else model
    model = _from_pretrained(model_cls, source, subfolder, "transformer", torch_dtype)
    _check_architecture(model.config, kwargs, source)
    adapt_input_channels_(model)
    return model.to(device) if device is not None else model


def _from_pretrained(model_cls, source: str, subfolder: str | None, default_subfolder: str, torch_dtype):
    """``model_cls.from_pretrained`` for a hub id or a local directory, failing in one line."""
    if subfolder is None:
        if os.path.isdir(source):
            has_own_config = os.path.isfile(os.path.join(source, "config.json"))
            if not has_own_config and os.path.isdir(os.path.join(source, default_subfolder)):
                subfolder = default_subfolder
        elif not os.path.exists(source):
            subfolder = default_subfolder  # a hub id: the diffusers pipeline layout
    try:
        return model_cls.from_pretrained(source, subfolder=subfolder, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"{source}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise CosmosPolicyError(f"{where}: cannot load {model_cls.__name__} weights: {first_line}") from err


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
    rms_norm = _diffusers().models.normalization.RMSNorm
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


# ----------------------------------------------------------------------------------------- the VAE


class VideoVAE(nn.Module):
    """The frozen Wan2.1 causal video VAE (``diffusers.AutoencoderKLWan``), docs/method.md §1.

    Always in eval mode (``train()`` is a no-op) with ``requires_grad=False``; encoding and decoding run
    without autograd. Latents are the posterior mean, normalised per channel with the configuration's
    ``latents_mean`` / ``latents_std``: ``z = (mu - mean) / std``, as Cosmos-Predict2 does (docs/method.md §1, §6).

    Args:
        source: a local directory (``save_pretrained`` layout, weights directly inside or in a ``vae/``
            subfolder), a hub id (default the Wan2.1 VAE, subfolder ``vae``), or a dict of
            ``AutoencoderKLWan`` keyword arguments for a randomly initialised VAE (tests).
        subfolder: checkpoint subfolder; by default ``vae`` for hub ids and for directories that have one.
        torch_dtype: parameter dtype (default float32; bf16 works on GPU).

    Raises:
        CosmosPolicyError: the VAE cannot be loaded or its configuration lacks a per-channel mean/std
            of ``z_dim`` entries.
    """

    def __init__(
        self,
        source: str | Mapping[str, Any] = WAN21_VAE[0],
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        vae_cls = _diffusers().AutoencoderKLWan
        if isinstance(source, Mapping):
            vae = vae_cls(**dict(source))
            if torch_dtype is not None:
                vae = vae.to(torch_dtype)
            name = "VAE config"
        else:
            name = os.fspath(source)
            vae = _from_pretrained(vae_cls, name, subfolder, "vae", torch_dtype)
        cfg = vae.config
        z_dim = int(cfg.z_dim)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is None or std is None or len(mean) != z_dim or len(std) != z_dim:
            raise CosmosPolicyError(f"{name}: expected latents_mean and latents_std with {z_dim} entries each in "
                                    f"the VAE config")
        vae.requires_grad_(False)
        self.vae = vae
        # Buffers so they follow .to(device); not persistent: the VAE config is their source of truth.
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(1, z_dim, 1, 1, 1),
                             persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> VideoVAE:
        """Stay in eval mode whatever is asked (Lightning calls ``train()`` on the whole model)."""
        return super().train(False)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Contribute nothing to a parent's state dict: the frozen VAE is reloaded from its source, so
        checkpoints (sharded ones included, which must match the model's keys exactly) never carry it.
        Call ``self.vae.state_dict()`` for its weights."""
        return destination if destination is not None else {}

    def weights_fingerprint(self) -> str:
        """``sha256:<16 hex>`` of the VAE's configuration and weights (dtype included): the identity of
        what it encodes, so latents cached with one VAE are never used with another (a retrained asset
        under the same path included). Hashing the 0.5 GB Wan2.1 VAE takes about a second; cached."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib
            import json

            # Private config entries (``_name_or_path``, versions) say where it came from, not what it is.
            config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
            h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.vae.state_dict().items()):
                h.update(name.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = "sha256:" + h.hexdigest()[:16]
        return self._fingerprint

    @property
    def z_dim(self) -> int:
        """Latent channels (16 for Wan2.1)."""
        return int(self.vae.config.z_dim)

    @property
    def temporal_compression(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(bool(d) for d in self.vae.config.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent row / column (8 for Wan2.1)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(z_dim, 1 + (frames - 1) // 4, height // 8, width // 8)`` for Wan2.1 compression factors."""
        return (self.z_dim, 1 + (frames - 1) // self.temporal_compression,
                height // self.spatial_compression, width // self.spatial_compression)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode a whole pixel sequence in one call (causal VAE, docs/method.md §1).

        Args:
            pixels: ``(B, 3, T, H, W)`` float in [-1, 1], ``T = 1 + 4k``, H and W multiples of 8.

        Returns:
            ``(B, 16, 1 + (T - 1) // 4, H / 8, W / 8)`` float32 normalised latents.

        Raises:
            CosmosPolicyError: wrong shape.
        """
        tc, sc = self.temporal_compression, self.spatial_compression
        if (pixels.dim() != 5 or pixels.shape[1] != 3 or (pixels.shape[2] - 1) % tc
                or pixels.shape[3] % sc or pixels.shape[4] % sc):
            raise CosmosPolicyError(f"VideoVAE.encode: expected pixels of shape (B, 3, 1 + {tc}k, H, W) with H, W "
                                    f"multiples of {sc}, got {tuple(pixels.shape)}")
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(dtype)).latent_dist
        return (posterior.mode().float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents back to pixels (inverse of :meth:`encode`'s normalisation).

        Args:
            latents: ``(B, 16, T', h, w)`` normalised latents.

        Returns:
            ``(B, 3, 1 + 4 (T' - 1), 8h, 8w)`` float32 pixels in [-1, 1].

        Raises:
            CosmosPolicyError: wrong shape.
        """
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise CosmosPolicyError(f"VideoVAE.decode: expected latents of shape (B, {self.z_dim}, T, h, w), "
                                    f"got {tuple(latents.shape)}")
        dtype = next(self.vae.parameters()).dtype
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(dtype)).sample.float()
