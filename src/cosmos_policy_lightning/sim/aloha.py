"""The ALOHA simulation (bimanual ViperX 300s, ACT: Zhao et al., 2023) as a simulator of the framework.

Registered as ``aloha`` in :data:`~.env.SIMULATORS`; one :class:`AlohaEnv` is one task of the joint-space
ALOHA simulation packaged as ``gym-aloha`` (its MuJoCo models, meshes and task rewards; dm_control
physics), driven through the :class:`~.env.SimEnv` protocol:

- tasks: ``transfer_cube`` (the right arm picks up the cube and hands it to the left arm) and
  ``insertion`` (the right arm picks up the peg, the left arm the socket, peg into socket);
- initial states: episode ``i`` of seed ``s`` places the objects with gym-aloha's own samplers
  (``sample_box_pose`` / ``sample_insertion_pose``: cube x in [0, 0.2] m, y in [0.4, 0.6] m; peg x in
  [0.1, 0.2], socket x in [-0.2, -0.1]) seeded with ``SeedSequence([s, i])``: the same (seed, episode)
  always gives the same placement, and another seed gives other placements (evaluate on unseen ones);
- observation (the :mod:`.env` observation): the embodiment's cameras (MuJoCo cameras ``top``,
  ``left_wrist``, ``right_wrist``, ``angle``, ...; the reference's ``cam_high`` / ``cam_left_wrist`` /
  ``cam_right_wrist`` names map to them, :data:`MUJOCO_CAMERAS`) rendered offscreen at the embodiment's
  image size by :class:`~.rendering.CameraRenderer` (gym-aloha's own task renders three 480x640 images at
  every step, which is most of its cost; here the task renders nothing), and proprio = gym-aloha's 14-d
  ``qpos``: per arm 6 joint angles (rad) then the gripper opening normalised to [0 closed, 1 open];
- actions: 14-d absolute joint-position targets in the same order and units (the gripper as a normalised
  opening), at 50 Hz (``DT`` = 0.02 s, 10 physics steps of 2 ms); bounds = the position actuators'
  control ranges, [0, 1] for the grippers;
- success: the task's own reward reaches its maximum (4): for transfer, the cube touches the left
  gripper and not the table; for insertion, the peg touches the socket's pin. The reward is the stage
  reached (0..4, gym-aloha's ``get_reward``), and ``info["success_score"]`` = the highest stage so far / 4
  (partial progress, as the reference ALOHA evaluation records it);
- expert: :class:`ScriptedExpert`, ACT's waypoint plans (``scripted_policy.py``'s pick-and-transfer and
  insertion policies) turned into joint targets by inverse kinematics (:class:`GripperIK`), so it runs in
  this MuJoCo 3 joint-space env. ACT drives an end-effector variant whose grippers follow mocap bodies
  through a weld constraint and replays the recorded joints; under MuJoCo 3 that replay fails (ACT issues
  #37, #45). The plans' targets are the mocap poses; the weld's relative pose (from gym-aloha's
  end-effector model, compiled) maps them to gripper-link poses, and each arm's first waypoint is the
  mocap pose that matches the start pose (the original starts the mocap 13 cm away from it).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..embodiment import Embodiment, load_embodiment
from ..errors import CosmosPolicyError
from ..shipped import shipped_path
from .env import check_embodiment
from .rendering import CameraRenderer, EnvLifecycle, import_mujoco, map_cameras

#: Embodiment shipped for the ALOHA simulation (embodiments/aloha_sim.yaml).
DEFAULT_EMBODIMENT = shipped_path("embodiments/aloha_sim.yaml") or Path("aloha_sim")

#: Embodiment camera name -> MuJoCo camera of gym-aloha's scenes, for names that are not MuJoCo camera
#: names themselves: the reference ALOHA embodiment's names (embodiments/aloha.yaml).
MUJOCO_CAMERAS = {"cam_high": "top", "cam_left_wrist": "left_wrist", "cam_right_wrist": "right_wrist"}

#: Episode length of ACT's simulated tasks (``episode_len`` 400 for both; the scripted plans end at 400).
EPISODE_STEPS = 400

#: The arms' joints in action / proprio order (gym-aloha's JOINTS: 6 arm joints, then the gripper).
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
SIDES = ("left", "right")


@dataclass(frozen=True)
class AlohaTask:
    """One simulated ALOHA task: gym-aloha's model file, its number of free objects and its instruction."""

    xml: str
    task_class: str       # gym-aloha's dm_control task in gym_aloha.tasks.sim (reward, initial state)
    objects: int
    instruction: str


TASKS = {
    "transfer_cube": AlohaTask("bimanual_viperx_transfer_cube.xml", "TransferCubeTask", 1,
                               "pick up the red cube with the right arm and hand it over to the left arm"),
    "insertion": AlohaTask("bimanual_viperx_insertion.xml", "InsertionTask", 2,
                           "pick up the peg and the socket and insert the peg into the socket"),
}


def _import_aloha():
    """Import gym-aloha's pieces after choosing the GL backend (one-line error when it is missing)."""
    missing = [m for m in ("gym_aloha", "dm_control") if importlib.util.find_spec(m) is None]
    if missing:
        raise CosmosPolicyError(f"the ALOHA simulation needs {' and '.join(missing)}: "
                                f"pip install 'cosmos-policy-lightning[sim]'")
    import_mujoco()
    from dm_control import mujoco as dm_mujoco
    from dm_control.rl import control
    from gym_aloha import constants, utils
    from gym_aloha.tasks import sim

    return dm_mujoco, control, constants, utils, sim


def check_task(task: str) -> None:
    """Raise :class:`CosmosPolicyError` unless ``task`` is an ALOHA task and the simulation imports."""
    if task not in TASKS:
        raise CosmosPolicyError(f"unknown ALOHA task {task!r}; expected one of {', '.join(TASKS)}")
    _import_aloha()


def placement_seed(seed: int, episode: int) -> int:
    """The gym-aloha sampler seed of episode ``episode`` under construction seed ``seed`` (32-bit)."""
    return int(np.random.SeedSequence([int(seed), int(episode)]).generate_state(1)[0])


@functools.lru_cache(maxsize=None)
def _weld_relpose() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per arm, the gripper link's pose relative to its mocap body in gym-aloha's end-effector model:
    ``(position (3,) m, quaternion (4,) wxyz)``, as MuJoCo compiles the weld (pose at ``qpos0``)."""
    mujoco = import_mujoco()
    _, _, constants, _, _ = _import_aloha()
    model = mujoco.MjModel.from_xml_path(str(constants.ASSETS_DIR / "bimanual_viperx_end_effector_transfer_cube.xml"))
    out = {}
    for i in range(model.neq):
        body2 = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, int(model.eq_obj2id[i]))
        for side in SIDES:
            if body2 == f"vx300s_{side}/gripper_link":
                out[side] = (model.eq_data[i, 3:6].copy(), model.eq_data[i, 6:10].copy())
    if set(out) != set(SIDES):
        raise CosmosPolicyError(f"gym-aloha's end-effector model has no weld to both gripper links (found {sorted(out)})")
    return out


# ---------------------------------------------------------------------------------------- quaternions
def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mujoco = import_mujoco()
    out = np.zeros(4)
    mujoco.mju_mulQuat(out, np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return out


def _quat_axis(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    mujoco = import_mujoco()
    out = np.zeros(4)
    mujoco.mju_axisAngle2Quat(out, np.asarray(axis, dtype=np.float64), np.deg2rad(degrees))
    return out


def _quat_conj(q: np.ndarray) -> np.ndarray:
    return np.array([q[0], -q[1], -q[2], -q[3]])


def _rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    mujoco = import_mujoco()
    out = np.zeros(3)
    mujoco.mju_rotVecQuat(out, np.asarray(v, dtype=np.float64), np.asarray(q, dtype=np.float64))
    return out


# ---------------------------------------------------------------------------------------- inverse kinematics
class GripperIK:
    """Damped least-squares inverse kinematics of one arm's gripper-link pose on a scratch ``MjData``.

    Solves for the 6 arm joints of ``side`` so that the body ``vx300s_<side>/gripper_link`` reaches a
    world pose; the step is ``dq = J^T (J J^T + lambda I)^-1 e`` with ``e`` the 6-d position (m) and
    rotation-vector (rad) error and ``J`` MuJoCo's body Jacobian (``mj_jacBody``), joints clipped to their
    ranges; warm-started from the previous solution, so a smooth target path gives a smooth joint path.

    Of the wrist's two branches (``(roll, angle, rotate)`` and ``(roll -+ pi, -angle, rotate -+ pi)`` give
    the same gripper pose), the one with ``|forearm roll| < FLIP_ROLL`` is kept: a solution past it is
    solved again from its flipped twin. Why: the plans' paths cross the wrist singularity (wrist angle 0,
    where forearm roll and wrist rotation turn about one axis) and the solver left it on either branch
    (right-arm roll about +2.8 or -2.8 rad at the grasp, by the sign of a small difference in the cube's
    position), so neighbouring placements got joint paths almost pi apart in two joints: demonstrations
    that a policy learns as their average, which reaches neither.

    Args:
        model: the joint-space ``mujoco.MjModel`` (not modified).
        damping: lambda, in m^2 / rad^2.
        iterations: at most this many steps per solve.
        tolerance: stop once the error norm is below this.
    """

    def __init__(self, model, damping: float = 1e-3, iterations: int = 30, tolerance: float = 1e-5):
        self.mujoco = import_mujoco()
        self.model, self.data = model, self.mujoco.MjData(model)
        self.damping, self.iterations, self.tolerance = float(damping), int(iterations), float(tolerance)
        obj = self.mujoco.mjtObj
        self.body = {s: self.mujoco.mj_name2id(model, obj.mjOBJ_BODY, f"vx300s_{s}/gripper_link") for s in SIDES}
        joints = {s: [self.mujoco.mj_name2id(model, obj.mjOBJ_JOINT, f"vx300s_{s}/{j}") for j in ARM_JOINTS]
                  for s in SIDES}
        self.qpos_index = {s: model.jnt_qposadr[joints[s]].copy() for s in SIDES}
        self.dof_index = {s: model.jnt_dofadr[joints[s]].copy() for s in SIDES}
        self.low = {s: model.jnt_range[joints[s], 0].copy() for s in SIDES}
        self.high = {s: model.jnt_range[joints[s], 1].copy() for s in SIDES}
        self._jp, self._jr = np.zeros((3, model.nv)), np.zeros((3, model.nv))

    def forward(self, side: str, arm_qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gripper-link world pose ``(position (3,), quaternion (4,))`` for the arm's 6 joint angles."""
        self.data.qpos[self.qpos_index[side]] = arm_qpos
        self.mujoco.mj_kinematics(self.model, self.data)
        b = self.body[side]
        return self.data.xpos[b].copy(), self.data.xquat[b].copy()

    #: forearm roll (rad) beyond which the flipped wrist branch is tried (the left arm's hand-over pose
    #: holds 1.57, the right arm's flipped grasp 2.4-3.1)
    FLIP_ROLL = 2.0

    def solve(self, side: str, start: np.ndarray, position: np.ndarray, quat: np.ndarray) -> tuple[np.ndarray, float]:
        """Joint angles ``(6,)`` (rad) reaching the pose, from ``start``, on the unflipped wrist branch
        where it reaches the pose as closely; returns them and the final error norm."""
        q, error = self._solve(side, start, position, quat)
        roll, angle, rotate = (ARM_JOINTS.index(j) for j in ("forearm_roll", "wrist_angle", "wrist_rotate"))
        if abs(q[roll]) > self.FLIP_ROLL:
            twin = q.copy()
            twin[roll] -= np.sign(q[roll]) * np.pi
            twin[angle] = -q[angle]
            twin[rotate] -= np.sign(q[rotate]) * np.pi
            q2, error2 = self._solve(side, twin, position, quat)
            if abs(q2[roll]) <= self.FLIP_ROLL and error2 <= max(error, 10 * self.tolerance):
                return q2, error2
        return q, error

    def _solve(self, side: str, start: np.ndarray, position: np.ndarray, quat: np.ndarray) -> tuple[np.ndarray, float]:
        q = np.asarray(start, dtype=np.float64).copy()
        err = np.zeros(6)
        for _ in range(self.iterations):
            pos, cur = self.forward(side, q)
            err[:3] = position - pos
            dq = _quat_mul(quat, _quat_conj(cur))
            if dq[0] < 0:  # the short way round
                dq = -dq
            self.mujoco.mju_quat2Vel(err[3:], dq, 1.0)
            if np.linalg.norm(err) < self.tolerance:
                break
            self.mujoco.mj_comPos(self.model, self.data)
            self.mujoco.mj_jacBody(self.model, self.data, self._jp, self._jr, self.body[side])
            jac = np.vstack([self._jp, self._jr])[:, self.dof_index[side]]
            step = jac.T @ np.linalg.solve(jac @ jac.T + self.damping * np.eye(6), err)
            q = np.clip(q + step, self.low[side], self.high[side])
        return q, float(np.linalg.norm(err))


# ---------------------------------------------------------------------------------------- scripted expert
def _waypoint(t: int, xyz, quat, gripper: float) -> dict[str, Any]:
    return {"t": t, "xyz": np.asarray(xyz, dtype=np.float64), "quat": np.asarray(quat, dtype=np.float64),
            "gripper": float(gripper)}


def transfer_cube_plan(start: dict[str, tuple[np.ndarray, np.ndarray]], objects: np.ndarray) -> dict[str, list]:
    """ACT's pick-and-transfer waypoints (mocap poses, gripper opening in [0, 1]) per arm.

    Args:
        start: per arm, the mocap pose ``(xyz, quat)`` matching the start joint pose.
        objects: gym-aloha's ``env_state`` (the cube's free-joint qpos: xyz then quat).
    """
    box = np.asarray(objects[:3], dtype=np.float64)
    pick = _quat_axis((0, 1, 0), -60)           # the right gripper pitched down 60 degrees
    meet_left = _quat_axis((1, 0, 0), 90)       # the left gripper rolled 90 degrees to take the cube
    meet = np.array([0.0, 0.5, 0.25])
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    left = [_waypoint(0, *start["left"], 0),
            _waypoint(100, meet + [-0.1, 0, -0.02], meet_left, 1),    # approach the meeting point
            _waypoint(260, meet + [0.02, 0, -0.02], meet_left, 1),    # reach it
            _waypoint(310, meet + [0.02, 0, -0.02], meet_left, 0),    # close the gripper
            _waypoint(360, meet + [-0.1, 0, -0.02], identity, 0),     # move left
            _waypoint(400, meet + [-0.1, 0, -0.02], identity, 0)]     # stay
    right = [_waypoint(0, *start["right"], 0),
             _waypoint(90, box + [0, 0, 0.08], pick, 1),              # above the cube
             _waypoint(130, box + [0, 0, -0.015], pick, 1),           # down
             _waypoint(170, box + [0, 0, -0.015], pick, 0),           # close the gripper
             _waypoint(200, meet + [0.05, 0, 0], pick, 0),            # approach the meeting point
             _waypoint(220, meet, pick, 0),                           # reach it
             _waypoint(310, meet, pick, 1),                           # open the gripper
             _waypoint(360, meet + [0.1, 0, 0], pick, 1),             # move right
             _waypoint(400, meet + [0.1, 0, 0], pick, 1)]             # stay
    return {"left": left, "right": right}


def insertion_plan(start: dict[str, tuple[np.ndarray, np.ndarray]], objects: np.ndarray) -> dict[str, list]:
    """ACT's insertion waypoints per arm (``objects``: peg qpos (7) then socket qpos (7))."""
    peg, socket = np.asarray(objects[:3], dtype=np.float64), np.asarray(objects[7:10], dtype=np.float64)
    pick_right, pick_left = _quat_axis((0, 1, 0), -60), _quat_axis((0, 1, 0), 60)
    meet, lift_right = np.array([0.0, 0.5, 0.15]), 0.00715
    left = [_waypoint(0, *start["left"], 0),
            _waypoint(120, socket + [0, 0, 0.08], pick_left, 1),      # above the socket
            _waypoint(170, socket + [0, 0, -0.03], pick_left, 1),     # down
            _waypoint(220, socket + [0, 0, -0.03], pick_left, 0),     # close the gripper
            _waypoint(285, meet + [-0.1, 0, 0], pick_left, 0),        # approach the meeting point
            _waypoint(340, meet + [-0.05, 0, 0], pick_left, 0),       # insertion
            _waypoint(400, meet + [-0.05, 0, 0], pick_left, 0)]       # stay
    right = [_waypoint(0, *start["right"], 0),
             _waypoint(120, peg + [0, 0, 0.08], pick_right, 1),
             _waypoint(170, peg + [0, 0, -0.03], pick_right, 1),
             _waypoint(220, peg + [0, 0, -0.03], pick_right, 0),
             _waypoint(285, meet + [0.1, 0, lift_right], pick_right, 0),
             _waypoint(340, meet + [0.05, 0, lift_right], pick_right, 0),
             _waypoint(400, meet + [0.05, 0, lift_right], pick_right, 0)]
    return {"left": left, "right": right}


PLANS = {"transfer_cube": transfer_cube_plan, "insertion": insertion_plan}


def interpolate(waypoints: list[dict[str, Any]], t: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The plan at step ``t``: linear in position, quaternion (normalised) and gripper between waypoints
    (as ACT's scripted policies interpolate); after the last waypoint, the last one."""
    for a, b in zip(waypoints[:-1], waypoints[1:]):
        if a["t"] <= t <= b["t"]:
            f = (t - a["t"]) / (b["t"] - a["t"])
            quat = a["quat"] + f * (b["quat"] - a["quat"])
            return (a["xyz"] + f * (b["xyz"] - a["xyz"]), quat / np.linalg.norm(quat),
                    a["gripper"] + f * (b["gripper"] - a["gripper"]))
    last = waypoints[-1]
    return last["xyz"], last["quat"], last["gripper"]


class ScriptedExpert:
    """ACT's scripted policy of an ALOHA task as joint-position actions (module docstring).

    The plan is made at :meth:`reset` from the objects' initial poses (privileged state) and is open
    loop in time, like ACT's: the action for step ``t`` is the IK solution of the plan's pose at ``t``,
    warm-started from the solution of step ``t - 1`` (never from the measured joints, so the same
    placement always gives the same actions, noise or not).

    Args:
        task: ``transfer_cube`` or ``insertion``.
        model: the joint-space ``mujoco.MjModel``.
        start_qpos: the 14-d start pose (gym-aloha's ``START_ARM_POSE`` without the second finger joints).
    """

    def __init__(self, task: str, model, start_qpos: np.ndarray):
        self.task, self.ik = task, GripperIK(model)
        self.start = {"left": np.asarray(start_qpos[:6], dtype=np.float64),
                      "right": np.asarray(start_qpos[7:13], dtype=np.float64)}
        relpose = _weld_relpose()
        self._relpose = relpose
        # The mocap pose that the weld would hold at the start pose: gripper pose (x) inverse(relpose).
        self.start_mocap = {}
        for side in SIDES:
            gpos, gquat = self.ik.forward(side, self.start[side])
            rpos, rquat = relpose[side]
            mquat = _quat_mul(gquat, _quat_conj(rquat))
            self.start_mocap[side] = (gpos - _rotate(mquat, rpos), mquat)
        self.plan: dict[str, list] | None = None
        self.worst_error = 0.0

    def reset(self, objects: np.ndarray) -> None:
        """Plan for the objects' poses (gym-aloha ``env_state``).

        Each arm's first segment (start pose to the plan's first waypoint) is interpolated in joint space,
        to that waypoint's IK solution found from the start pose with the wrist angle mirrored positive
        (the unflipped branch of the plans' downward-pitched grippers). Why: the Cartesian path of that
        segment passes close to the wrist singularity, where IK turns the forearm roll by up to pi within
        a few steps, at a moment that depends on the placement; the joint-space segment is smooth and a
        smooth function of the placement, which is what a policy can learn.
        """
        self.plan = PLANS[self.task](self.start_mocap, objects)
        self._q = {side: self.start[side].copy() for side in SIDES}
        self.worst_error = 0.0
        self._approach = {}
        angle = ARM_JOINTS.index("wrist_angle")
        for side in SIDES:
            first = self.plan[side][1]
            seed = self.start[side].copy()
            seed[angle] = abs(seed[angle])
            q, error = self.ik.solve(side, seed, *self._gripper_pose(side, first["xyz"], first["quat"]))
            self.worst_error = max(self.worst_error, error)
            self._approach[side] = (first["t"], q)

    def _gripper_pose(self, side: str, xyz: np.ndarray, mquat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mocap pose -> gripper-link pose through the weld's relative pose."""
        rpos, rquat = self._relpose[side]
        return xyz + _rotate(mquat, rpos), _quat_mul(mquat, rquat)

    def __call__(self, t: int) -> np.ndarray:
        """The ``(14,)`` float32 action of step ``t``: per arm 6 joint targets (rad), gripper opening [0, 1]."""
        if self.plan is None:
            raise CosmosPolicyError("ALOHA expert: reset() the environment first")
        out = []
        for side in SIDES:
            xyz, mquat, gripper = interpolate(self.plan[side], t)
            t_first, q_first = self._approach[side]
            if t <= t_first:  # the joint-space first segment (reset)
                self._q[side] = self.start[side] + (t / t_first) * (q_first - self.start[side])
            else:
                self._q[side], error = self.ik.solve(side, self._q[side], *self._gripper_pose(side, xyz, mquat))
                self.worst_error = max(self.worst_error, error)
            out.extend([*self._q[side], gripper])
        return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------- env
class AlohaEnv(EnvLifecycle):
    """One ALOHA task with the embodiment's cameras rendered offscreen; implements :class:`~.env.SimEnv`
    (its class is the :class:`~.env.Simulator` registered as ``aloha``).

    Args:
        task: ``transfer_cube`` or ``insertion``.
        embodiment: embodiment YAML path, shipped name or :class:`Embodiment`: 14-d proprio and actions;
            its cameras are rendered (mapped as the module docstring says) at its ``image_size``.
        seed: selects the initial placements (module docstring).
        max_steps: truncate episodes after this many steps (None = :data:`EPISODE_STEPS`; more is allowed
            here, the evaluator's :meth:`create` caps it at :data:`EPISODE_STEPS`).
        supersample: render at this many times the image size, then average blocks (1 = off).
        render: False skips the cameras (``images == {}``): for the expert and noise without pictures.
        cameras: embodiment camera name -> MuJoCo camera name, for cameras the defaults do not map.

    Raises:
        CosmosPolicyError: unknown task, an embodiment of another robot (dims or cameras), a missing
            simulator or OpenGL backend.
    """

    default_embodiment = DEFAULT_EMBODIMENT
    default_task = "transfer_cube"
    #: ``evaluate aloha``'s step limit unless ``--max_steps`` says otherwise: ACT's whole episode.
    default_max_steps = EPISODE_STEPS
    #: What ``cosmos-policy collect aloha`` writes: ACT's per-episode HDF5 (``convert --format episode_hdf5``).
    collect_format = "episode_hdf5"
    #: Packages whose versions collected files record.
    packages = ("gym-aloha", "dm_control", "mujoco")

    def __init__(self, task: str, embodiment: str | Path | Embodiment = DEFAULT_EMBODIMENT, seed: int = 0,
                 max_steps: int | None = None, supersample: int = 2, render: bool = True,
                 cameras: dict[str, str] | None = None):
        check_task(task)
        self.mujoco = import_mujoco()
        dm_mujoco, control, constants, self._utils, self._sim = _import_aloha()
        self.task, self.spec = task, TASKS[task]
        self.instruction = self.spec.instruction
        self.embodiment = load_embodiment(embodiment)
        self.check_embodiment(self.embodiment)
        self.seed = int(seed)
        self.max_steps = EPISODE_STEPS if max_steps is None else int(max_steps)
        if self.max_steps < 1:
            raise CosmosPolicyError(f"max_steps must be >= 1 for {task}, got {max_steps}")
        self.physics = dm_mujoco.Physics.from_xml_path(str(constants.ASSETS_DIR / self.spec.xml))
        self._task = _quiet_task(getattr(self._sim, self.spec.task_class))()
        # dm_control's loop: control step DT (50 Hz) of 10 physics steps; no time limit (max_steps is ours).
        self.env = control.Environment(self.physics, self._task, float("inf"), control_timestep=constants.DT,
                                       n_sub_steps=None, flat_observation=False)
        model = self.physics.model.ptr
        self.cameras = map_cameras(self.embodiment, model, MUJOCO_CAMERAS, cameras)
        # Bounds: the arm joints' position-actuator control ranges; the grippers' normalised opening [0, 1].
        ranges = self.physics.model.actuator_ctrlrange
        arm = [ranges[i] for i in range(6)] + [(0.0, 1.0)] + [ranges[i] for i in range(8, 14)] + [(0.0, 1.0)]
        self.action_bounds = (np.array([r[0] for r in arm], dtype=np.float32),
                              np.array([r[1] for r in arm], dtype=np.float32))
        start = np.asarray(constants.START_ARM_POSE, dtype=np.float64)  # 16 joints: each arm 6 + 2 fingers
        self.start_qpos = np.concatenate([start[:6], [0.0], start[8:14], [0.0]])  # the IK reads the arm joints only
        self.renderer = CameraRenderer(model, self.cameras, tuple(self.embodiment.image_size), supersample) \
            if render else None
        self._expert: ScriptedExpert | None = None
        self.objects: np.ndarray | None = None
        self.last_observation: dict[str, Any] | None = None
        self.steps, self.stage, self.best_stage = 0, 0, 0
        self.success = False

    # -------------------------------------------------------------- Simulator (class level)
    @classmethod
    def create(cls, task: str, embodiment: str | Path | Embodiment, *, seed: int, max_steps: int,
               render: bool) -> "AlohaEnv":
        """The evaluator's factory (:class:`~.env.Simulator`): ``max_steps`` above ACT's 400 is capped."""
        return cls(task, embodiment, seed=seed, max_steps=min(int(max_steps), EPISODE_STEPS), render=render)

    @staticmethod
    def check_embodiment(embodiment: Embodiment) -> None:
        """Refuse another robot's embodiment (e.g. a checkpoint's) in one line: 14-d proprio and actions."""
        check_embodiment(embodiment, "aloha", proprio_dim=14, action_dim=14, hint="embodiments/aloha_sim.yaml")

    @staticmethod
    def check_task(task: str) -> None:
        """:func:`check_task`: raise unless ``task`` is an ALOHA task and the simulation imports."""
        check_task(task)

    # -------------------------------------------------------------- episode
    def reset(self, episode: int = 0) -> dict[str, Any]:
        """Start an episode from placement number ``episode`` of the env's seed; returns the first observation."""
        if episode < 0:
            raise CosmosPolicyError(f"episode index must be >= 0, got {episode}")
        rng_seed = placement_seed(self.seed, episode)
        if self.spec.objects == 1:
            pose = self._utils.sample_box_pose(rng_seed)
        else:
            pose = np.concatenate(self._utils.sample_insertion_pose(rng_seed))
        self._sim.BOX_POSE[0] = pose  # gym-aloha's tasks read their initial object poses from this global
        self.env.reset()
        self.objects = np.asarray(self._task.get_env_state(self.physics), dtype=np.float64)
        self.steps, self.stage, self.best_stage = 0, 0, 0
        self.success = False
        if self._expert is not None:
            self._expert.reset(self.objects)
        self.last_observation = self.observation()
        return self.last_observation

    def proprio(self) -> np.ndarray:
        """``(14,)`` float32: per arm 6 joint angles (rad) and the gripper opening in [0, 1]."""
        return np.asarray(self._task.get_qpos(self.physics), dtype=np.float32)

    def observation(self) -> dict[str, Any]:
        """``{"images": {camera: (H, W, 3) uint8}, "proprio": (14,) float32, "instruction": str}`` now."""
        images = self.renderer.render(self.physics.data.ptr) if self.renderer is not None else {}
        return {"images": images, "proprio": self.proprio(), "instruction": self.instruction}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Apply one ``(14,)`` joint-position action (clipped to :attr:`action_bounds`).

        Returns:
            ``(observation, reward, success, truncated, info)``: the reward is the stage reached (0..4),
            success = stage 4, ``info = {"stage", "success_score"}`` (best stage so far / 4). When the
            physics diverges (dm_control's PhysicsError, e.g. under random full-range actions) the episode
            ends there: truncated, not a success, the previous observation, ``info["physics_error"]``.

        Raises:
            CosmosPolicyError: wrong shape, non-finite action, or stepping a finished episode.
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (14,) or not np.isfinite(action).all():
            raise CosmosPolicyError(f"{self.task}: expected a finite action of shape (14,), got {action}")
        if self.objects is None or self.steps >= self.max_steps:
            raise CosmosPolicyError(f"{self.task}: reset() the environment before stepping "
                                    f"(episode finished after {self.steps} steps)")
        from dm_control.rl.control import PhysicsError

        self.steps += 1
        try:
            timestep = self.env.step(np.clip(action, *self.action_bounds))
        except PhysicsError as err:
            # The simulation diverged (e.g. a random policy's full-range joint jumps: mjWARN_BADQACC). The
            # episode ends here as a failure at its current stage instead of taking the evaluation down.
            self.success = False
            info = {"stage": self.stage, "success_score": self.best_stage / self._task.max_reward,
                    "physics_error": str(err).splitlines()[0]}
            self.steps = self.max_steps  # nothing more to step: reset() first
            return self.last_observation, float(self.stage), False, True, info
        self.stage = int(timestep.reward or 0)
        self.best_stage = max(self.best_stage, self.stage)
        self.success = self.stage >= self._task.max_reward
        info = {"stage": self.stage, "success_score": self.best_stage / self._task.max_reward}
        self.last_observation = self.observation()
        return self.last_observation, float(self.stage), self.success, self.steps >= self.max_steps, info

    def expert(self) -> np.ndarray:
        """The scripted expert's ``(14,)`` float32 action for the current step (:class:`~.env.SimEnv`)."""
        if self.objects is None:
            raise CosmosPolicyError(f"{self.task}: reset() the environment before asking the expert")
        if self._expert is None:
            self._expert = ScriptedExpert(self.task, self.physics.model.ptr, self.start_qpos)
            self._expert.reset(self.objects)
        return self._expert(self.steps)


@functools.lru_cache(maxsize=None)
def _quiet_task(base: type) -> type:
    """gym-aloha's task class without its observation renders (three 480x640 images at every step):
    the adapter renders the embodiment's cameras itself, at the embodiment's size."""

    class Quiet(base):
        def get_observation(self, physics):
            return {"qpos": self.get_qpos(physics)}

    Quiet.__name__ = f"Quiet{base.__name__}"
    return Quiet


__all__ = ["AlohaEnv", "DEFAULT_EMBODIMENT", "EPISODE_STEPS", "GripperIK", "MUJOCO_CAMERAS", "ScriptedExpert",
           "TASKS", "check_task", "insertion_plan", "interpolate", "placement_seed", "transfer_cube_plan"]
