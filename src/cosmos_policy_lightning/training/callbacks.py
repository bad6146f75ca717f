"""Training callbacks usable from YAML recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..atomic import ensure_writable_dir, write_bytes_atomic
from ..storage import location


def batch_size(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (the length of its ``objective`` vector)."""
    return int(batch["objective"].shape[0])


class SampleThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting samples of our batch dicts: logs samples/s, batches/s
    and, where the device's peak FLOP/s is known (e.g. H100), MFU from the module's
    ``flops_per_batch`` estimate. YAML-friendly: no callable argument."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=batch_size, window_size=window_size)


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict_step`` returned (``model/predict.py``) once the predict pass ends.

    Files, written to a temporary name and renamed (``-rank<r>`` is added to the names when several
    processes predict):

    * ``<output_dir>/predictions.npz``: ``episode`` (str), ``step``, ``success``, ``actions`` /
      ``true_actions`` (N, K, A) and ``future_proprio`` / ``true_future_proprio`` (N, P) in robot
      units, ``value`` / ``true_value`` (N,) in [0, 1];
    * ``<output_dir>/predictions.jsonl``: one line per sample with episode, step, success, the
      predicted and true value and the mean absolute action error (robot units);
    * ``<output_dir>/summary.json``: sample count, action MAE per dimension and overall, value MAE.

    YAML::

        trainer:
          callbacks:
            - class_path: cosmos_policy_lightning.training.callbacks.PredictionWriter
              init_args: {output_dir: runs/predict}

    Args:
        output_dir: directory receiving the files (created).
    """

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # A read-only or misnamed output_dir is refused before the predict pass, not after it.
        if stage == "predict":
            ensure_writable_dir(self.output_dir, "PredictionWriter output_dir")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        batches = [b for b in batches if b]
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not batches:
            rank_zero_warn("PredictionWriter: the predict pass produced no samples (no validation shards?)")
            return
        arrays: dict[str, np.ndarray] = {"episode": np.asarray([e for b in batches for e in b["episode"]])}
        for key in [k for k in batches[0] if k != "episode"]:
            arrays[key] = torch.cat([b[key] for b in batches]).numpy()
        write_bytes_atomic(self.output_dir / f"predictions{suffix}.npz", lambda f: np.savez(f, **arrays))
        err = np.abs(arrays["actions"] - arrays["true_actions"])          # (N, K, A)
        lines = [json.dumps({"episode": str(e), "step": int(s), "success": bool(ok), "value": float(v),
                             "true_value": float(tv), "action_mae": float(a.mean())})
                 for e, s, ok, v, tv, a in zip(arrays["episode"], arrays["step"], arrays["success"],
                                               arrays["value"], arrays["true_value"], err)]
        text = ("\n".join(lines) + "\n").encode()
        write_bytes_atomic(self.output_dir / f"predictions{suffix}.jsonl", lambda f: f.write(text))
        names = pl_module.embodiment.action.names or [str(i) for i in range(err.shape[-1])]
        summary = {"samples": int(err.shape[0]), "action_mae": float(err.mean()),
                   "action_mae_per_dim": {n: float(x) for n, x in zip(names, err.mean(axis=(0, 1)))},
                   "value_mae": float(np.abs(arrays["value"] - arrays["true_value"]).mean())}
        write_bytes_atomic(self.output_dir / f"summary{suffix}.json",
                      lambda f: f.write(json.dumps(summary, indent=2).encode()))


#: Largest instruction-embedding table stored in a checkpoint (bytes, float16); larger ones stay in the data.
MAX_CHECKPOINT_TEXT_BYTES = 256 * 2**20


class InstructionEmbeddingsInCheckpoint(Callback):
    """Stores the embeddings of the training instructions in every checkpoint
    (``checkpoint["cosmos_policy"]["text_embeddings"]``: instruction -> float16 ``(L, D)``, real tokens),
    from the data module's ``<data_dir>/text_embeddings/`` cache, so ``serve``, ``evaluate``,
    ``CosmosPolicy`` and ``push-to-hub`` need neither the data folder nor the text encoder (T5-11B: 19 GB)
    for the instructions the policy was trained on. ``cosmos-policy fit`` adds it (``training/cli.py``).

    A table over :data:`MAX_CHECKPOINT_TEXT_BYTES` is left out with a warning (the encoder then encodes).
    """

    def __init__(self) -> None:
        self._table: dict[str, torch.Tensor] | None = None

    def _embeddings(self, trainer) -> dict[str, torch.Tensor]:
        if self._table is None:
            from ..text import TextEmbeddingCache

            self._table = {}
            data_dir = getattr(trainer.datamodule, "data_dir", None) if trainer.datamodule is not None else None
            directory = location(str(data_dir)) / "text_embeddings" if data_dir else None
            if directory is not None and (directory / "index.json").is_file():
                cache = TextEmbeddingCache(directory)
                if cache.identity is not None:
                    table = {t: torch.from_numpy(np.asarray(cache.get(t))).to(torch.float16) for t in cache.instructions}
                    size = sum(v.numel() * 2 for v in table.values())
                    if size <= MAX_CHECKPOINT_TEXT_BYTES:
                        self._table = table
                    else:
                        rank_zero_warn(f"{directory}: {len(table)} instruction embeddings ({size / 2**20:.0f} MB) are "
                                       f"not stored in the checkpoint; deployment will encode instructions")
        return self._table

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        from ..model.module import CHECKPOINT_KEY

        table = self._embeddings(trainer)
        if table:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["text_embeddings"] = table


class FinalCheckpoint(Callback):
    """Writes the ``last`` checkpoint of every ``ModelCheckpoint(save_last=...)`` when training ends at a
    step it has not saved: a ``max_time`` stop (Lightning's Timer), the end of ``max_steps`` between two
    ``every_n_train_steps`` saves, SIGTERM (a pre-empted job: Lightning stops at the next batch boundary)
    or Ctrl-C. ``--ckpt_path last`` then resumes from the step training reached, not the previous save
    (Lightning's own ``on_train_end`` writes ``last`` only when no checkpoint was written at all).
    ``cosmos-policy fit`` adds it (``training/cli.py``).
    """

    def _save(self, trainer, why: str) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == 0:
            return
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
                continue
            if callback._last_global_step_saved == trainer.global_step:
                continue  # saved at this very step already
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            rank_zero_info(f"{why}: saved the final checkpoint at step {trainer.global_step} to "
                           f"{callback.last_model_path}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, "training stopped")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self._save(trainer, type(exception).__name__)
