"""``predict_step`` of the LightningModule: sampled action chunks and values on held-out shards (docs/method.md §3).

``cosmos-policy predict`` runs the data module's exact pass over the validation shards; for every
sample this draws the policy's action chunk and the value of the future state by parallel decoding
(one sampling run with the policy mask, the direct policy), and returns them in robot units next to
the ground truth, for :class:`~cosmos_policy_lightning.training.callbacks.PredictionWriter`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layout import OBJECTIVES
from .sequence import read_vectors, value_to_unit


@torch.no_grad()
def predict_batch(module, batch: dict[str, Any], num_steps: int, x0: torch.Tensor | None = None) -> dict[str, Any]:
    """Parallel-decode one batch.

    The true future images and vectors are in ``batch`` (the data contract) but never reach the
    sampler: every non-conditioning frame starts from noise, and the causal VAE keeps the current
    frames' latents independent of later pixel frames.

    Args:
        module: a configured :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule` with statistics.
        batch: a batch of the data module (``data/datamodule.py``).
        num_steps: denoising steps (docs/method.md §3: 5).
        x0: the batch's clean latents if already encoded (``module.encode_batch``); only the
            conditioning frames are read.

    Returns:
        dict of CPU tensors / lists, B rows each: ``episode`` (list[str]), ``step`` (B,),
        ``success`` (B,), ``actions`` / ``true_actions`` (B, K, A) robot units, ``future_proprio`` /
        ``true_future_proprio`` / ``proprio`` (B, P) robot units (``proprio``: the current step's, the
        copy baseline of the future proprio), ``value`` / ``true_value`` (B,) in [0, 1]; and the same
        vectors in the normalised [-1, 1] space of training under ``<name>_normalized``.
    """
    emb, layout = module.embodiment, module.layout
    x0 = module.encode_batch(batch) if x0 is None else x0
    b = x0.shape[0]
    cond = module.cond_table[OBJECTIVES.index("policy")].expand(b, -1)
    gen = read_vectors(module.generate(x0, cond, batch["text"], batch.get("text_mask"), num_steps), layout,
                       emb.proprio.dim, emb.action.chunk_size, emb.action.dim)
    act, prop = module.normalizer("action"), module.normalizer("proprio")

    def robot(normalizer, x: torch.Tensor) -> torch.Tensor:
        return normalizer.unnormalize(x.double()).float().cpu()

    normalized = {
        "actions": gen["actions"].clamp(-1, 1).float().cpu(),
        "true_actions": batch["actions"].float().cpu(),
        "future_proprio": gen["future_proprio"].float().cpu(),
        "true_future_proprio": batch["future_proprio"].float().cpu(),
        "proprio": batch["proprio"].float().cpu(),
    }
    out = {
        "episode": list(batch["episode"]),
        "step": batch["step"].cpu(),
        "success": batch["success"].cpu(),
        **{name: robot(act if "actions" in name else prop, x) for name, x in normalized.items()},
        "value": value_to_unit(gen["value"]).cpu(),
        "true_value": value_to_unit(batch["value"].float()).cpu(),
    }
    out.update({f"{name}_normalized": x for name, x in normalized.items()})
    return out
