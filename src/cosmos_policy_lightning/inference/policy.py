"""A trained checkpoint as a robot policy: observation in, action chunk (+ future state, value) out
(docs/method.md §1, §3).

:class:`CosmosPolicy` wraps a :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule`. The
checkpoint's :class:`~cosmos_policy_lightning.inference_record.InferenceRecord` carries everything
inference needs (embodiment, statistics, text encoder, token limit, objective mix, test-time
transform); numbers go in and out through the same
:class:`~cosmos_policy_lightning.processor.PolicyProcessor` and ``model/sequence.py`` functions as the
model's ``test_step`` / ``predict_step``.

Two decodings (docs/method.md §3):

* **parallel** (default, the direct policy): one sampling run with the policy conditioning mask
  (clean: blank + current state) generates action chunk, future proprio, future images and value at once;
* **autoregressive**: the action chunk (policy mask), then the future state conditioned on that action
  (world-model mask), then the value conditioned on both (value mask), each stage with its own number
  of denoising steps. Generated vectors are re-injected (tiled) before they condition the next stage, so
  every stage sees exactly the representation it was trained on.

Only the clean conditioning frames of a sequence are ever read by the sampler, and the VAE is causal,
so :meth:`CosmosPolicy.encode` VAE-encodes the pixel prefix up to the last current camera only
(``encode_pixel_sequence(..., through="current")``: exactly the same latents as encoding the whole
clip; the future slots are unknown placeholders anyway).

Batching: B observations, or ``num_samples`` samples of each, go through the network in one forward
pass per denoising step (optionally split into micro-batches of ``max_batch``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import CosmosPolicyError
from ..layout import value_objectives
from ..model.sequence import encode_pixel_sequence, write_slot
from ..processor import PolicyProcessor, value_to_unit
from ..checkpoints.checkpoint_file import read_checkpoint_file
from .ensemble import EnsembleSteps, group_members, member_seeds, member_steps
from .observation import Observation, prepare_images

Decoding = Literal["parallel", "autoregressive"]


@dataclass
class PolicyOutput:
    """What :meth:`CosmosPolicy.predict` returns, every array in robot units (numpy, float32).

    Leading dimensions: none for a single observation with ``num_samples=1``; ``(S,)`` for S samples
    of one observation; ``(B,)`` for B observations; ``(B, S)`` for both.

    Attributes:
        actions: ``(..., K, A)`` action chunk, un-normalised (normalised values clamped to [-1, 1]
            first, i.e. inside the range of the training demonstrations for ``minmax``).
        future_proprio: ``(..., P)`` predicted proprio at step ``t + K``.
        value: ``(...)`` predicted value of the future state, in [0, 1] (docs/method.md §1).
        future_images: camera -> ``(..., H, W, 3)`` uint8 predicted frames at ``t + K`` (model
            resolution); None unless ``decode_images``.
        latents: ``(B*S, 16, T, h, w)`` the generated latent sequence of the last stage (torch).
        seconds: wall-clock time of the call (preprocessing included).
    """

    actions: np.ndarray
    future_proprio: np.ndarray
    value: np.ndarray
    future_images: dict[str, np.ndarray] | None = None
    latents: torch.Tensor | None = field(default=None, repr=False)
    seconds: float = 0.0


@dataclass
class ActionEvaluation:
    """Futures and values predicted for given action chunks (see :meth:`CosmosPolicy.evaluate_actions`).

    Attributes:
        values: ``(N, F, V)`` values in [0, 1]: V value samples for each of F future states of each of
            N action chunks.
        future_proprio: ``(N, F, P)`` predicted future proprio, robot units.
    """

    values: np.ndarray
    future_proprio: np.ndarray


@dataclass
class PreparedBatch:
    """Observations as model tensors (on the policy's device).

    Attributes:
        images: uint8 ``(B, N, H, W, 3)`` after resize / JPEG / centre crop.
        proprio: float32 ``(B, P)`` normalised to [-1, 1].
        text: float32 ``(B, L, D)``; text_mask: bool ``(B, L)``.
    """

    images: torch.Tensor
    proprio: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


@dataclass
class EncodedObservations:
    """Observations already prepared and VAE-encoded by :meth:`CosmosPolicy.encode_observations`, so
    one encoding serves several calls (e.g. the proposals and the judging of one planning step).

    Attributes:
        batch: the :class:`PreparedBatch` (B observations).
        clean: ``(B, 16, T, h, w)`` clean latents of :meth:`CosmosPolicy.encode`.
        single: the caller passed one observation (outputs get no batch dimension).
    """

    batch: PreparedBatch
    clean: torch.Tensor
    single: bool = False



class CosmosPolicy:
    """Observation -> action chunk, future proprio / images and value, from a trained model.

    Args:
        module: a :class:`~cosmos_policy_lightning.model.module.CosmosPolicyModule` with an inference
            record (as loaded from a checkpoint). It is moved to ``device`` and put in eval mode.
        device: torch device (``"cpu"``, ``"cuda"``, ...).
        dtype: parameter dtype of the DiT and VAE (``torch.bfloat16`` on GPU halves memory); the
            diffusion arithmetic stays float32.
        text_encoder: an encoder object to use instead of rebuilding the recorded one.
        jpeg_quality: camera frames go through JPEG at this quality like the converted shards (None: no).
        value_objective: conditioning of the value stage: ``value`` (blank, s, a, s'), ``value_future_state``
            (blank, s' -- a model fine-tuned with V(s') masks, docs/method.md §2), ``q_value`` (any of
            ``layout.value_objectives()``); ``auto`` picks from the recorded training mix (see
            :meth:`_resolve_value_objective`).
        max_batch: largest batch per network call (None: everything in one call).
        text_embeddings: instruction -> ``(L, D)`` embeddings by the recorded text encoder, used instead of
            running it (an imported checkpoint's T5 embeddings, a Hub policy's ``text_embeddings``).

    Raises:
        CosmosPolicyError: the module has no inference record, or bad arguments.
    """

    def __init__(self, module, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_encoder=None, jpeg_quality: int | None = 95, value_objective: str = "auto",
                 max_batch: int | None = None, text_embeddings: Mapping[str, Any] | None = None):
        if module.record is None:
            raise CosmosPolicyError("policy: the model has no inference record (normalisation statistics); load a "
                                    "checkpoint saved by training with a data module")
        module.configure_model()
        self.device = torch.device(device)
        self.dtype = dtype
        module.to(self.device)
        for part in (module.dit, module.vae):
            # every parameter (a LoRA model mixes a bf16 base and fp32 adapters); diffusers warns on any .to(dtype)
            if any(p.dtype != dtype for p in part.parameters()):
                part.to(dtype)
        self.module = module.eval()
        self.record = module.record
        self.embodiment = module.embodiment
        self.layout = module.layout
        self.center_crop = self.record.center_crop
        self.jpeg_quality = jpeg_quality
        self.processor = PolicyProcessor(self.record, text_encoder, text_embeddings)
        self.action_normalizer = self.processor.action_normalizer
        self.proprio_normalizer = self.processor.proprio_normalizer
        self.text = self.processor.instructions
        self.value_objective = self._resolve_value_objective(value_objective)
        if max_batch is not None and max_batch < 1:
            raise CosmosPolicyError(f"policy: max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> "CosmosPolicy":
        """Load a Lightning checkpoint written by ``cosmos-policy fit``.

        The VAE is reloaded from the path recorded in the checkpoint; the inference record comes from
        the checkpoint (``checkpoint["cosmos_policy"]``). A LoRA checkpoint (``model.lora``, adapter only)
        is loaded onto its base, rebuilt from the recorded ``pretrained_transformer`` / ``init_from_checkpoint``;
        a merged one (``cosmos-policy export``) is an ordinary checkpoint.

        Raises:
            CosmosPolicyError: the file is missing or not a Cosmos Policy checkpoint; a LoRA checkpoint
                whose base is not the one it was trained on (one line, both fingerprints).
        """
        from ..model.module import CHECKPOINT_KEY, CosmosPolicyModule

        from ..model.lora import LORA_CHECKPOINT_KEY

        path = Path(path)
        raw = read_checkpoint_file(path)
        # an imported checkpoint carries the reference's instruction embeddings (checkpoints/importer.py)
        kwargs.setdefault("text_embeddings", raw[CHECKPOINT_KEY].get("text_embeddings") or None)
        # A LoRA checkpoint holds only the adapter: its base is rebuilt from the recorded source
        # (pretrained_transformer or init_from_checkpoint) and checked against the recorded fingerprint.
        overrides = {} if raw.get(LORA_CHECKPOINT_KEY) else {"init_from_checkpoint": None}
        del raw
        with warnings.catch_warnings():
            # The frozen VAE is deliberately not in checkpoints (reloaded from its recorded path).
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
            # init_from_checkpoint only seeded the fine-tune's first step: the weights are all in this file.
            try:
                module = CosmosPolicyModule.load_from_checkpoint(str(path), map_location="cpu", **overrides)
            except CosmosPolicyError as err:  # the module's checks name "checkpoint": name the file
                text = str(err)
                raise CosmosPolicyError(f"{path}{text[len('checkpoint'):]}" if text.startswith("checkpoint:")
                                        else text) from None
        return cls(module, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> "CosmosPolicy":
        """Load a policy shared on the Hugging Face Hub (``org/name``) or its folder (written by
        ``cosmos-policy push-to-hub``; layout in ``checkpoints/policy_folder.py``). A Hub id is downloaded once
        into the Hub cache (``HF_HUB_OFFLINE=1`` reads only the cache).

        Raises:
            CosmosPolicyError: not a policy folder / reachable Hub repository, or a missing file.
        """
        from ..checkpoints.policy_folder import load_policy_folder

        module, text_embeddings = load_policy_folder(source)
        kwargs.setdefault("text_embeddings", text_embeddings)
        return cls(module, device=device, dtype=dtype, **kwargs)

    def _resolve_value_objective(self, name: str) -> str:
        """``auto``: ``value`` when the recorded training mix has it, else the first value objective it has
        (``value_future_state`` for the planning fine-tune of docs/method.md §7), else ``value``."""
        names = value_objectives()
        if name == "auto":
            trained = [o for o in names if self.record.objective_mix.get(o, 0) > 0]
            return "value" if "value" in trained or not trained else trained[0]
        if name not in names:
            raise CosmosPolicyError(f"policy: value_objective must be auto or one of {', '.join(names)}, got {name!r}")
        return name

    # ------------------------------------------------------------------ sizes
    @property
    def chunk_size(self) -> int:
        return self.embodiment.action.chunk_size

    @property
    def action_dim(self) -> int:
        return self.embodiment.action.dim

    @property
    def proprio_dim(self) -> int:
        return self.embodiment.proprio.dim

    # ------------------------------------------------------------------ building blocks
    def prepare(self, observations: Sequence[Observation | Mapping[str, Any]],
                instruction: str | None = None) -> PreparedBatch:
        """Observations -> :class:`PreparedBatch` on the policy's device (see ``inference/observation.py``).

        Args:
            observations: B observations (``Observation`` or dicts with ``images``, ``proprio``,
                ``instruction``).
            instruction: overrides every observation's instruction.

        Raises:
            CosmosPolicyError: empty list, missing camera, wrong proprio size, non-finite values.
        """
        obs = [Observation.coerce(o, instruction) for o in observations]
        if not obs:
            raise CosmosPolicyError("policy: no observation given")
        obs = [self._with_instruction(o, b) for b, o in enumerate(obs)]
        images = prepare_images(obs, self.embodiment, self.center_crop, self.jpeg_quality)
        proprio = self.processor.normalize_proprio([o.proprio for o in obs])
        text, mask = self.processor.text([o.instruction for o in obs])
        dev = self.device
        return PreparedBatch(images.to(dev), proprio.to(dev), text.to(dev), mask.to(dev))

    def _with_instruction(self, obs: Observation, b: int) -> Observation:
        """A missing instruction is refused on a text-conditioned model, as the server refuses it
        (``inference/service.py``); a model without text takes ''.

        Raises:
            CosmosPolicyError: no instruction for a text-conditioned model.
        """
        if obs.instruction is not None:
            return obs
        identity = self.processor.record.text_encoder
        if identity not in (None, "none"):
            raise CosmosPolicyError(f"observation {b}: instruction missing; this model is conditioned on text "
                                    f"({identity}): pass the task instruction (observation['instruction'] or "
                                    f"instruction=...)")
        return Observation(obs.images, obs.proprio, "")

    @torch.no_grad()
    def encode(self, batch: PreparedBatch) -> torch.Tensor:
        """Clean latents ``(B, 16, T, h, w)``: blank, current proprio and cameras encoded / injected;
        every later frame (action, future state, value) is zero, to be generated."""
        latents = encode_pixel_sequence(self.layout, self.module.vae, batch.images, None, through="current")
        return write_slot(latents, self.layout, "proprio", batch.proprio.float())

    def encode_observations(self, observation: Any, instruction: str | None = None) -> EncodedObservations:
        """:meth:`prepare` + :meth:`encode` of one observation or a list; the result can be passed to
        :meth:`predict` and :meth:`evaluate_actions` in place of the observation(s)."""
        if isinstance(observation, EncodedObservations):
            return observation
        single = isinstance(observation, (Observation, Mapping))
        batch = self.prepare([observation] if single else list(observation), instruction)
        return EncodedObservations(batch, self.encode(batch), single)

    def condition_mask(self, objective: str, batch_size: int) -> torch.Tensor:
        """``(B, T)`` bool conditioning mask of ``objective`` (docs/method.md §2)."""
        return self.module.conditioning(objective, batch_size).to(self.device)

    @torch.no_grad()
    def sample(self, clean: torch.Tensor, objective: str, text: torch.Tensor, text_mask: torch.Tensor,
               num_steps: int, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Generate the non-conditioning frames of ``objective`` (docs/method.md §3 sampler, ``num_steps`` network
        calls), in micro-batches of at most ``max_batch``. Returns ``(B, 16, T, h, w)`` float32.

        ``generator`` may be a list of G generators (B divisible by G): rows ``g * B/G ... (g+1) * B/G - 1``
        then draw their noise from generator g alone, exactly as a call with those rows only would, so
        a row's result does not depend on what it is batched with (see :meth:`predict`'s ``seed``)."""
        if num_steps < 1:
            raise CosmosPolicyError(f"policy: num_steps must be >= 1, got {num_steps}")
        b = clean.shape[0]
        noise = None
        if isinstance(generator, (list, tuple)):
            rows = b // len(generator)
            noise = torch.cat([torch.randn((rows, *clean.shape[1:]), generator=g, device=clean.device,
                                           dtype=clean.dtype) for g in generator])
        step = self.max_batch or b
        outs = []
        for i in range(0, b, step):
            sl = slice(i, i + step)
            n = clean[sl].shape[0]
            outs.append(self.module.generate(clean[sl], self.condition_mask(objective, n), text[sl], text_mask[sl],
                                             num_steps=num_steps, generator=None if noise is not None else generator,
                                             noise=None if noise is None else noise[sl]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def read(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generated latents -> ``actions (B, K, A)`` (clamped to [-1, 1]), ``future_proprio (B, P)``,
        normalised, and ``value (B,)`` in [0, 1]."""
        vec = self.module.read(latents)
        return {"actions": self.processor.clamp_actions(vec["actions"]), "future_proprio": vec["future_proprio"],
                "value": value_to_unit(vec["value"])}

    def write(self, latents: torch.Tensor, slot: str, vector: torch.Tensor) -> torch.Tensor:
        """Inject a normalised vector into ``slot`` (``action`` ``(B, K, A)``, ``future_proprio``
        ``(B, P)``) of a copy of ``latents`` (``model/sequence.py`` ``write_slot``)."""
        return write_slot(latents.clone(), self.layout, slot, vector)

    def generator(self, seed: int | Sequence[int] | None) -> torch.Generator | list[torch.Generator] | None:
        """A generator on the policy's device seeded with ``seed`` (None: torch's global RNG), or one
        generator per seed for a list of seeds."""
        if seed is None:
            return None
        if isinstance(seed, (list, tuple, np.ndarray)):
            return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seed]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    # ------------------------------------------------------------------ the policy
    @torch.no_grad()
    def predict(self, observation: Observation | Mapping[str, Any] | Sequence[Observation | Mapping[str, Any]],
                num_steps: int = 5, seed: int | Sequence[int] | None = None, num_samples: int = 1,
                decoding: Decoding = "parallel",
                stage_steps: tuple[int, int, int] | None = None, decode_images: bool = True,
                instruction: str | None = None) -> PolicyOutput:
        """Sample action chunks (and future state and value) for one or B observations.

        Args:
            observation: one observation or a list of B (``Observation`` or dict with ``images``: camera
                -> HxWx3 uint8 of any size, ``proprio``: robot units, ``instruction``), or the
                :class:`EncodedObservations` of :meth:`encode_observations`.
            num_steps: denoising steps (network calls) per sampling run (docs/method.md §3: 5; 1 = one x0 prediction).
            seed: seed of the sampling noise; the same seed gives the same actions. None: global RNG.
                A list of B seeds (one per observation) gives every observation its own noise stream:
                its result is then that of a call with this observation alone and its seed, whatever
                it is batched with (up to floating-point reassociation in batched kernels). A policy
                server batches the requests of several clients this way.
            num_samples: S independent samples per observation, all in the same forward passes.
            decoding: ``parallel`` (one run, policy mask) or ``autoregressive`` (action, then future
                state, then value).
            stage_steps: autoregressive only: steps of the (action, future state, value) stages;
                default ``num_steps`` each.
            decode_images: decode the predicted future frames with the VAE (costs a decode per camera).
            instruction: overrides the observations' instruction.

        Returns:
            :class:`PolicyOutput` (shapes documented there).

        Raises:
            CosmosPolicyError: malformed observation or arguments.
        """
        start = time.perf_counter()
        if num_samples < 1:
            raise CosmosPolicyError(f"policy: num_samples must be >= 1, got {num_samples}")
        if decoding not in ("parallel", "autoregressive"):
            raise CosmosPolicyError(f"policy: decoding must be 'parallel' or 'autoregressive', got {decoding!r}")
        enc = self.encode_observations(observation, instruction)
        batch, clean, single = enc.batch, enc.clean, enc.single
        if num_samples > 1:  # sample s of observation b sits at row b * S + s
            clean = clean.repeat_interleave(num_samples, 0)
        text = batch.text.repeat_interleave(num_samples, 0)
        mask = batch.text_mask.repeat_interleave(num_samples, 0)
        if isinstance(seed, (list, tuple, np.ndarray)) and len(seed) != batch.size:
            raise CosmosPolicyError(f"policy: got {len(seed)} seeds for {batch.size} observations (one each)")
        gen = self.generator(seed)
        if decoding == "parallel":
            latents = self.sample(clean, "policy", text, mask, num_steps, gen)
            out = self.read(latents)
        else:
            s_act, s_wm, s_val = stage_steps or (num_steps,) * 3
            latents = self.sample(clean, "policy", text, mask, s_act, gen)
            out = self.read(latents)
            latents = self.sample(self.write(clean, "action", out["actions"]), "world_model", text, mask, s_wm, gen)
            out["future_proprio"] = self.read(latents)["future_proprio"]
            latents = self.write(latents, "future_proprio", out["future_proprio"])
            latents = self.sample(latents, self.value_objective, text, mask, s_val, gen)
            out["value"] = self.read(latents)["value"]
        images = self.module.decode_future_frames(latents) if decode_images else None

        lead = () if single else (batch.size,)
        lead += (num_samples,) if num_samples > 1 else ()

        def shape(x: torch.Tensor) -> np.ndarray:
            return x.float().cpu().numpy().reshape((*lead, *x.shape[1:]))

        robot = self.processor.to_robot({"actions": out["actions"], "future_proprio": out["future_proprio"]})
        result = PolicyOutput(
            actions=shape(robot["actions"]).astype(np.float32),
            future_proprio=shape(robot["future_proprio"]).astype(np.float32),
            value=shape(out["value"]).astype(np.float32),
            future_images=None if images is None else {
                cam: images[:, n].cpu().numpy().reshape((*lead, *images.shape[2:]))
                for n, cam in enumerate(self.layout.camera_names)},
            latents=latents,
        )
        result.seconds = time.perf_counter() - start
        return result

    __call__ = predict

    # ------------------------------------------------------------------ world model + value function
    @torch.no_grad()
    def evaluate_actions(self, observation: Observation | Mapping[str, Any], actions: np.ndarray | torch.Tensor,
                         num_futures: int = 3, num_values: int = 5, world_model_steps: int = 5, value_steps: int = 5,
                         seed: int | None = None, instruction: str | None = None,
                         ensemble_steps: EnsembleSteps = "linspace") -> ActionEvaluation:
        """Predict futures and values of N candidate action chunks from one observation (docs/method.md §3, planning).

        For each chunk, ``num_futures`` future states are sampled with the world-model mask (conditioned
        on the observation and the chunk); for each future state, ``num_values`` values are sampled with
        :attr:`value_objective`'s mask. As in the reference, ensemble member i of a stage samples with
        seed ``seed + i`` and, with ``ensemble_steps="linspace"``, ``linspace(1, steps, members)[i]``
        denoising steps (``inference/ensemble.py``; e.g. futures with 1, 3, 5 steps, values with
        1 .. 5). The members of one step count go through the network together, for all N chunks (in
        micro-batches of ``max_batch`` if set); each member's noise comes from its own seed, so its
        result does not depend on how members are grouped.

        Args:
            observation: the current observation (or its :class:`EncodedObservations`).
            actions: ``(N, K, A)`` candidate chunks in robot units (e.g. another checkpoint's proposals:
                they are normalised with this model's statistics).
            num_futures, num_values: ensemble sizes F and V (>= 1).
            world_model_steps, value_steps: denoising steps of the two stages (the largest member's
                under ``linspace``).
            seed: sampling seed (None: global RNG).
            ensemble_steps: ``linspace`` (the reference's spread of step counts) or ``equal``.

        Returns:
            :class:`ActionEvaluation` with ``values (N, F, V)`` in [0, 1] and ``future_proprio (N, F, P)``.

        Raises:
            CosmosPolicyError: wrong action shape, ensemble sizes or step mode.
        """
        normed = self.processor.normalize_actions(actions).to(self.device)
        if num_futures < 1 or num_values < 1:
            raise CosmosPolicyError(f"policy: num_futures and num_values must be >= 1, got {num_futures}, {num_values}")
        n, f, v = normed.shape[0], num_futures, num_values
        future_steps = member_steps(world_model_steps, f, ensemble_steps)
        value_member_steps = member_steps(value_steps, v, ensemble_steps)
        enc = self.encode_observations(observation, instruction)
        if enc.batch.size != 1:
            raise CosmosPolicyError(f"policy: evaluate_actions takes one observation, got {enc.batch.size}")
        batch, clean = enc.batch, enc.clean
        wm_in = self.write(clean.expand(n * f, -1, -1, -1, -1), "action", normed.repeat_interleave(f, 0))
        futures = self._sample_members(wm_in, "world_model", batch, future_steps, seed)      # rows n * F + f
        future_proprio = self.read(futures)["future_proprio"]
        futures = self.write(futures, "future_proprio", future_proprio)
        val_in = futures.repeat_interleave(v, 0)                                              # rows (n F + f) V + v
        values = self.read(self._sample_members(val_in, self.value_objective, batch, value_member_steps,
                                                seed))["value"]
        fp = self.processor.to_robot({"future_proprio": future_proprio})["future_proprio"]
        return ActionEvaluation(values=values.view(n, f, v).cpu().numpy(), future_proprio=fp.view(n, f, -1).numpy())

    def _sample_members(self, latents: torch.Tensor, objective: str, batch: PreparedBatch, steps: list[int],
                        seed: int | None) -> torch.Tensor:
        """Sample an ensemble whose member ``m`` owns rows ``r`` with ``r % M == m`` (M = len(steps)),
        with ``steps[m]`` denoising steps and seed ``seed + m`` (its rows' noise is drawn from it alone);
        one batched call per distinct step count, in micro-batches of ``max_batch``.

        Returns:
            ``(R, 16, T, h, w)`` generated latents in the order of ``latents``.
        """
        rows, members = latents.shape[0], len(steps)
        seeds = member_seeds(seed, members)
        shape = (rows // members, *latents.shape[1:])
        out = torch.empty_like(latents)
        for count, group in group_members(steps).items():
            # member-major: the rows of member group[0], then those of group[1], ...
            index = torch.cat([torch.arange(m, rows, members, device=latents.device) for m in group])
            noise = torch.cat([torch.randn(shape, generator=self.generator(None if seeds is None else seeds[m]),
                                           device=latents.device, dtype=latents.dtype) for m in group])
            clean, step = latents[index], self.max_batch or index.numel()
            for i in range(0, index.numel(), step):
                sl = slice(i, i + step)
                n = clean[sl].shape[0]
                out[index[sl]] = self.module.generate(
                    clean[sl], self.condition_mask(objective, n), batch.text.expand(n, -1, -1),
                    batch.text_mask.expand(n, -1), num_steps=count, noise=noise[sl])
        return out


__all__ = ["CosmosPolicy", "PolicyOutput", "ActionEvaluation", "PreparedBatch", "EncodedObservations", "Observation"]
