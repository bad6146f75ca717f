"""What a policy server does with a message, without the network: validate a request, run a batch of
requests through the policy (or the best-of-N planner), build the replies (``docs/deploy.md``).

``inference/server.py`` puts this behind a websocket; keeping the two apart lets the request checks
and the reply layout be read (and tested) in one place.

A request is the observation dict :class:`~cosmos_policy_lightning.inference.policy.CosmosPolicy`
takes, decoded from openpi's msgpack-numpy format (``cosmos_policy_lightning.client``)::

    {"images": {camera: (H, W, 3) uint8}, "proprio": (P,) float, "instruction": str,
     "seed": int (optional), "return_images": bool (optional)}

``prompt`` (openpi's name) is accepted for ``instruction``; other keys are ignored. Every check that
fails raises :class:`BadRequest`, whose one-line message names the field.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..client import unpackb
from ..errors import CosmosPolicyError
from .observation import Observation

#: Largest camera frame side accepted with ``any_image_size`` (a guard against absurd allocations).
MAX_IMAGE_SIDE = 4096


class BadRequest(CosmosPolicyError):
    """A request the server refuses; the message (one line) starts with ``bad request: <field>:``.

    Attributes:
        field: the offending field, e.g. ``images.wrist``, ``proprio``, ``instruction``, ``message``.
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"bad request: {field}: {' '.join(str(problem).split())}")


@dataclass
class Request:
    """One validated request.

    Attributes:
        observation: camera frames (uint8, checked), proprio ``(P,)`` float64 in robot units, instruction.
        seed: the sampling seed (the client's, or one the server assigned); reported in the reply.
        return_images: decode and return the predicted future frames.
    """

    observation: Observation
    seed: int
    return_images: bool


class PolicyService:
    """Requests -> replies for one policy (and optionally a best-of-N planner).

    Args:
        policy: the loaded :class:`~cosmos_policy_lightning.inference.policy.CosmosPolicy`.
        planner: a :class:`~cosmos_policy_lightning.inference.planning.Planner`: each request is then
            planned (one at a time; a plan is already a batch of N x F x V samples).
        num_steps: denoising steps of the direct policy (5 in the paper's runs).
        decoding: ``parallel`` or ``autoregressive`` (direct policy).
        seed: seed for requests that carry none: request n (counted from 0 in arrival order) gets
            ``seed + n``. None: a random seed per request. Either way the reply reports it.
        return_images: decode the future frames for requests that do not say (``return_images``).
        default_instruction: instruction for requests without one (None: a text-conditioned model
            refuses such requests).
        any_image_size: accept camera frames of any size and resize them like the in-process policy;
            by default frames must already have the model's ``image_size`` (resize on the robot).
        checkpoint, planning_checkpoint: paths reported in the metadata.
    """

    def __init__(self, policy: Any, planner: Any | None = None, num_steps: int = 5, decoding: str = "parallel",
                 seed: int | None = None, return_images: bool = False, default_instruction: str | None = None,
                 any_image_size: bool = False, checkpoint: str | None = None,
                 planning_checkpoint: str | None = None):
        if num_steps < 1:
            raise CosmosPolicyError(f"serve: num_steps must be >= 1, got {num_steps}")
        if decoding not in ("parallel", "autoregressive"):
            raise CosmosPolicyError(f"serve: decoding must be parallel or autoregressive, got {decoding!r}")
        self.policy, self.planner = policy, planner
        self.embodiment = policy.embodiment
        self.num_steps, self.decoding, self.seed = num_steps, decoding, seed
        self.return_images, self.default_instruction = return_images, default_instruction
        self.any_image_size = any_image_size
        self.checkpoint, self.planning_checkpoint = checkpoint, planning_checkpoint
        identity = policy.text.identity or "none"
        self.text_conditioned = identity != "none"
        self.text_identity = identity
        self._count = 0
        self._count_lock = threading.Lock()
        self._random = random.SystemRandom()

    @property
    def batchable(self) -> bool:
        """Whether several requests may share one forward pass (the direct policy; not planning)."""
        return self.planner is None

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, Any]:
        """The message sent on connect: what a robot needs to build requests and run the loop.

        Keys: ``server``, ``version``, ``checkpoint``, ``planning_checkpoint``, ``embodiment`` (name),
        ``control_hz``, ``cameras`` (list of ``{name, role, image_size: [H, W]}`` in model order),
        ``image_size``, ``any_image_size``, ``proprio_dim``, ``proprio_names``, ``action_dim``,
        ``action_names``, ``chunk_size`` (K), ``execute_steps``, ``instruction`` (``text_encoder``,
        ``conditioned``, ``required``, ``default``), ``sampling`` (``num_steps``, ``decoding``,
        ``seed``, ``device``, ``dtype``), ``planning`` (None or the planner's settings),
        ``returns_images`` and ``embodiment_config`` (the full embodiment, ``Embodiment.to_dict()``).
        """
        from .. import __version__

        emb, pl = self.embodiment, self.planner
        return {
            "server": "cosmos-policy-lightning", "version": __version__,
            "checkpoint": self.checkpoint, "planning_checkpoint": self.planning_checkpoint,
            "embodiment": emb.name, "control_hz": emb.control_hz,
            "cameras": [{"name": c.name, "role": c.role, "image_size": list(emb.image_size)} for c in emb.cameras],
            "image_size": list(emb.image_size), "any_image_size": self.any_image_size,
            "proprio_dim": emb.proprio.dim, "proprio_names": list(emb.proprio.names or []),
            "action_dim": emb.action.dim, "action_names": list(emb.action.names or []),
            "chunk_size": emb.action.chunk_size, "execute_steps": emb.action.execute_steps,
            "instruction": {"text_encoder": self.text_identity, "conditioned": self.text_conditioned,
                            "required": self.text_conditioned and self.default_instruction is None,
                            "default": self.default_instruction},
            "sampling": {"num_steps": self.num_steps, "decoding": self.decoding, "seed": self.seed,
                         "device": str(self.policy.device), "dtype": str(self.policy.dtype).replace("torch.", "")},
            "planning": None if pl is None else {
                "num_proposals": pl.num_proposals, "num_futures": pl.num_futures, "num_values": pl.num_values,
                "aggregation": pl.aggregation, "policy_steps": pl.policy_steps,
                "world_model_steps": pl.world_model_steps, "value_steps": pl.value_steps,
                "ensemble_steps": pl.ensemble_steps},
            "returns_images": self.return_images and pl is None,
            "embodiment_config": emb.to_dict(),
        }

    # ------------------------------------------------------------------ requests
    def _next_seed(self) -> int:
        with self._count_lock:
            n, self._count = self._count, self._count + 1
        return self.seed + n if self.seed is not None else self._random.randrange(2**31)

    def parse(self, message: bytes | str) -> Request:
        """Decode and check one message.

        Raises:
            BadRequest: text frame, not msgpack, not a map, missing / extra-sized / non-uint8 camera frame,
                proprio of the wrong length or with NaN / inf, missing instruction for a text-conditioned
                model, bad ``seed`` or ``return_images``.
        """
        if isinstance(message, str):
            raise BadRequest("message", "expected a binary msgpack frame (openpi msgpack-numpy), got a text frame")
        try:
            data = unpackb(message)
        except Exception as err:  # msgpack raises several types for corrupt data
            raise BadRequest("message", f"not msgpack-numpy data ({type(err).__name__}: {err})") from None
        if not isinstance(data, Mapping):
            raise BadRequest("message", f"expected a map with images, proprio, instruction; got {type(data).__name__}")
        images = self._images(data)
        proprio = self._proprio(data)
        instruction = self._instruction(data)
        seed = data.get("seed")
        if seed is None:
            seed = self._next_seed()
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise BadRequest("seed", f"expected an integer in [0, 2**63), got {seed!r}")
        ret = data.get("return_images", self.return_images and self.planner is None)
        if not isinstance(ret, (bool, np.bool_)):
            raise BadRequest("return_images", f"expected true or false, got {ret!r}")
        if ret and self.planner is not None:
            raise BadRequest("return_images", "this server plans (best-of-N); it returns no decoded future images")
        return Request(Observation(images, proprio, instruction), int(seed), bool(ret))

    def _images(self, data: Mapping[str, Any]) -> dict[str, np.ndarray]:
        emb = self.embodiment
        names = emb.camera_names
        h, w = emb.image_size
        images = data.get("images")
        if not isinstance(images, Mapping):
            what = "missing" if images is None else f"a {type(images).__name__}"
            raise BadRequest("images", f"expected a map camera -> ({h}, {w}, 3) uint8 for {', '.join(names)}; "
                                       f"got {what}")
        extra = [str(c) for c in images if c not in names]
        if extra:
            raise BadRequest(f"images.{extra[0]}", f"not a camera of embodiment {emb.name!r} (cameras "
                                                   f"{', '.join(names)}): misnamed, or an observation of another robot")
        out = {}
        for cam in names:
            field = f"images.{cam}"
            if cam not in images:
                raise BadRequest(field, f"camera missing; embodiment {emb.name} needs {', '.join(names)}, got "
                                        f"{', '.join(map(str, images)) or 'none'}")
            arr = images[cam]
            if not isinstance(arr, np.ndarray):
                raise BadRequest(field, f"expected a ({h}, {w}, 3) uint8 numpy array, got {type(arr).__name__}")
            if arr.dtype != np.uint8:
                raise BadRequest(field, f"expected dtype uint8 (RGB 0..255), got {arr.dtype}")
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise BadRequest(field, f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
            if self.any_image_size:
                if not (1 <= arr.shape[0] <= MAX_IMAGE_SIDE and 1 <= arr.shape[1] <= MAX_IMAGE_SIDE):
                    raise BadRequest(field, f"image sides must be in [1, {MAX_IMAGE_SIDE}], got shape {arr.shape}")
            elif arr.shape[:2] != (h, w):
                raise BadRequest(field, f"expected shape ({h}, {w}, 3), the model's image size (resize on the "
                                        f"robot, or serve with --any_image_size true), got {arr.shape}")
            out[cam] = arr
        return out

    def _proprio(self, data: Mapping[str, Any]) -> np.ndarray:
        dim = self.embodiment.proprio.dim
        names = self.embodiment.proprio.names
        expected = f"({dim},)" + (f" ({', '.join(names)})" if names else "")
        if "proprio" not in data:
            raise BadRequest("proprio", f"missing; expected shape {expected} in robot units")
        try:
            p = np.asarray(data["proprio"], dtype=np.float64)
        except (TypeError, ValueError):
            raise BadRequest("proprio", f"expected numbers of shape {expected}, got "
                                        f"{type(data['proprio']).__name__}") from None
        if p.shape != (dim,):
            raise BadRequest("proprio", f"expected shape {expected}, got {p.shape}: this policy's embodiment "
                                        f"{self.embodiment.name!r} has proprio.dim = {dim} (an observation of another "
                                        f"robot?)")
        bad = np.flatnonzero(~np.isfinite(p))
        if bad.size:
            raise BadRequest("proprio", f"contains NaN or inf at index {', '.join(map(str, bad[:8]))}")
        return p

    def _instruction(self, data: Mapping[str, Any]) -> str:
        key = "instruction" if "instruction" in data else "prompt"
        text = data.get(key)
        if text is None:
            if self.default_instruction is not None:
                return self.default_instruction
            if self.text_conditioned:
                raise BadRequest("instruction", f"missing; this model is conditioned on text ({self.text_identity}): "
                                                f"send the task instruction as a string")
            return ""
        if not isinstance(text, str):
            raise BadRequest(key, f"expected a string, got {type(text).__name__}")
        return text

    # ------------------------------------------------------------------ inference
    def run(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
        """One forward pass for B requests (direct policy) or one plan (planner, B = 1).

        Each observation samples from its own seed's noise stream, so a reply does not depend on the
        requests it was batched with (``CosmosPolicy.predict``'s list of seeds).

        Returns:
            B replies: ``actions`` ``(K, A)`` float32 robot units, ``value`` (float in [0, 1]; with
            planning the chosen proposal's aggregated score), ``future_proprio`` ``(P,)`` float32
            (planning: mean over the chosen proposal's futures), ``seed``, optionally
            ``future_images`` ``{camera: (H, W, 3) uint8}`` and, with planning, ``planning``
            (``best_index``, ``scores`` ``(N,)``).

        Raises:
            CosmosPolicyError: more than one request while planning; errors of the policy.
        """
        if self.planner is not None:
            if len(requests) != 1:
                raise CosmosPolicyError(f"serve: planning takes one request at a time, got {len(requests)}")
            r = requests[0]
            plan = self.planner.plan(r.observation, seed=r.seed)
            fp = plan.future_proprio
            future = (np.asarray(fp)[plan.best_index].mean(axis=0) if fp is not None
                      else np.full(self.embodiment.proprio.dim, math.nan))
            return [{"actions": np.asarray(plan.actions, dtype=np.float32), "value": float(plan.value),
                     "future_proprio": future.astype(np.float32), "seed": r.seed,
                     "planning": {"best_index": plan.best_index,
                                  "scores": np.asarray(plan.scores, dtype=np.float32)}}]
        decode = any(r.return_images for r in requests)
        out = self.policy.predict([r.observation for r in requests], num_steps=self.num_steps,
                                  seed=[r.seed for r in requests], decoding=self.decoding, decode_images=decode)
        replies = []
        for i, r in enumerate(requests):
            reply = {"actions": out.actions[i], "value": float(out.value[i]), "future_proprio": out.future_proprio[i],
                     "seed": r.seed}
            if r.return_images:
                reply["future_images"] = {cam: frames[i] for cam, frames in out.future_images.items()}
            replies.append(reply)
        return replies


__all__ = ["PolicyService", "Request", "BadRequest", "MAX_IMAGE_SIDE"]
