"""Tiny real checkpoints for the inference tests: a converted dataset written by ``shard_factory``, a
tiny random Wan VAE saved in ``save_pretrained`` layout, and one real Lightning ``fit`` step, then
``trainer.save_checkpoint`` -- the same path ``cosmos-policy fit`` takes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.embodiment import Embodiment, load_embodiment
from cosmos_policy_lightning.inference_record import InferenceRecord
from cosmos_policy_lightning.model.vae import VideoVAE
from cosmos_policy_lightning.model.module import CosmosPolicyModule
from cosmos_policy_lightning.normalization import DatasetStats, Stats

from .shard_factory import standard_episodes, write_dataset

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.0] * 16, latents_std=[1.0] * 16)


def toy_record(embodiment, text_encoder: str = "none") -> InferenceRecord:
    """An inference record with statistics of uniform random data in [-1, 1] (for models built
    without a dataset: the text-conditioning and benchmark paths)."""
    emb = load_embodiment(embodiment)
    rng = np.random.default_rng(0)
    stats = {m: Stats.compute(rng.uniform(-1, 1, (16, d))) for m, d in (("action", emb.action.dim),
                                                                       ("proprio", emb.proprio.dim))}
    return InferenceRecord(emb, DatasetStats("toy", stats, stats), text_encoder)


def tiny_vae_dir(root: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny ``AutoencoderKLWan`` saved under ``root/tiny_vae`` (weights + config),
    so a checkpoint that records this path reloads the very same VAE."""
    path = Path(root) / "tiny_vae"
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        VideoVAE(TINY_VAE).vae.save_pretrained(str(path))
    return path


def make_checkpoint(root: Path, embodiment: Embodiment | None = None, text_encoder=None, steps: int = 1,
                    objective_mix: dict[str, float] | None = None, augment: bool = True, seed: int = 0,
                    episodes=None, max_text_tokens: int = 512) -> Path:
    """Write a dataset, fit ``steps`` optimizer steps with a real ``lightning.Trainer`` and save a checkpoint.

    Args:
        root: working directory (dataset in ``root/data``, checkpoint ``root/model.ckpt``).
        embodiment: the robot (default: shard_factory's toy robot, 2 cameras 32x32, P=3, A=2, K=4).
        text_encoder: encoder for the dataset's text cache; its identity must be rebuildable by
            ``build_text_encoder`` (``NullTextEncoder`` or MiniLM) for the policy to load it.
        augment: data module augmentation (the checkpoint then records the test-time centre crop).
        max_text_tokens: the data module's token limit (recorded in the checkpoint).

    Returns:
        the checkpoint path.
    """
    from cosmos_policy_lightning.text import NullTextEncoder

    root = Path(root)
    data = root / "data"
    write_dataset(data, episodes or standard_episodes(3, 2, 1, 1, length=6), embodiment=embodiment, seed=seed,
                  text_encoder=text_encoder or NullTextEncoder())
    dm = CosmosDataModule(str(data), batch_size=2, num_workers=0, shuffle_buffer=8, augment=augment, seed=seed,
                          max_text_tokens=max_text_tokens, objective_mix=objective_mix or {"policy": 0.5, "world_model": 0.25, "value": 0.25})
    torch.manual_seed(seed)
    module = CosmosPolicyModule(embodiment=dm.embodiment.to_dict(), text_dim=dm.text_dim,
                                vae=str(tiny_vae_dir(root)), image_log_every_n_steps=0, warmup_steps=1,
                                inference_record=dm.inference_record())
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    path = root / "model.ckpt"
    trainer.save_checkpoint(str(path))
    return path
