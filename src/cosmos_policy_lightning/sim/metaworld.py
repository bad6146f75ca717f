"""Meta-World (MuJoCo) as a simulator: the :class:`~.env.SimEnv` adapter and its scripted expert.

Used by demonstration collection (:mod:`.collect`) and by closed-loop evaluation (:mod:`.evaluate`, as
``SIMULATORS["metaworld"]``). One :class:`MetaWorldEnv` is one Meta-World v3 task on the Sawyer arm:

- initial states come from ``metaworld.MT1(task, seed=...)`` (50 object/goal placements per seed);
  episode ``i`` starts from placement ``i % 50`` of block ``i // 50`` (see :meth:`MetaWorldEnv.reset`);
- the embodiment's cameras map to MuJoCo cameras by name (:data:`MUJOCO_CAMERAS`: ``wrist`` is
  ``gripperPOV``; a camera named like a MuJoCo camera, e.g. ``corner``, is that camera) and are
  rendered offscreen with ``mujoco.Renderer`` at its ``image_size``, with shadows and reflections off
  (several times faster, and the model does not need them) and anti-aliased by supersampling: rendered at 2x the size without multisampling, then 2x2-averaged
  (as smooth as MuJoCo's 4x MSAA and about twice as fast on a software OpenGL such as llvmpipe);
- an observation is ``{"images": {camera: (H, W, 3) uint8}, "proprio": (4,) float32, "instruction": str}``
  (the :mod:`.env` observation) with proprio =
  hand (tool-centre) position x, y, z in metres (world frame) and the gripper opening in [0, 1]
  (finger distance / 0.1 m, clipped), i.e. ``embodiments/metaworld.yaml``'s proprio;
- actions are 4-d in [-1, 1]: hand displacement dx, dy, dz (x 1 cm per step) and gripper effort
  (+1 closes); the control rate is 80 Hz (2.5 ms MuJoCo step x frame skip 5).

Rendering needs an OpenGL backend without a display (:mod:`.rendering`, shared with the other MuJoCo
simulators: ``MUJOCO_GL`` chosen before MuJoCo is imported; Debian's ``libegl1 libegl-mesa0
libgl1-mesa-dri``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..embodiment import Embodiment, load_embodiment
from ..errors import CosmosPolicyError
from ..shipped import shipped_path
from .env import check_embodiment
from .rendering import CameraRenderer, EnvLifecycle, import_mujoco, map_cameras

#: Embodiment shipped for Meta-World (embodiments/metaworld.yaml; inside the wheel when installed, shipped.py).
DEFAULT_EMBODIMENT = shipped_path("embodiments/metaworld.yaml") or Path("metaworld")

#: Embodiment camera name -> MuJoCo camera of the Meta-World v3 scenes, for names that are not MuJoCo
#: camera names themselves (an embodiment camera called ``corner2`` or ``topview`` is that camera).
MUJOCO_CAMERAS = {"wrist": "gripperPOV"}

#: Quarter turns (np.rot90) that make each Meta-World camera upright: the four ``corner`` cameras of
#: the v3 scenes render upside down.
CAMERA_ROTATIONS = {"topview": 0, "corner": 2, "corner2": 2, "corner3": 2, "corner4": 2,
                    "behindGripper": 0, "gripperPOV": 0}

#: Number of initial states (object / goal placements) that ``metaworld.MT1`` samples per seed.
PLACEMENTS_PER_SEED = 50

#: Meta-World v3's episode limit in steps (``max_path_length`` of every task).
MAX_PATH_LENGTH = 500

#: Instruction text of each task (the language the model is conditioned on).
INSTRUCTIONS = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "put the ball into the basket",
    "bin-picking-v3": "move the cube from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button of the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate into the goal from the side",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate back out of the goal from the side",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the bottle with the stick",
    "stick-pull-v3": "pull the bottle with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "place the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}


def instruction_for(task: str) -> str:
    """Instruction text of a Meta-World task, e.g. ``"drawer-open-v3"`` -> ``"open the drawer"``.

    Unknown names fall back to the task's words (``"new-thing-v3"`` -> ``"new thing"``).
    """
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    words = task.rsplit("-v", 1)[0] if task.rsplit("-v", 1)[-1].isdigit() else task
    return words.replace("-", " ").replace("_", " ").strip()


def _import_sim():
    """Import ``mujoco`` and ``metaworld`` after choosing the GL backend (clear error if absent)."""
    import importlib.util

    missing = [m for m in ("mujoco", "metaworld") if importlib.util.find_spec(m) is None]
    if missing:
        raise CosmosPolicyError(f"Meta-World simulation needs {' and '.join(missing)}: "
                                f"pip install 'cosmos-policy-lightning[sim]'")
    mujoco = import_mujoco()
    import metaworld

    return metaworld, mujoco


def check_task(task: str) -> None:
    """Raise :class:`CosmosPolicyError` unless ``task`` is a Meta-World v3 task with a scripted expert."""
    metaworld, _ = _import_sim()
    from metaworld.policies import ENV_POLICY_MAP

    if task not in metaworld.MT1.ENV_NAMES or task not in ENV_POLICY_MAP:
        raise CosmosPolicyError(f"unknown Meta-World task {task!r}; expected one of "
                                f"{', '.join(sorted(ENV_POLICY_MAP))}")


# ---------------------------------------------------------------------------------------- env
class MetaWorldEnv(EnvLifecycle):
    """One Meta-World v3 task with the embodiment's cameras rendered offscreen; implements :class:`~.env.SimEnv`
    (and its class is the :class:`~.env.Simulator` registered as ``metaworld``).

    Args:
        task: Meta-World v3 task name, e.g. ``"drawer-open-v3"``.
        embodiment: embodiment YAML path (or :class:`Embodiment`): its cameras are rendered (mapped to
            MuJoCo cameras as the module docstring says) at its ``image_size``.
        seed: selects the initial-state placements (``metaworld.MT1(task, seed=seed)``).
        max_steps: truncate episodes after this many steps (at most Meta-World's 500; None = 500).
        supersample: render at ``supersample`` times the image size, then average blocks (1 = off).
        render: False skips the cameras (observations carry ``images == {}``): ~50x faster, for
            measuring the expert or the noise without pictures.
        cameras: embodiment camera name -> MuJoCo camera name, for cameras that neither
            :data:`MUJOCO_CAMERAS` nor their own name map (e.g. ``{"front": "corner2"}``).

    Raises:
        CosmosPolicyError: unknown task, a camera that maps to no MuJoCo camera, missing simulator or
            OpenGL backend.

    Use as a context manager (or call :meth:`close`) to free the renderer's GL context.
    """

    #: The embodiment of the ``expert`` / ``random`` baselines and the task evaluated without ``--tasks``
    #: (:class:`~.env.Simulator`).
    default_embodiment = DEFAULT_EMBODIMENT
    default_task = "drawer-open-v3"
    #: What ``cosmos-policy collect metaworld`` writes and its episode limit (:class:`~.env.Simulator`'s
    #: optional collection attributes): one robomimic file per task; the clean experts need at most ~90
    #: steps on reach / push / drawer-open / button-press and rarely more than 150 on the harder tasks
    #: (docs/metaworld.md), so 150 turns the noisy expert's slow recoveries into failures.
    collect_format = "robomimic"
    collect_max_steps = 150
    #: The robomimic proprio datasets, in order, and their widths (``embodiments/metaworld.yaml``'s keys).
    proprio_parts = {"hand_pos": 3, "gripper_opening": 1}
    #: Distributions whose versions a collected file records.
    packages = ("metaworld", "mujoco")

    def __init__(self, task: str, embodiment: str | Path | Embodiment = DEFAULT_EMBODIMENT, seed: int = 0,
                 max_steps: int | None = None, supersample: int = 2, render: bool = True,
                 cameras: Mapping[str, str] | None = None):
        self.metaworld, self.mujoco = _import_sim()
        check_task(task)
        self.task = task
        self.instruction = instruction_for(task)
        self.embodiment = load_embodiment(embodiment)
        self.check_embodiment(self.embodiment)
        self.seed = int(seed)
        self.image_size = tuple(self.embodiment.image_size)
        self._benchmarks: dict[int, Any] = {}
        bench = self._benchmark(0)
        self.env = bench.train_classes[task]()
        self.env.set_task(bench.train_tasks[0])
        limit = int(self.env.max_path_length)
        self.max_steps = limit if max_steps is None else int(max_steps)
        if not 1 <= self.max_steps <= limit:
            raise CosmosPolicyError(f"max_steps must be in [1, {limit}] for {task}, got {max_steps}")

        # Embodiment camera name -> MuJoCo camera name (SimEnv.cameras), and the quarter turns of each.
        model = self.env.model
        self.cameras = map_cameras(self.embodiment, model, MUJOCO_CAMERAS, cameras)
        self._turns = {name: CAMERA_ROTATIONS.get(mj_name, 0) for name, mj_name in self.cameras.items()}
        #: Meta-World's actions: dx, dy, dz, gripper effort, each in [-1, 1] (SimEnv.action_bounds).
        self.action_bounds = (np.full(4, -1.0, dtype=np.float32), np.full(4, 1.0, dtype=np.float32))
        self.state: np.ndarray | None = None  # Meta-World's 39-d state vector (the expert's input)
        self.steps = 0
        self.success = False  # SimEnv.success: Meta-World's info["success"] of the last step
        self._expert: ScriptedExpert | None = None
        self.renderer = CameraRenderer(model, self.cameras, self.image_size, supersample, self._turns) \
            if render else None

    # -------------------------------------------------------------- Simulator (class level)
    @classmethod
    def create(cls, task: str, embodiment: str | Path | Embodiment, *, seed: int, max_steps: int,
               render: bool) -> "MetaWorldEnv":
        """The evaluator's factory (:class:`~.env.Simulator`): ``max_steps`` above Meta-World's 500 is capped."""
        return cls(task, embodiment, seed=seed, max_steps=min(int(max_steps), MAX_PATH_LENGTH), render=render)

    @staticmethod
    def check_embodiment(embodiment: Embodiment) -> None:
        """Refuse another robot's embodiment (e.g. a checkpoint's) in one line: 4-d proprio and actions."""
        check_embodiment(embodiment, "metaworld", proprio_dim=4, action_dim=4, hint="embodiments/metaworld.yaml")

    @staticmethod
    def check_task(task: str) -> None:
        """:func:`check_task` (also picks the OpenGL backend): raise unless ``task`` is a Meta-World v3 task."""
        check_task(task)

    # -------------------------------------------------------------- initial states
    def _benchmark(self, block: int):
        """``metaworld.MT1`` holding placements ``50 * block ...``: seed ``seed`` for block 0, then a
        seed derived from (seed, block) so that blocks never repeat placements of another seed's block 0."""
        if block not in self._benchmarks:
            mt_seed = self.seed if block == 0 else int(np.random.SeedSequence([self.seed, block]).generate_state(1)[0])
            self._benchmarks[block] = self.metaworld.MT1(self.task, seed=mt_seed)
        return self._benchmarks[block]

    def reset(self, episode: int = 0) -> dict[str, Any]:
        """Start an episode from initial state number ``episode`` (deterministic for the env's seed).

        Returns:
            the first observation (see the module docstring).
        """
        if episode < 0:
            raise CosmosPolicyError(f"episode index must be >= 0, got {episode}")
        block, index = divmod(int(episode), PLACEMENTS_PER_SEED)
        self.env.set_task(self._benchmark(block).train_tasks[index])
        self.state, _ = self.env.reset()
        self.steps = 0
        self.success = False
        return self.observation()

    # -------------------------------------------------------------- observation / step
    def render(self) -> dict[str, np.ndarray]:
        """Render every camera of the embodiment: ``{camera: (H, W, 3) uint8}``, upright (``{}`` when
        the env was built with ``render=False``)."""
        return {} if self.renderer is None else self.renderer.render(self.env.data)

    def proprio(self) -> np.ndarray:
        """``(4,)`` float32: hand x, y, z (m) and gripper opening in [0, 1]."""
        if self.state is None:
            raise CosmosPolicyError("MetaWorldEnv: call reset() before reading observations")
        return np.asarray(self.state[:4], dtype=np.float32)

    def observation(self) -> dict[str, Any]:
        """``{"images": {camera: (H, W, 3) uint8}, "proprio": (4,) float32, "instruction": str}`` now."""
        return {"images": self.render(), "proprio": self.proprio(), "instruction": self.instruction}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Apply one action.

        Args:
            action: ``(4,)`` in [-1, 1] (clipped): dx, dy, dz, gripper effort.

        Returns:
            ``(observation, reward, success, truncated, info)``: Meta-World's shaped reward in [0, 10],
            ``info["success"]`` as a bool, ``truncated`` once ``max_steps`` steps were taken, and
            Meta-World's info dict.

        Raises:
            CosmosPolicyError: wrong action shape, non-finite action, or stepping a finished episode.
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (4,) or not np.isfinite(action).all():
            raise CosmosPolicyError(f"{self.task}: expected a finite action of shape (4,), got {action}")
        if self.state is None or self.steps >= self.max_steps:
            raise CosmosPolicyError(f"{self.task}: reset() the environment before stepping "
                                    f"(episode finished after {self.steps} steps)")
        self.state, reward, _, _, info = self.env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        self.steps += 1
        self.success = bool(info.get("success", False))
        return self.observation(), float(reward), self.success, self.steps >= self.max_steps, info

    def expert_policy(self) -> "ScriptedExpert":
        """The task's scripted expert, bound to this environment."""
        return ScriptedExpert(self)

    def expert(self) -> np.ndarray:
        """The scripted expert's ``(4,)`` float32 action in [-1, 1] for the current state (:class:`~.env.SimEnv`)."""
        if self._expert is None:
            self._expert = ScriptedExpert(self)
        return self._expert()

    # -------------------------------------------------------------- cleanup
    def close_simulator(self) -> None:
        """Free Meta-World's env (:meth:`close` frees the renderer first)."""
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None


class ScriptedExpert:
    """Meta-World's hand-written expert (``metaworld.policies``) for the task of ``env``.

    Calling it returns the expert's action ``(4,)`` float32 in [-1, 1] for the env's current state.
    It reads the privileged 39-d simulator state (object and goal positions), which is why it can
    solve the task; the learned policy sees only images and proprio.
    """

    def __init__(self, env: MetaWorldEnv):
        from metaworld.policies import ENV_POLICY_MAP

        self.env = env
        self.policy = ENV_POLICY_MAP[env.task]()

    def __call__(self) -> np.ndarray:
        if self.env.state is None:
            raise CosmosPolicyError("ScriptedExpert: reset() the environment first")
        with warnings.catch_warnings():
            # The experts use gains above 1 on purpose and warn every step; the env clips anyway.
            warnings.simplefilter("ignore", UserWarning)
            action = self.policy.get_action(self.env.state)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
