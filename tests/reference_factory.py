"""Small real files in the reference's formats: whole-model ``.pt`` state dicts named as the reference's
DiT names its parameters (``net.x_embedder.proj.1.weight``, ``net.blocks.0.self_attn.q_proj.weight``,
...) with its weightless buffers, ``dataset_statistics.json`` and the ``t5_embeddings.pkl`` pickle.

The names below are written from the reference's module structure (its ``MiniTrainDIT``: ``x_embedder``,
``t_embedder``, ``t_embedding_norm``, ``blocks`` with ``self_attn`` / ``cross_attn`` / ``mlp`` and
three ``adaln_modulation_*``, ``final_layer``), independently of diffusers' conversion, so the
import test checks that conversion against the reference's naming.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

_TOP = {
    "patch_embed.proj.weight": "x_embedder.proj.1.weight",
    "time_embed.t_embedder.linear_1.weight": "t_embedder.1.linear_1.weight",
    "time_embed.t_embedder.linear_2.weight": "t_embedder.1.linear_2.weight",
    "time_embed.norm.weight": "t_embedding_norm.weight",
    "norm_out.linear_1.weight": "final_layer.adaln_modulation.1.weight",
    "norm_out.linear_2.weight": "final_layer.adaln_modulation.2.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
_BLOCK = {
    "attn1": "self_attn", "attn2": "cross_attn",
    "to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "output_proj", "norm_q": "q_norm",
    "norm_k": "k_norm",
}
_BLOCK_WHOLE = {
    "ff.net.0.proj.weight": "mlp.layer1.weight", "ff.net.2.weight": "mlp.layer2.weight",
    "norm1.linear_1.weight": "adaln_modulation_self_attn.1.weight",
    "norm1.linear_2.weight": "adaln_modulation_self_attn.2.weight",
    "norm2.linear_1.weight": "adaln_modulation_cross_attn.1.weight",
    "norm2.linear_2.weight": "adaln_modulation_cross_attn.2.weight",
    "norm3.linear_1.weight": "adaln_modulation_mlp.1.weight",
    "norm3.linear_2.weight": "adaln_modulation_mlp.2.weight",
}


def reference_name(key: str) -> str:
    """The reference's name (without ``net.``) of a diffusers ``CosmosTransformer3DModel`` weight."""
    if key in _TOP:
        return _TOP[key]
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
    assert m, key
    block, rest = m.groups()
    if rest in _BLOCK_WHOLE:
        return f"blocks.{block}.{_BLOCK_WHOLE[rest]}"
    attn, sub, leaf = re.fullmatch(r"(attn[12])\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(weight)", rest).groups()
    return f"blocks.{block}.{_BLOCK[attn]}.{_BLOCK[sub]}.{leaf}"


def reference_state_dict(model: torch.nn.Module, ema_model: torch.nn.Module | None = None,
                         dtype: torch.dtype = torch.bfloat16) -> dict:
    """A whole-model state dict as the reference saves it: ``net.*`` (and ``net_ema.*``) weights, the
    DiT's weightless buffers, and parts of the model that are not the DiT."""
    out: dict = {}
    for prefix, m in (("net.", model), ("net_ema.", ema_model)):
        if m is None:
            continue
        for key, value in m.state_dict().items():
            out[prefix + reference_name(key)] = value.detach().to(dtype).clone()
        num_blocks = len(m.transformer_blocks)
        out[prefix + "pos_embedder.seq"] = torch.arange(128, dtype=torch.float32)
        out[prefix + "pos_embedder.dim_spatial_range"] = torch.arange(0, 20, 2, dtype=torch.float32) / 20
        out[prefix + "pos_embedder.dim_temporal_range"] = torch.arange(0, 12, 2, dtype=torch.float32) / 12
        for name in ("accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration"):
            out[prefix + name] = torch.tensor(1234, dtype=torch.int64)
        out[prefix + "accum_train_in_hours"] = torch.tensor(48.0)
        out[prefix + "t_embedding_norm._extra_state"] = io.BytesIO(b"")  # Transformer Engine, pickled BytesIO
        for i in range(num_blocks):
            for attn in ("self_attn", "cross_attn"):
                for norm in ("q_norm", "k_norm"):
                    out[f"{prefix}blocks.{i}.{attn}.{norm}._extra_state"] = torch.empty(0, dtype=torch.uint8)
    out["logvar.0.freqs"] = torch.randn(128)  # another part of the diffusion model, not the DiT
    return out


def write_reference_checkpoint(path: Path, model, ema_model=None, dtype=torch.bfloat16, drop=(), add=None) -> Path:
    """``torch.save`` :func:`reference_state_dict` to ``path``, without the keys in ``drop`` and with the
    extra entries ``add``."""
    state = reference_state_dict(model, ema_model, dtype)
    for key in drop:
        del state[key]
    state.update(add or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_reference_stats(path: Path, action_dim: int, proprio_dim: int, seed: int = 0) -> dict:
    """A ``dataset_statistics.json`` with the reference's keys; returns the values written."""
    rng = np.random.default_rng(seed)
    stats = {}
    for prefix, dim in (("actions", action_dim), ("proprio", proprio_dim)):
        lo = rng.uniform(-2, 0, dim)
        hi = lo + rng.uniform(0.5, 3, dim)
        stats.update({f"{prefix}_min": lo.tolist(), f"{prefix}_max": hi.tolist(),
                      f"{prefix}_mean": ((lo + hi) / 2).tolist(), f"{prefix}_std": ((hi - lo) / 4).tolist(),
                      f"{prefix}_median": ((lo + hi) / 2).tolist()})
    path.write_text(json.dumps(stats, indent=4))
    return stats


def write_t5_pickle(path: Path, lengths: dict[str, int], dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``t5_embeddings.pkl`` as the reference writes it: a plain pickle of ``{instruction: (1, 512, dim)
    bfloat16}``, zero after the instruction's ``lengths[instruction]`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    for text, n in lengths.items():
        emb = torch.zeros(1, 512, dim)
        emb[0, :n] = torch.randn(n, dim, generator=g)
        table[text] = emb.to(torch.bfloat16)
    with open(path, "wb") as f:
        pickle.dump(table, f)
    return table
