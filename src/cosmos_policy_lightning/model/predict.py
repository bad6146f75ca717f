"""``predict_step`` of the LightningModule: sampled action chunks and values on held-out shards (docs/method.md §3).

``cosmos-policy predict`` runs the data module's exact pass over the validation shards; for every
sample this draws the policy's action chunk and the value of the future state by parallel decoding
(one sampling run with the policy mask, the direct policy), and returns them in robot units next to
the ground truth, for :class:`~cosmos_policy_lightning.training.callbacks.PredictionWriter`.
"""

from __future__ import annotations

from typing import Any

import torch




@torch.no_grad()
def predict_batch(module, batch: dict[str, Any], num_steps: int, x0: torch.Tensor | None = None) -> dict[str, Any]:
    """Parallel-decode one batch.

    The true future images and vectors are in ``batch`` (the data contract) but never reach the
    sampler: every non-conditioning frame starts from noise, and the causal VAE keeps the current
    frames' latents independent of later pixel frames. Outputs go to robot units through the model's
    :class:`~cosmos_policy_lightning.processor.PolicyProcessor`, the same path a deployed policy takes.

    Args:
        module: a configured :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule` with an
            inference record.
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
    x0 = module.encode_batch(batch) if x0 is None else x0
    b = x0.shape[0]
    cond = module.conditioning("policy", b)
    gen = module.read(module.generate(x0, cond, batch["text"], batch.get("text_mask"), num_steps))
    processor = module.processor
    predicted = processor.to_robot({k: gen[k] for k in ("actions", "future_proprio", "value")})
    truth = processor.to_robot({"actions": batch["actions"], "future_proprio": batch["future_proprio"],
                                "proprio": batch["proprio"], "value": batch["value"]}, clamp=False)
    normalized = {
        "actions": processor.clamp_actions(gen["actions"]).float().cpu(),
        "true_actions": batch["actions"].float().cpu(),
        "future_proprio": gen["future_proprio"].float().cpu(),
        "true_future_proprio": batch["future_proprio"].float().cpu(),
        "proprio": batch["proprio"].float().cpu(),
    }
    out = {
        "episode": list(batch["episode"]),
        "step": batch["step"].cpu(),
        "success": batch["success"].cpu(),
        **predicted,
        **{f"true_{k}": truth[k] for k in ("actions", "future_proprio", "value")},
        "proprio": truth["proprio"],
    }
    out.update({f"{name}_normalized": x for name, x in normalized.items()})
    return out
