"""The LightningModule: one network trained as policy, world model and value function (docs/method.md §2, §3, §5).

One ``training_step`` serves every objective. Per sample:

1. build the pixel sequence from the layout and encode it with the frozen VAE in one call;
2. inject proprio, action chunk and value into their latent frames;
3. pick the sample's objective: its conditioning mask (clean frames) and loss mask;
4. noise the whole clip at one sigma, frame-replace the conditioning frames with their clean latents,
   run the DiT with per-frame time 0 on them, replace their outputs with the clean latents;
5. weighted x0 loss on the objective's loss frames.

The checkpoint carries the data module's :class:`~cosmos_policy_lightning.inference_record.InferenceRecord`
(embodiment, layout, statistics, text encoder, token limit, objective mix, test-time transform) under
``checkpoint["cosmos_policy"]``, so inference needs nothing else. The model never reaches into the data
module: the record arrives as the typed ``inference_record`` argument (linked by the CLI).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC

from ..embodiment import Embodiment, load_embodiment
from ..errors import CosmosPolicyError
from ..layout import OBJECTIVES, SequenceLayout, objective_index
from ..inference_record import InferenceRecord
from ..normalization import DatasetStats, Normalizer
from ..processor import PolicyProcessor, value_to_unit
from ..shipped import resolve_path
from ..text import T5_MAX_TOKENS, pad_text_tokens, uses_padded_text
from . import diffusion
from .dit import VideoDiT
from .vae import VideoVAE
from .predict import predict_batch
from .schedule import lr_multiplier
from .skill import ErrorTable, skill_metrics
from .value_report import TaskValueReport
from .sequence import encode_pixel_sequence, inject_vectors, read_vectors, unit_range_to_images
from .rng import rank_generator, run_seed, sample_generator
from .warm_start import load_dit_weights
from . import lora as lora_adapters

CHECKPOINT_KEY = "cosmos_policy"


def refuse_other_robot(stored: dict, embodiment: Embodiment, where: Any = None) -> None:
    """Refuse to resume or test a checkpoint of another robot: everything the weights and statistics
    depend on must agree (camera slots in order, image size, proprio / action dims, chunk size, gamma).
    Fine-tuning on a new robot starts from weights only (``init_from_checkpoint``).

    Raises:
        CosmosPolicyError: one line naming the checkpoint and the first field that differs.
    """
    theirs = Embodiment.from_dict(stored, source=f"{where or 'checkpoint'}:embodiment")
    diff = theirs.difference(embodiment, "checkpoint")  # the one rule (embodiment.COMPATIBILITY)
    if diff is not None:
        name, a, b = diff
        raise CosmosPolicyError(f"{where or 'checkpoint'}: trained for embodiment {theirs.name!r} with {name} = "
                                    f"{a}, but the data and model are for {embodiment.name!r} with {name} = {b}; use "
                                    f"a checkpoint of this robot (model.init_from_checkpoint starts a new one)")


def modality_frames(layout: SequenceLayout) -> dict[str, list[int]]:
    """Target modalities whose latent-space L1 is logged (docs/method.md §3) -> their latent indices."""
    out = {"action": [layout.index("action")], "future_proprio": [layout.index("future_proprio")]}
    for cam in layout.camera_names:
        out[f"future_image_{cam}"] = [layout.index(f"future_image/{cam}")]
    out["value"] = [layout.index("value")]
    return out


class CosmosPolicyModule(L.LightningModule):
    """Cosmos Policy: a latent video DiT as policy + world model + value function.

    Args:
        embodiment: embodiment YAML path or its dict (linked from the data module by the CLI).
        text_dim: width D of the cached text embeddings (linked from the data module).
        transformer: DiT config name (``tiny`` | ``cosmos-predict2-2b``) or a dict of
            ``CosmosTransformer3DModel`` arguments.
        pretrained_transformer: hub id or local directory of pretrained DiT weights (diffusers format), or
            a reference ``.pt`` checkpoint, local or ``<org>/<repo>/<file>.pt`` on the Hub (e.g. the base
            model's ``nvidia/Cosmos-Predict2-2B-Video2World/model-480p-16fps.pt``); None = random init.
        vae: local directory / hub id of an ``AutoencoderKLWan`` (e.g. ``assets/tiny_wan_vae`` or the
            Wan2.1 VAE) or a config dict (random init, tests only).
        auxiliary_targets: keep the loss on the auxiliary targets (policy: s' and V; world model: V).
        learning_rate, betas, eps, weight_decay: AdamW (docs/method.md §5: 1e-4, (0.9, 0.99), 1e-8, 0.1).
        warmup_steps, decay_steps, decay_factor, final_factor: the reference's schedule
            (``model/schedule.py``): warm-up, linear 1 -> 0.3 until ``decay_steps``, then flat 0.06.
        grad_clip_norm: clip the global gradient norm (docs/method.md §5: 1.0); 0 disables.
        activation_checkpointing: recompute every DiT block in the backward pass.
        image_log_every_n_steps: how often the image grid (current / true future / predicted future
            frames) goes to TensorBoard; 0 disables.
        test_num_steps: denoising steps of the sampler in ``test_step`` and ``predict_step`` (docs/method.md §3: 5).
        init_from_checkpoint: start from the DiT weights of this ``.ckpt`` (weights only: a new run with
            fresh optimizer and schedule, e.g. the planning fine-tune on rollouts; see ``warm_start.py``).
        text_conditioning: ``auto`` (default: T5 text zero-padded to 512 tokens without attention mask,
            as the pretrained and released weights were trained; other encoders masked), ``padded`` or
            ``masked`` (``text.py``).
        lora: LoRA fine-tuning through peft (``model/lora.py``): ``{rank, alpha, dropout, targets,
            modules_to_save, base_dtype}`` (defaults: rank 16, alpha 16, attention + MLP projections,
            ``patch_embed.proj`` and ``proj_out`` trained fully), ``true`` for the defaults, or None (full
            fine-tuning). The base comes from ``pretrained_transformer`` / ``init_from_checkpoint``; only
            the adapters and ``modules_to_save`` train, and checkpoints hold only them plus the base's
            identity (a checkpoint on another base is refused).
        inference_record: the data module's ``inference_record().to_dict()`` (linked by the CLI; from
            Python the :class:`~cosmos_policy_lightning.inference_record.InferenceRecord` itself is
            accepted): statistics, text encoder, token limit, objective mix and test-time transform, stored
            in every checkpoint. Needed for ``test`` / ``predict`` and inference, not for training; a loaded
            checkpoint's own record replaces it.

    Raises:
        CosmosPolicyError: an inference record of another robot than ``embodiment``; bad ``lora`` settings.
    """

    def __init__(
        self,
        embodiment: str | dict | None = None,
        text_dim: int = 384,
        transformer: str | dict = "tiny",
        pretrained_transformer: str | None = None,
        vae: str | dict = "assets/tiny_wan_vae",
        auxiliary_targets: bool = True,
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        warmup_steps: int = 1000,
        decay_steps: int = 30000,
        decay_factor: float = 0.3,
        final_factor: float = 0.06,
        grad_clip_norm: float = 1.0,
        activation_checkpointing: bool = False,
        image_log_every_n_steps: int = 200,
        test_num_steps: int = 5,
        init_from_checkpoint: str | None = None,
        text_conditioning: str = "auto",
        inference_record: dict | None = None,
        lora: dict | bool | None = None,
    ):
        super().__init__()
        if embodiment is None:
            raise ValueError("model.embodiment is required (the CLI links it from data.embodiment)")
        self.embodiment: Embodiment = load_embodiment(embodiment)
        # The record lives once in a checkpoint: in checkpoint["cosmos_policy"], not in the hyperparameters.
        self.save_hyperparameters(ignore=["inference_record"])
        self.hparams["embodiment"] = self.embodiment.to_dict()  # self-contained checkpoints
        self.lora_settings = lora_adapters.LoraSettings.from_value(lora)
        self.hparams["lora"] = self.lora_settings.to_dict() if self.lora_settings is not None else None
        self._lora_base: dict | None = None  # the base's identity (model/lora.py base_identity)
        self.layout = SequenceLayout.from_embodiment(self.embodiment)
        self._record: InferenceRecord | None = None
        self._processor: PolicyProcessor | None = None
        if inference_record is not None:
            record = inference_record if isinstance(inference_record, InferenceRecord) else \
                InferenceRecord.from_dict(inference_record, "model.inference_record")
            refuse_other_robot(record.embodiment.to_dict(), self.embodiment, "model.inference_record")
            self.record = record
        self.vae = VideoVAE(resolve_path(vae))
        self.dit: VideoDiT | None = None  # built in configure_model (meta-device friendly for FSDP2)
        # The frozen VAE is reloaded from its source and stays out of checkpoints (VideoVAE.state_dict),
        # so its keys are expected to be missing when a checkpoint is loaded.
        self.strict_loading = False

        T = self.layout.num_latent_frames
        self.register_buffer("cond_table", torch.tensor([self.layout.conditioning_mask(o) for o in OBJECTIVES]),
                             persistent=False)
        self.register_buffer("loss_table", torch.tensor(
            [self.layout.loss_mask(o, auxiliary_targets) for o in OBJECTIVES]), persistent=False)
        assert self.cond_table.shape == (len(OBJECTIVES), T)
        self.modalities = modality_frames(self.layout)
        names = [f"{o}/{m}" for o in OBJECTIVES for m in self.modalities]
        self.val_l1 = nn.ModuleDict({n: MeanMetric() for n in names})
        self.test_l1 = nn.ModuleDict({n: MeanMetric() for n in names})
        self.val_loss = MeanMetric()
        a, p = self.embodiment.action, self.embodiment.proprio
        # Sampled errors next to the trivial baselines, robot units and normalised (model/skill.py).
        self.test_action_errors = ErrorTable(["model", "model_n", "baseline", "baseline_n"], a.dim)
        self.test_future_proprio_errors = ErrorTable(["model", "model_n", "baseline", "baseline_n"], p.dim)
        self.test_value_mae = MeanMetric()
        self.test_value_auroc = BinaryAUROC()
        self.test_count, self.test_successes = SumMetric(), SumMetric()
        self.test_value_report = TaskValueReport()  # per task: AUROC and calibration (model/value_report.py)
        self.flops_per_batch: int | None = None
        uses_padded_text(text_conditioning, None)  # fail early on an unknown value
        self._noise_generator: torch.Generator | None = None  # per global rank (model/rng.py)

    # ------------------------------------------------------------------ model construction
    def configure_model(self) -> None:
        """Build the DiT (idempotent); under ``ModelParallelStrategy`` shard it with FSDP2 per block,
        HSDP over the strategy's 2-D mesh: replicate across nodes, shard within a node (docs/method.md §5)."""
        if self.dit is not None:
            return
        h = self.hparams
        # A text-free dataset (text_dim 0) still needs a cross-attention width; it then gets no tokens.
        self.dit = VideoDiT(h.transformer, text_embed_dim=h.text_dim or None, pretrained=h.pretrained_transformer)
        if h.get("init_from_checkpoint"):
            load_dit_weights(self.dit, resolve_path(h.init_from_checkpoint))
        mesh = getattr(self, "_device_mesh", None)
        if self.lora_settings is not None:
            if mesh is not None:
                raise CosmosPolicyError("model.lora: LoRA is the one-GPU path; train it without ModelParallelStrategy "
                                        "(strategy: auto)")
            self._lora_base = lora_adapters.base_identity(
                self.dit.transformer, h.get("init_from_checkpoint") or h.get("pretrained_transformer"), h.transformer)  # the last loaded
            lora_adapters.add_lora(self.dit.transformer, self.lora_settings)
        if h.activation_checkpointing:
            self.dit.enable_activation_checkpointing()
        if mesh is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if mesh.device_type == "cuda" else MixedPrecisionPolicy()  # bf16 compute, fp32 master + reduce
            for block in self.dit.blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(self.dit, mesh=mesh, mp_policy=mp)

    def on_fit_start(self) -> None:
        lora_adapters.check_precision(self.lora_settings, self.trainer.precision)

    # ------------------------------------------------------------------ the inference record
    @property
    def record(self) -> InferenceRecord | None:
        """The :class:`~cosmos_policy_lightning.inference_record.InferenceRecord` (None before one is given)."""
        return self._record

    @record.setter
    def record(self, record: InferenceRecord | None) -> None:
        self._record, self._processor = record, None

    @property
    def stats(self) -> DatasetStats | None:
        """Normalisation statistics of the record (None without one)."""
        return None if self._record is None else self._record.stats

    @property
    def text_encoder_identity(self) -> str | None:
        """The text encoder's identity from the record (None without one)."""
        return None if self._record is None else self._record.text_encoder

    @property
    def center_crop(self) -> bool:
        """Whether held-out images got the docs/method.md §4 test-time centre crop (inference must too)."""
        return self._record is not None and self._record.center_crop

    @property
    def processor(self) -> PolicyProcessor:
        """The :class:`~cosmos_policy_lightning.processor.PolicyProcessor` of the record.

        Raises:
            CosmosPolicyError: no record (a model built without ``inference_record`` and not loaded
                from a checkpoint).
        """
        if self._record is None:
            raise CosmosPolicyError("model: no inference record (statistics); construct the model with "
                                    "inference_record=datamodule.inference_record().to_dict() (the CLI links it) "
                                    "or load a checkpoint saved by training with a data module")
        if self._processor is None:
            self._processor = PolicyProcessor(self._record)
        return self._processor

    def normalizer(self, modality: str) -> Normalizer:
        """Normaliser of ``action`` / ``proprio`` from the record's statistics."""
        return self.processor.action_normalizer if modality == "action" else self.processor.proprio_normalizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # callbacks run first: keep what they stored (training/callbacks.py: the instruction embeddings)
        checkpoint[CHECKPOINT_KEY] = {**(checkpoint.get(CHECKPOINT_KEY) or {}), **(
            self._record.to_dict() if self._record is not None else {
                "embodiment": self.embodiment.to_dict(), "layout": self.layout.to_dict()})}
        if self.lora_settings is not None and self._lora_base is not None:
            # adapter + modules_to_save only: the frozen base is rebuilt from its recorded source
            checkpoint["state_dict"] = lora_adapters.adapter_checkpoint_state(checkpoint["state_dict"],
                                                                              self._lora_keys())
            checkpoint[lora_adapters.LORA_CHECKPOINT_KEY] = {"settings": self.lora_settings.to_dict(),
                                                             "base": dict(self._lora_base)}

    def _lora_keys(self) -> set[str]:
        """``state_dict`` keys of the trainable DiT tensors (adapters, ``modules_to_save``)."""
        return {f"dit.{n}" for n, p in self.dit.named_parameters() if p.requires_grad}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY) or {}
        where = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if extra.get("embodiment"):  # before any weight is loaded or any batch runs
            refuse_other_robot(extra["embodiment"], self.embodiment, where)
        if self.dit is not None and (self.lora_settings is not None or checkpoint.get(lora_adapters.LORA_CHECKPOINT_KEY)):
            lora_adapters.check_lora_checkpoint(checkpoint, self.lora_settings, self._lora_base,
                                                self._lora_keys() if self.lora_settings is not None else set(), where)
        if not extra.get("stats"):
            return
        stored = InferenceRecord.from_dict(extra, str(where or "checkpoint"))
        if self._record is not None and self._record.stats.fingerprint != stored.stats.fingerprint:
            warnings.warn(f"statistics of the checkpoint ({stored.stats.fingerprint}) differ from the data "
                          f"module's ({self._record.stats.fingerprint}); using the checkpoint's to keep the "
                          f"model's scale")
        self.record = stored

    # ------------------------------------------------------------------ the shared forward pieces
    @torch.no_grad()
    def conditioning(self, objective: str, batch_size: int) -> torch.Tensor:
        """``(B, T)`` bool conditioning mask of ``objective`` (True = clean frame; docs/method.md §2), on the
        module's device.

        Raises:
            CosmosPolicyError: unknown objective.
        """
        try:
            index = objective_index(objective)
        except ValueError as err:
            raise CosmosPolicyError(f"policy: {err}") from None
        return self.cond_table[index].expand(batch_size, -1)

    def encode_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Clean latents ``(B, 16, T, h, w)`` of a batch: pixel sequence -> VAE -> injected vectors. A batch
        from the latent cache (``data/latent_cache.py``) brings the VAE's output as ``latents``."""
        if "latents" in batch:
            latents = batch["latents"].float().clone()
        else:
            latents = encode_pixel_sequence(self.layout, self.vae, batch["images"], batch["future_images"])
        return inject_vectors(latents, self.layout, batch["proprio"], batch["future_proprio"],
                              batch["actions"], batch["value"])

    def read(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised vectors of generated latents ``(B, C, T, h, w)`` (``model/sequence.py read_vectors``):
        ``actions (B, K, A)``, ``future_proprio`` / ``proprio (B, P)``, ``value (B,)``, all in [-1, 1] space
        (robot units through :attr:`processor`)."""
        emb = self.embodiment
        return read_vectors(latents, self.layout, emb.proprio.dim, emb.action.chunk_size, emb.action.dim)

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, clean: torch.Tensor,
                text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """x0 prediction with conditioning frames handled the four ways of docs/method.md §2.

        Args:
            x_sigma: ``(B, C, T, h, w)`` noisy latents; sigma: ``(B,)``; cond: ``(B, T)`` bool;
            clean: ``(B, C, T, h, w)`` clean latents (only conditioning frames are read);
            text: ``(B, L, D)``; text_mask: ``(B, L)`` bool or None.
        """
        assert self.dit is not None, "call configure_model() first"
        return diffusion.Denoiser(self._network(cond, text, text_mask), clean, cond)(x_sigma, sigma)

    def _network(self, cond: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None):
        """``F(x_in, t)`` for :class:`diffusion.Denoiser`: the DiT with mask and text bound. A dataset
        converted without text (``text`` of shape (B, 0, 0)) runs with no text tokens."""
        if text is not None and text.shape[1] == 0:
            text, text_mask = None, None
        elif text is not None and uses_padded_text(self.hparams.get("text_conditioning", "auto"),
                                                   self.text_encoder_identity):
            text, text_mask = pad_text_tokens(text, text_mask, T5_MAX_TOKENS), None
        return lambda x, t: self.dit(x, t, cond, text, text_mask)

    def noise_generator(self, device: torch.device) -> torch.Generator:
        """The training-noise generator of this global rank (``model/rng.py``): seeded from the run's
        seed, ``self.global_rank`` and the step it was created at, so ranks draw different sigma and noise."""
        gen = self._noise_generator
        if gen is None or gen.device != torch.device(device):
            gen = rank_generator(run_seed(), self.global_rank, device, self.global_step)
            self._noise_generator = gen
        return gen

    @torch.no_grad()
    def generate(self, clean: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                 num_steps: int = 5, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the non-conditioning frames with the docs/method.md §3 sampler; conditioning frames come back clean.

        Args:
            noise: the sampler's starting noise, unit normal ``(B, C, T, h, w)`` like ``clean`` (the
                sampler scales it to sigma_max); drawn from ``generator`` when None. The sampler draws
                nothing else, so equal noise gives equal latents.

        Returns:
            ``(B, C, T, h, w)`` generated latents.
        """
        assert self.dit is not None, "call configure_model() first"
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return diffusion.sample(diffusion.Denoiser(self._network(cond, text, text_mask), clean, cond), noise,
                                num_steps)

    def _noised_step(self, batch: dict[str, Any], held_out: bool = False):
        """Noise the batch at training sigmas, denoise, and score (docs/method.md §3). Training draws from
        this rank's generator; ``held_out`` (validation / test) draws every sample's sigma and noise from
        its own generator (``rng.sample_generator``), so held-out losses do not depend on the world size."""
        x0 = self.encode_batch(batch)
        b, t = x0.shape[0], x0.shape[2]
        obj = batch["objective"]
        cond, loss_mask = self.cond_table[obj], self.loss_table[obj]
        if held_out and "episode" in batch:
            gens = [sample_generator(run_seed(), ep, int(st), x0.device)
                    for ep, st in zip(batch["episode"], batch["step"].tolist())]
            sigma = torch.cat([diffusion.sample_sigma(1, t, generator=g, device=x0.device) for g in gens])
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=x0.device, dtype=x0.dtype)
                                 for g in gens])
        else:
            gen = self.noise_generator(x0.device)
            sigma = diffusion.sample_sigma(b, t, generator=gen, device=x0.device)
            noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        x_sigma = x0 + sigma.view(b, 1, 1, 1, 1) * noise
        x0_pred = self.denoise(x_sigma, sigma, cond, x0, batch["text"], batch.get("text_mask"))
        loss = diffusion.diffusion_loss(x0_pred, x0, sigma, loss_mask)
        return x0, x0_pred, loss, obj

    def _l1_by_objective(self, x0: torch.Tensor, x0_pred: torch.Tensor, obj: torch.Tensor):
        """Yield ``(name, per-sample L1 tensor)`` for every (objective, modality) target in the batch."""
        err = (x0_pred.float() - x0.float()).abs().mean(dim=(1, 3, 4))  # (B, T)
        for o_idx, o in enumerate(OBJECTIVES):
            sel = obj == o_idx
            if not sel.any():
                continue
            loss_frames = self.loss_table[o_idx]
            for mod, frames in self.modalities.items():
                if all(loss_frames[f] for f in frames):
                    yield f"{o}/{mod}", err[sel][:, frames].mean(dim=1)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, x0_pred, loss, obj = self._noised_step(batch)
        b = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        with torch.no_grad():
            for name, values in self._l1_by_objective(x0, x0_pred, obj):
                self.log(f"train/l1/{name}", values.mean(), batch_size=len(values))
        if self.flops_per_batch is None:
            self.flops_per_batch = self._estimate_flops(x0, batch["text"].shape[1])
        every = self.hparams.image_log_every_n_steps
        if every and self.global_step % every == 0 and self.global_rank == 0:
            self.log_image_grid(batch, x0_pred.detach(), tag="train/future_frames")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x0, x0_pred, loss, obj = self._noised_step(batch, held_out=True)
        self.val_loss.update(loss, weight=x0.shape[0])
        for name, values in self._l1_by_objective(x0, x0_pred, obj):
            self.val_l1[name].update(values)
        if batch_idx == 0 and self.global_rank == 0 and self.hparams.image_log_every_n_steps:
            self.log_image_grid(batch, x0_pred, tag="val/future_frames")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val/l1", self.val_l1)
        self._log_metrics("val", {"loss": self.val_loss})

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Latent L1s at the training sigma, then *sampled* errors in robot units (docs/method.md §3 sampler):
        the action chunk and future proprio from parallel decoding of the policy objective (action
        error on successful episodes only), and the value from the value objective, with the AUROC of
        the predicted value separating successes from failures."""
        x0, x0_pred, _, obj = self._noised_step(batch, held_out=True)
        for name, values in self._l1_by_objective(x0, x0_pred, obj):
            self.test_l1[name].update(values)
        b = x0.shape[0]
        text, text_mask = batch["text"], batch.get("text_mask")
        steps = self.hparams.test_num_steps
        pred = predict_batch(self, batch, steps, x0=x0)  # the direct policy, robot units and normalised
        success = batch["success"].bool()
        if success.any():
            # Baseline: the training-set mean action (of the successful episodes the policy learns from).
            norm = self.normalizer("action")
            mean = torch.as_tensor(norm.stats.mean, dtype=torch.float32)
            mean_n = torch.as_tensor(norm.normalize(norm.stats.mean.astype("float64")), dtype=torch.float32)
            for name, units in (("", "model"), ("_normalized", "model_n")):
                sel = success.cpu()
                true = pred[f"true_actions{name}"][sel]
                self.test_action_errors.update(units, (pred[f"actions{name}"][sel] - true).to(x0.device))
                baseline = mean if not name else mean_n
                self.test_action_errors.update(units.replace("model", "baseline"), (true - baseline).to(x0.device))
        for name, units in (("", "model"), ("_normalized", "model_n")):
            true = pred[f"true_future_proprio{name}"]
            self.test_future_proprio_errors.update(units, (pred[f"future_proprio{name}"] - true).to(x0.device))
            # Baseline: no motion (the future proprio is the current one).
            self.test_future_proprio_errors.update(units.replace("model", "baseline"),
                                                   (pred[f"proprio{name}"] - true).to(x0.device))
        val = self.conditioning("value", b)
        value = self.read(self.generate(x0, val, text, text_mask, steps))["value"]
        self.test_value_mae.update((value - batch["value"].float()).abs())
        self.test_value_auroc.update(value_to_unit(value), success.long())
        self.test_value_report.update(value_to_unit(value), value_to_unit(batch["value"].float()), success,
                                      batch.get("instruction"))
        self.test_count.update(torch.tensor(float(b), device=value.device))
        self.test_successes.update(success.sum().float())

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Sampled action chunk, future proprio and value per held-out sample, in robot units, next to
        the ground truth (``model/predict.py``; written by ``training.callbacks.PredictionWriter``)."""
        return predict_batch(self, batch, self.hparams.test_num_steps)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test/l1", self.test_l1)
        emb = self.embodiment
        for prefix, baseline, names, table in (
                ("test/action", "mean_baseline", emb.action.names or [str(i) for i in range(emb.action.dim)],
                 self.test_action_errors),
                ("test/future_proprio", "copy_baseline",
                 emb.proprio.names or [str(i) for i in range(emb.proprio.dim)], self.test_future_proprio_errors)):
            mae = {p: table.compute(p) for p in ("model", "model_n", "baseline", "baseline_n")}
            for name, value in skill_metrics(prefix, baseline, list(names),
                                             {False: mae["model"], True: mae["model_n"]},
                                             {False: mae["baseline"], True: mae["baseline_n"]}).items():
                self.log(name, value)
            table.reset()
        self._log_metrics("test", {"value_mae": self.test_value_mae})
        # AUROC needs both classes among all ranks' samples; the counts are synced like the metric.
        n, positives = self.test_count.compute(), self.test_successes.compute()
        if 0 < positives < n:
            self.log("test/value_auroc", self.test_value_auroc.compute())
        for m in (self.test_value_auroc, self.test_count, self.test_successes):
            m.reset()
        metrics, curves = self.test_value_report.compute()
        for name, value in metrics.items():
            self.log(f"test/{name}", value)
        experiment = getattr(self.logger, "experiment", None)
        if curves and hasattr(experiment, "add_figure") and self.trainer.is_global_zero:
            experiment.add_figure("test/value_reliability", self.test_value_report.figure(curves),
                                  global_step=self.global_step, close=True)

    def _log_metrics(self, prefix: str, metrics) -> list[torch.Tensor]:
        """Compute (synced over ranks), log the defined ones, reset. Every rank computes every metric,
        even one it never updated, so the collective calls match across ranks."""
        logged = []
        for name, metric in metrics.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a metric no rank updated is NaN: skipped below
                value = metric.compute()
            if torch.isfinite(value).all():
                self.log(f"{prefix}/{name}", value)
                logged.append(value)
            metric.reset()
        return logged

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.dit.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # norms and biases: no weight decay
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=h.learning_rate, betas=tuple(h.betas), eps=h.eps)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else h.decay_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(
            step, h.warmup_steps, h.decay_steps, total, h.decay_factor, h.final_factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for p in self.dit.parameters() if p.grad is not None]
        if not params:
            return
        max_norm = self.hparams.grad_clip_norm or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, batch_size=1)
        self.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def _estimate_flops(self, x0: torch.Tensor, text_len: int) -> int:
        """Training FLOPs per batch, ~6 x DiT parameters x tokens (forward + backward), for MFU."""
        b, _, t, h, w = x0.shape
        tokens = t * (h // 2) * (w // 2)
        n_params = sum(p.numel() for p in self.dit.parameters())
        return int(6 * n_params * tokens * b)

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def decode_future_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode each future-camera latent frame: ``(B, C, T, h, w)`` -> uint8 ``(B, N, H, W, 3)``."""
        return self.decode_camera_frames(latents, "future_image")

    @torch.no_grad()
    def decode_camera_frames(self, latents: torch.Tensor, slot: str = "future_image") -> torch.Tensor:
        """Decode the ``slot`` (``image`` or ``future_image``) latent frame of every camera:
        ``(B, C, T, h, w)`` -> uint8 ``(B, N, H, W, 3)``.

        Each frame is decoded after the blank frame (a 2-latent clip -> 5 pixel frames, the last kept),
        so injected vector frames never leak into the picture through the causal VAE."""
        frames = []
        for cam in self.layout.camera_names:
            clip = torch.stack([latents[:, :, 0], latents[:, :, self.layout.index(f"{slot}/{cam}")]], dim=2)
            frames.append(self.vae.decode(clip)[:, :, -1])
        return unit_range_to_images(torch.stack(frames, dim=1).float())

    def log_image_grid(self, batch: dict[str, Any], x0_pred: torch.Tensor, tag: str, max_samples: int = 4) -> None:
        """TensorBoard image: one row per sample; current frames | true future | predicted future."""
        logger = self.logger
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        n = min(max_samples, x0_pred.shape[0])
        pred = self.decode_future_frames(x0_pred[:n])                      # (n, N, H, W, 3)
        if "images" in batch:
            cur, fut = batch["images"][:n].to(pred.device), batch["future_images"][:n].to(pred.device)
        else:  # latent-cache batch: the VAE's reconstruction of the stored current and future frames
            cur, fut = self.decode_camera_frames(batch["latents"][:n].float(), "image"), \
                self.decode_camera_frames(batch["latents"][:n].float(), "future_image")
        rows = [torch.cat([torch.cat(list(x[i]), dim=1) for x in (cur, fut, pred)], dim=1) for i in range(n)]
        grid = torch.cat(rows, dim=0)                                      # (n*H, 3*N*W, 3)
        experiment.add_image(tag, grid.cpu().numpy(), self.global_step, dataformats="HWC")
