"""Offscreen MuJoCo cameras for simulator adapters: pick an OpenGL backend, render named cameras small.

Shared by the MuJoCo simulators (:mod:`.metaworld`, :mod:`.aloha`). Rendering needs an OpenGL backend
without a display: :func:`select_gl_backend` picks ``MUJOCO_GL`` (``egl``, else ``osmesa``) *before*
MuJoCo is imported, because MuJoCo reads it only once at import. On Debian/Ubuntu the EGL route needs
``libegl1 libegl-mesa0 libgl1-mesa-dri``, osmesa needs ``libosmesa6``.

:class:`CameraRenderer` renders with shadows and reflections off (several times faster, and the model
does not need them) and anti-aliases by supersampling: it renders at ``s`` times the size without
multisampling, then averages ``s x s`` blocks (as smooth as MuJoCo's 4x MSAA and about twice as fast on a
software OpenGL such as llvmpipe).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import numpy as np

from ..errors import CosmosPolicyError

RENDER_PROBE = ("import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=\"1\"/>"
                 "</worldbody></mujoco>'); r = mujoco.Renderer(m, 8, 8); r.render(); r.close()")
GL_HELP = ("install an offscreen OpenGL backend: Debian/Ubuntu `apt-get install libegl1 libegl-mesa0 "
           "libgl1-mesa-dri` (MUJOCO_GL=egl) or `apt-get install libosmesa6` (MUJOCO_GL=osmesa)")


def select_gl_backend() -> str:
    """Choose ``MUJOCO_GL`` for offscreen rendering; call before MuJoCo is imported.

    An explicit ``MUJOCO_GL`` is respected. Otherwise ``egl`` then ``osmesa`` are probed in a short
    subprocess (MuJoCo binds its backend at import, so a failed try cannot be undone in-process)
    and the first that renders is exported, so worker processes inherit it.

    Returns:
        the backend name ("" when MuJoCo was imported before and bound whatever it found).

    Raises:
        CosmosPolicyError: neither backend renders (the message names the Debian packages).
    """
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    if "mujoco" in sys.modules:
        # Too late to choose: whatever MuJoCo bound at import is what we get (checked at render time).
        return ""
    for backend in ("egl", "osmesa"):
        env = dict(os.environ, MUJOCO_GL=backend)
        env.pop("PYOPENGL_PLATFORM", None)
        try:
            ok = subprocess.run([sys.executable, "-c", RENDER_PROBE], env=env, capture_output=True,
                                timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            os.environ["MUJOCO_GL"] = backend
            return backend
    raise CosmosPolicyError(f"MuJoCo cannot render offscreen with MUJOCO_GL=egl or osmesa; {GL_HELP}")


def import_mujoco():
    """``import mujoco`` after :func:`select_gl_backend`, with a one-line error naming the fix."""
    select_gl_backend()
    try:
        import mujoco
    except Exception as err:  # mujoco binds its GL backend at import: a missing libEGL fails here
        raise CosmosPolicyError(f"cannot import mujoco with MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')} "
                                f"({type(err).__name__}: {err}); {GL_HELP}") from None
    return mujoco


def camera_names(model) -> set[str]:
    """The names of the cameras of an ``mujoco.MjModel``."""
    mujoco = import_mujoco()
    return {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)}


def map_cameras(embodiment, model, defaults: Mapping[str, str], overrides: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """Embodiment camera name -> MuJoCo camera name, in the embodiment's order (a simulator's ``SimEnv.cameras``).

    A camera maps through ``overrides``, then ``defaults`` (the adapter's own aliases), else to the MuJoCo
    camera of its own name.

    Raises:
        CosmosPolicyError: a camera maps to no camera of ``model`` (one line naming the file, the camera and
            the cameras the scene has).
    """
    available = camera_names(model)
    mapping = {**defaults, **(overrides or {})}
    out: dict[str, str] = {}
    for cam in embodiment.cameras:
        mj_name = mapping.get(cam.name, cam.name)
        if mj_name not in available:
            raise CosmosPolicyError(f"{embodiment.source}: camera {cam.name!r} maps to MuJoCo camera {mj_name!r}, "
                                    f"not one of {', '.join(sorted(available))} (name the camera after one, or "
                                    f"pass cameras={{{cam.name!r}: <MuJoCo camera>}})")
        out[cam.name] = mj_name
    return out


class CameraRenderer:
    """Renders a fixed set of MuJoCo cameras of one model at one image size, offscreen.

    Args:
        model: the ``mujoco.MjModel`` (its offscreen buffer is enlarged to fit the render).
        cameras: embodiment camera name -> MuJoCo camera name, in the order images are returned.
        image_size: ``(H, W)`` of the returned images, in pixels.
        supersample: render at ``supersample`` times the size, then average blocks (1 = off).
        turns: embodiment camera name -> quarter turns (``np.rot90``) that make the image upright.

    Raises:
        CosmosPolicyError: ``supersample < 1``, or no offscreen OpenGL context (names the packages).
    """

    def __init__(self, model, cameras: Mapping[str, str], image_size: tuple[int, int], supersample: int = 2,
                 turns: Mapping[str, int] | None = None):
        mujoco = import_mujoco()
        self.cameras, self.turns = dict(cameras), dict(turns or {})
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.supersample = int(supersample)
        if self.supersample < 1:
            raise CosmosPolicyError(f"supersample must be >= 1, got {supersample}")
        h, w = self.image_size
        rh, rw = h * self.supersample, w * self.supersample
        # The offscreen buffer must hold the render; multisampling is replaced by supersampling.
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), rw)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), rh)
        model.vis.quality.offsamples = 0 if self.supersample > 1 else int(model.vis.quality.offsamples)
        try:
            self.renderer = mujoco.Renderer(model, rh, rw)
        except Exception as err:  # GL failures surface as assorted exception types
            raise CosmosPolicyError(f"MuJoCo cannot create an offscreen renderer (MUJOCO_GL="
                                    f"{os.environ.get('MUJOCO_GL', '<unset>')}): {err}; {GL_HELP}") from None
        # Shadows and reflections cost most of the render time and carry nothing the policy needs.
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False

    def render(self, data) -> dict[str, np.ndarray]:
        """``{camera: (H, W, 3) uint8}`` of every camera for the ``mujoco.MjData`` state ``data``."""
        (h, w), s = self.image_size, self.supersample
        images: dict[str, np.ndarray] = {}
        for name, mj_name in self.cameras.items():
            self.renderer.update_scene(data, camera=mj_name)
            img = self.renderer.render()
            if s > 1:  # box filter: mean of each s x s block, rounded
                img = (img.reshape(h, s, w, s, 3).mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)
            turns = self.turns.get(name, 0)
            images[name] = np.ascontiguousarray(np.rot90(img, turns)) if turns else img.copy()
        return images

    def close(self) -> None:
        """Free the GL context (idempotent)."""
        if getattr(self, "renderer", None) is not None:
            self.renderer.close()
            self.renderer = None


class EnvLifecycle:
    """Lifecycle of a simulator env, with an optional :class:`CameraRenderer` as ``self.renderer``:
    :meth:`close` frees it (idempotent), also as a context manager and when the env is garbage-collected
    (the GL context must go before the interpreter tears EGL down). Subclasses free their simulator in
    :meth:`close_simulator`."""

    renderer: CameraRenderer | None = None

    def close_simulator(self) -> None:
        """Free the simulator itself (nothing by default)."""

    def close(self) -> None:
        """Free the GL context and the simulator (idempotent)."""
        if getattr(self, "renderer", None) is not None:
            self.renderer.close()
            self.renderer = None
        self.close_simulator()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


__all__ = ["CameraRenderer", "EnvLifecycle", "GL_HELP", "RENDER_PROBE", "camera_names", "map_cameras", "import_mujoco", "select_gl_backend"]
