"""Embodiment descriptor: one YAML file declares a robot (docs/method.md §1, §4).

Everything the framework derives about a robot -- latent-frame layout, injection sizes, shard
contents, normalisation -- comes from an :class:`Embodiment` loaded from ``embodiments/<name>.yaml``.
Adding a robot costs one file and no code.

YAML schema (see ``embodiments/*.yaml`` for commented examples)::

    name: libero                      # str, non-empty
    control_hz: 20                    # positive number, Hz
    image_size: [224, 224]            # [H, W] of the model input, each a positive multiple of 16
    cameras:                          # ordered list = latent-slot order
      - name: wrist                   # unique
        role: wrist                   # primary | secondary | wrist
        keys: {robomimic: eye_in_hand_rgb}   # optional: key name per source format
    proprio:
      dim: 9
      names: [...]                    # optional, len == dim
      keys: {robomimic: [ee_pos, gripper_qpos]}   # optional: keys concatenated in order
    action:
      dim: 7
      names: [...]                    # optional, len == dim
      chunk_size: 16                  # K
      execute_steps: 16               # 1 <= execute_steps <= chunk_size
      keys: {robomimic: actions}      # optional
    value:
      gamma: 0.99                     # 0 < gamma <= 1
    normalization:                    # optional, per modality: minmax | quantile | none
      action: minmax
      proprio: minmax

Every validation failure raises :class:`EmbodimentError` whose one-line message names the file,
the field and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .errors import CosmosPolicyError
from .yaml_files import load_yaml_file

#: Latent channels of the Wan2.1 VAE (docs/method.md §1).
LATENT_CHANNELS = 16
#: Spatial downsampling of the Wan2.1 VAE (docs/method.md §1).
VAE_SPATIAL_DOWNSAMPLE = 8
#: The DiT patchifies latents 2x2 (docs/method.md §6), so an image side must be a multiple of 8 * 2.
IMAGE_SIZE_MULTIPLE = VAE_SPATIAL_DOWNSAMPLE * 2

CAMERA_ROLES = ("primary", "secondary", "wrist")
NORMALIZATION_MODES = ("minmax", "quantile", "none")


class EmbodimentError(CosmosPolicyError):
    """A malformed embodiment descriptor; the message is one line: ``<file>: <field>: <problem>``."""


@dataclass(frozen=True)
class Camera:
    """One camera, in latent-slot order.

    Attributes:
        name: unique camera name (slot names are ``image/<name>`` and ``future_image/<name>``).
        role: ``primary``, ``secondary`` or ``wrist``.
        keys: key name of this camera per source format (e.g. ``{"robomimic": "agentview_rgb"}``).
    """

    name: str
    role: str
    keys: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProprioSpec:
    """Proprioception: ``dim`` values per step, optionally named; ``keys`` lists, per source
    format, the source keys concatenated (in order) to form the proprio vector."""

    dim: int
    names: tuple[str, ...] | None = None
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionSpec:
    """Actions: ``dim`` values per step; chunks of ``chunk_size`` (K) steps are predicted, and
    ``execute_steps`` of them are executed before re-planning (docs/method.md §5)."""

    dim: int
    chunk_size: int
    execute_steps: int
    names: tuple[str, ...] | None = None
    keys: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ValueSpec:
    """Value function settings: discount ``gamma`` in (0, 1] (docs/method.md §4)."""

    gamma: float


@dataclass(frozen=True)
class Embodiment:
    """A robot: cameras, proprio, action chunking, value discount, normalisation modes.

    Build with :meth:`from_yaml` (validating) or :meth:`from_dict` (same validation; used when a
    checkpoint carries the embodiment). ``image_size`` is ``(H, W)`` in pixels of the model input.
    """

    name: str
    control_hz: float
    image_size: tuple[int, int]
    cameras: tuple[Camera, ...]
    proprio: ProprioSpec
    action: ActionSpec
    value: ValueSpec
    normalization: Mapping[str, str]
    source: str = "<dict>"

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    @property
    def latent_frame_shape(self) -> tuple[int, int, int]:
        """``(C', H/8, W/8)`` of one latent frame (docs/method.md §1)."""
        h, w = self.image_size
        return (LATENT_CHANNELS, h // VAE_SPATIAL_DOWNSAMPLE, w // VAE_SPATIAL_DOWNSAMPLE)

    @property
    def latent_frame_volume(self) -> int:
        """Number of values in one latent frame, ``16 * (H/8) * (W/8)``."""
        return math.prod(self.latent_frame_shape)

    @property
    def primary_camera(self) -> Camera:
        """The first camera with role ``primary`` (validation guarantees there is one)."""
        return next(c for c in self.cameras if c.role == "primary")

    # ------------------------------------------------------------------ same robot?
    def difference(self, other: "Embodiment", use: "CompatibilityUse" = "checkpoint") -> tuple[str, Any, Any] | None:
        """The first field, among those that matter for ``use`` (:data:`COMPATIBILITY`), in which ``other``
        describes another robot than ``self``; None when they are the same robot for that use.

        Args:
            other: the embodiment to compare with.
            use: ``data`` (shards), ``checkpoint`` (weights + statistics), ``inference`` (a policy run with
                another embodiment object, or two models of one planner) or ``simulator`` (an env's robot).

        Returns:
            ``(field, self's value, other's value)``, e.g. ``("action.dim", 4, 14)``.

        Raises:
            KeyError: unknown ``use``.
        """
        for name in COMPATIBILITY[use]:
            a, b = _robot_field(self, name), _robot_field(other, name)
            if a != b:
                return name, a, b
        return None

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Embodiment":
        """Load and validate ``path``: a YAML file, or the bare name of a shipped embodiment (``metaworld``,
        ``libero``, ...; see ``shipped.py``) when no such file exists.

        Raises:
            EmbodimentError: file missing, not YAML, or any field invalid (one-line message).
        """
        path = Path(path)
        if not path.is_file():
            from .shipped import embodiment_path, shipped_embodiments, shipped_path

            # a bare name (``metaworld``), or ``embodiments/<name>.yaml`` from another directory: a shipped file
            named = embodiment_path(str(path)) or (None if path.is_absolute() else shipped_path(path))
            if named is None:
                names = ", ".join(shipped_embodiments()) or "none found"
                raise EmbodimentError(f"{path}: file not found (shipped embodiments, by bare name: {names})")
            path = named
        data = load_yaml_file(path, EmbodimentError)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Embodiment":
        """Validate a mapping with the YAML schema above and build the embodiment.

        Raises:
            EmbodimentError: any field invalid; the message names ``source`` and the field.
        """
        return _Validator(source).embodiment(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, accepted by :meth:`from_dict` (stored in checkpoints and manifests)."""
        return {
            "name": self.name,
            "control_hz": self.control_hz,
            "image_size": list(self.image_size),
            "cameras": [{"name": c.name, "role": c.role, "keys": dict(c.keys)} for c in self.cameras],
            "proprio": {
                "dim": self.proprio.dim,
                "names": list(self.proprio.names) if self.proprio.names else None,
                "keys": {k: list(v) for k, v in self.proprio.keys.items()},
            },
            "action": {
                "dim": self.action.dim,
                "names": list(self.action.names) if self.action.names else None,
                "chunk_size": self.action.chunk_size,
                "execute_steps": self.action.execute_steps,
                "keys": dict(self.action.keys),
            },
            "value": {"gamma": self.value.gamma},
            "normalization": dict(self.normalization),
        }


CompatibilityUse = Literal["data", "checkpoint", "inference", "simulator"]

#: Which fields make two embodiments the same robot, per use (checked in this order by
#: :meth:`Embodiment.difference`), and why:
#:
#: - ``data``: what is baked into converted shards: the camera *set* (images are stored by camera name and
#:   batched in the reading embodiment's order), image size, dims, chunk size and the discount of the stored
#:   values;
#: - ``checkpoint``: what weights and statistics depend on: cameras *in order* (each is a latent slot),
#:   image size, dims, chunk size and the discount the value was trained with;
#: - ``inference``: what a policy's inputs and outputs depend on; the discount is left out (acting and
#:   comparing values do not depend on it: a planner ranks one model's values against each other);
#: - ``simulator``: what an env exchanges with a policy, the proprio and action vectors.
COMPATIBILITY: dict[str, tuple[str, ...]] = {
    "data": ("camera_set", "image_size", "proprio.dim", "action.dim", "action.chunk_size", "value.gamma"),
    "checkpoint": ("cameras", "image_size", "proprio.dim", "action.dim", "action.chunk_size", "value.gamma"),
    "inference": ("cameras", "image_size", "proprio.dim", "action.dim", "action.chunk_size"),
    "simulator": ("proprio.dim", "action.dim"),
}


def _robot_field(emb: Embodiment, name: str) -> Any:
    return {"camera_set": lambda: sorted(emb.camera_names), "cameras": lambda: list(emb.camera_names),
            "image_size": lambda: list(emb.image_size), "proprio.dim": lambda: emb.proprio.dim,
            "action.dim": lambda: emb.action.dim, "action.chunk_size": lambda: emb.action.chunk_size,
            "value.gamma": lambda: emb.value.gamma}[name]()


def load_embodiment(spec: "str | Path | Embodiment | Mapping[str, Any]") -> Embodiment:
    """Accept a YAML path, a mapping or an :class:`Embodiment` and return the embodiment."""
    if isinstance(spec, Embodiment):
        return spec
    if isinstance(spec, Mapping):
        return Embodiment.from_dict(spec)
    return Embodiment.from_yaml(spec)


class _Validator:
    """Checks one descriptor, raising one-line :class:`EmbodimentError` messages."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> None:
        raise EmbodimentError(f"{self.source}: {where}: {problem}")

    def mapping(self, value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, Mapping):
            self.fail(where or "<root>", f"expected a mapping, got {type(value).__name__}")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(f"{where}.{missing[0]}" if where else missing[0], "missing required field")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            self.fail(f"{where}.{unknown[0]}" if where else str(unknown[0]),
                      f"unknown field (expected one of {', '.join(required + optional)})")
        return dict(value)

    def positive_int(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected a positive integer, got {value!r}")
        if value <= 0:
            self.fail(where, f"expected a positive integer, got {value}")
        return value

    def positive_number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(where, f"expected a positive number, got {value!r}")
        if value <= 0:
            self.fail(where, f"expected a positive number, got {value}")
        return float(value)

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"expected a non-empty string, got {value!r}")
        if "/" in value or any(ch.isspace() for ch in value):
            self.fail(where, f"expected a name without '/' or spaces, got {value!r}")
        return value

    def names(self, value: Any, dim: int, where: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(where, "expected a list of non-empty strings")
        if len(value) != dim:
            self.fail(where, f"expected {dim} names (one per dimension), got {len(value)}")
        if len(set(value)) != len(value):
            self.fail(where, "duplicate dimension names")
        return tuple(value)

    def keys(self, value: Any, where: str, many: bool) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(where, "expected a mapping from source format to key name")
        out = {}
        for fmt, key in value.items():
            if many:
                key = [key] if isinstance(key, str) else key
                if not isinstance(key, list) or not key or not all(isinstance(k, str) and k for k in key):
                    self.fail(f"{where}.{fmt}", "expected a key name or a non-empty list of key names")
                out[str(fmt)] = tuple(key)
            else:
                if not isinstance(key, str) or not key:
                    self.fail(f"{where}.{fmt}", "expected a non-empty key name")
                out[str(fmt)] = key
        return out

    def embodiment(self, data: Any) -> Embodiment:
        d = self.mapping(
            data, "", ("name", "control_hz", "image_size", "cameras", "proprio", "action", "value"),
            ("normalization", "description"),
        )
        name = self.name(d["name"], "name")
        control_hz = self.positive_number(d["control_hz"], "control_hz")

        size = d["image_size"]
        if not isinstance(size, list) or len(size) != 2:
            self.fail("image_size", f"expected [H, W], got {size!r}")
        h = self.positive_int(size[0], "image_size[0]")
        w = self.positive_int(size[1], "image_size[1]")
        for side, where in ((h, "image_size[0]"), (w, "image_size[1]")):
            if side % IMAGE_SIZE_MULTIPLE:
                self.fail(where, f"expected a multiple of {IMAGE_SIZE_MULTIPLE} (VAE /8, DiT patch 2), got {side}")

        cams = d["cameras"]
        if not isinstance(cams, list) or not cams:
            self.fail("cameras", "expected a non-empty list of cameras")
        cameras = []
        for i, cam in enumerate(cams):
            where = f"cameras[{i}]"
            c = self.mapping(cam, where, ("name", "role"), ("keys",))
            cname = self.name(c["name"], f"{where}.name")
            if c["role"] not in CAMERA_ROLES:
                self.fail(f"{where}.role", f"expected one of {', '.join(CAMERA_ROLES)}, got {c['role']!r}")
            if cname in (x.name for x in cameras):
                self.fail(f"{where}.name", f"duplicate camera name {cname!r}")
            cameras.append(Camera(cname, c["role"], self.keys(c.get("keys"), f"{where}.keys", many=False)))
        if not any(c.role == "primary" for c in cameras):
            self.fail("cameras", "expected at least one camera with role 'primary'")

        p = self.mapping(d["proprio"], "proprio", ("dim",), ("names", "keys"))
        pdim = self.positive_int(p["dim"], "proprio.dim")
        proprio = ProprioSpec(pdim, self.names(p.get("names"), pdim, "proprio.names"),
                              self.keys(p.get("keys"), "proprio.keys", many=True))

        a = self.mapping(d["action"], "action", ("dim", "chunk_size"), ("names", "execute_steps", "keys"))
        adim = self.positive_int(a["dim"], "action.dim")
        k = self.positive_int(a["chunk_size"], "action.chunk_size")
        execute = self.positive_int(a.get("execute_steps", k), "action.execute_steps")
        if execute > k:
            self.fail("action.execute_steps", f"expected at most chunk_size ({k}), got {execute}")
        action = ActionSpec(adim, k, execute, self.names(a.get("names"), adim, "action.names"),
                            self.keys(a.get("keys"), "action.keys", many=False))

        v = self.mapping(d["value"], "value", ("gamma",))
        gamma = v["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 < gamma <= 1):
            self.fail("value.gamma", f"expected a number in (0, 1], got {gamma!r}")

        norm_in = d.get("normalization") or {}
        norm = self.mapping(norm_in, "normalization", (), ("action", "proprio"))
        normalization = {"action": "minmax", "proprio": "minmax"}
        for key, mode in norm.items():
            if mode not in NORMALIZATION_MODES:
                self.fail(f"normalization.{key}", f"expected one of {', '.join(NORMALIZATION_MODES)}, got {mode!r}")
            normalization[key] = mode

        emb = Embodiment(name, control_hz, (h, w), tuple(cameras), proprio, action, ValueSpec(float(gamma)),
                         normalization, self.source)
        volume = emb.latent_frame_volume
        if k * adim > volume:
            self.fail("action", f"chunk_size * dim = {k} * {adim} = {k * adim} values do not fit in one latent "
                                f"frame of {volume} values (16 * H/8 * W/8); lower chunk_size or raise image_size")
        if pdim > volume:
            self.fail("proprio.dim", f"{pdim} values do not fit in one latent frame of {volume} values")
        return emb
