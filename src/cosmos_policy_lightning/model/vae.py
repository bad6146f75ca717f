"""The frozen Wan2.1 causal video VAE, taken from diffusers (``AutoencoderKLWan``; docs/method.md §1, §6).

Nothing here reimplements a layer: :class:`VideoVAE` loads the VAE, freezes it, encodes a whole pixel
sequence in one call (posterior mean) and applies the per-channel latent normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CosmosPolicyError
from .loading import diffusers_module, from_pretrained

#: Latent channels of the Wan2.1 VAE (docs/method.md §1).
LATENT_CHANNELS = 16

#: The Wan2.1 VAE in diffusers format (the one Cosmos-Predict2 uses): (hub id, subfolder).
WAN21_VAE: tuple[str, str] = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae")


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
        vae_cls = diffusers_module().AutoencoderKLWan
        if isinstance(source, Mapping):
            vae = vae_cls(**dict(source))
            if torch_dtype is not None:
                vae = vae.to(torch_dtype)
            name = "VAE config"
        else:
            name = os.fspath(source)
            vae = from_pretrained(vae_cls, name, subfolder, "vae", torch_dtype)
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
