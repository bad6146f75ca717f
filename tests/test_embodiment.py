"""Embodiment descriptors: every shipped YAML loads with the reference numbers; every malformed
descriptor is refused with a one-line error naming the file and the field."""

import copy
from pathlib import Path

import pytest
import yaml

from cosmos_policy_lightning.embodiment import Embodiment, EmbodimentError, load_embodiment

from .conftest import EMBODIMENTS

SHIPPED = sorted(EMBODIMENTS.glob("*.yaml"))


def test_every_shipped_yaml_is_tested():
    """Every file in embodiments/ is a YAML that the parametrised tests load, and has a test of its own
    numbers: named in ``REFERENCE`` or by a test function ``test_<name>_embodiment...`` in this module."""
    own = {name for name, *_ in REFERENCE}
    own |= {stem for stem in (p.stem for p in SHIPPED)
            if any(f.startswith(f"test_{stem}_embodiment") and callable(v) for f, v in globals().items())}
    for path in sorted(EMBODIMENTS.iterdir()):
        assert path.is_file() and path.suffix == ".yaml", f"{path}: embodiments/ holds only embodiment YAML files"
        assert path in SHIPPED
        assert path.stem in own, f"{path.name} has no test of its own values (add test_{path.stem}_embodiment)"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_embodiment_loads_and_round_trips(path):
    emb = Embodiment.from_yaml(path)
    assert emb.name == path.stem
    again = Embodiment.from_dict(emb.to_dict(), source="roundtrip")
    assert again.to_dict() == emb.to_dict()
    assert load_embodiment(path) == emb


REFERENCE = [  # docs/method.md §1, §5
    ("libero", ["wrist", "agentview"], 16, 7, 9, 0.99, 16),
    ("robocasa", ["wrist", "left_agentview", "right_agentview"], 32, 7, 9, 0.99, 16),
    ("aloha", ["left_wrist", "right_wrist", "cam_high"], 50, 14, 14, 0.998, 50),
]


@pytest.mark.parametrize("name, cameras, k, adim, pdim, gamma, execute", REFERENCE)
def test_reference_embodiments_match_spec(name, cameras, k, adim, pdim, gamma, execute):
    emb = Embodiment.from_yaml(EMBODIMENTS / f"{name}.yaml")
    assert list(emb.camera_names) == cameras
    assert (emb.action.chunk_size, emb.action.dim, emb.proprio.dim) == (k, adim, pdim)
    assert emb.value.gamma == gamma and emb.action.execute_steps == execute
    assert emb.image_size == (224, 224) and emb.latent_frame_shape == (16, 28, 28)
    assert emb.latent_frame_volume == 12544


def test_metaworld_embodiment():
    emb = Embodiment.from_yaml(EMBODIMENTS / "metaworld.yaml")
    assert emb.action.dim == 4 and emb.proprio.dim == 4 and emb.action.chunk_size == 16
    assert emb.value.gamma == 0.99
    roles = {c.name: c.role for c in emb.cameras}
    assert roles == {"wrist": "wrist", "corner": "primary"}
    assert emb.primary_camera.name == "corner"
    assert emb.image_size[0] <= 96


def test_aloha_sim_embodiment():
    """The ALOHA simulation's robot (sim/aloha.py): the reference ALOHA's 14-d joints, chunk 50 and gamma, three
    cameras named after gym-aloha's MuJoCo cameras, 64x64 for CPU work; 11 latent frames."""
    from cosmos_policy_lightning.layout import SequenceLayout

    emb = Embodiment.from_yaml(EMBODIMENTS / "aloha_sim.yaml")
    assert [c.name for c in emb.cameras] == ["left_wrist", "right_wrist", "top"]
    assert (emb.proprio.dim, emb.action.dim, emb.action.chunk_size, emb.action.execute_steps) == (14, 14, 50, 25)
    assert emb.value.gamma == 0.998 and tuple(emb.image_size) == (64, 64)
    assert emb.cameras[2].keys["episode_hdf5"] == "observations/images/top"
    assert SequenceLayout.from_embodiment(emb).num_latent_frames == 11


def test_so101_embodiment_names_lerobot_features():
    """LeRobot's SO-101 arm: six joint positions as state and action, a front and a wrist camera."""
    emb = Embodiment.from_yaml(EMBODIMENTS / "so101.yaml")
    assert emb.control_hz == 30 and emb.image_size == (224, 224)
    assert emb.proprio.dim == emb.action.dim == 6 and emb.proprio.names[-1] == "gripper"
    assert emb.primary_camera.name == "front"
    assert {c.name: c.keys["lerobot"] for c in emb.cameras} == {"wrist": "observation.images.wrist",
                                                               "front": "observation.images.front"}
    assert emb.proprio.keys["lerobot"] == ("observation.state",) and emb.action.keys["lerobot"] == "action"


def test_pusht_embodiment_reads_the_diffusion_policy_zarr():
    """Push-T's replay buffer: data/img (96x96), data/state (5), data/action (2); one camera, 7 latent frames."""
    from cosmos_policy_lightning.layout import SequenceLayout

    emb = Embodiment.from_yaml(EMBODIMENTS / "pusht.yaml")
    assert emb.image_size == (96, 96) and emb.latent_frame_shape == (16, 12, 12) and emb.control_hz == 10
    assert [c.keys["zarr"] for c in emb.cameras] == ["img"] and emb.primary_camera.name == "top"
    assert (emb.proprio.dim, emb.proprio.keys["zarr"]) == (5, ("state",))
    assert (emb.action.dim, emb.action.keys["zarr"], emb.action.chunk_size, emb.action.execute_steps) == (
        2, "action", 16, 8)
    assert SequenceLayout.from_embodiment(emb).num_latent_frames == 7


def test_bare_name_is_a_shipped_embodiment(tmp_path, monkeypatch):
    """``metaworld`` (no such file here) is embodiments/metaworld.yaml; a file of that name wins; an unknown
    name lists the shipped ones."""
    monkeypatch.chdir(tmp_path)
    assert Embodiment.from_yaml("metaworld") == Embodiment.from_yaml(EMBODIMENTS / "metaworld.yaml")
    assert load_embodiment("embodiments/libero.yaml").name == "libero"  # relative to the checkout, from elsewhere
    with pytest.raises(EmbodimentError, match=r"^robot: file not found \(shipped embodiments, by bare name: aloha, aloha_sim, "
                                              r"libero, metaworld, pusht, robocasa, so101\)$"):
        Embodiment.from_yaml("robot")
    own = yaml.safe_load((EMBODIMENTS / "so101.yaml").read_text())
    (tmp_path / "metaworld").write_text(yaml.safe_dump({**own, "name": "metaworld"}))
    assert Embodiment.from_yaml("metaworld").proprio.dim == 6


def test_metaworld_embodiment_reads_its_lerobot_export():
    emb = Embodiment.from_yaml(EMBODIMENTS / "metaworld.yaml")
    assert {c.keys["lerobot"] for c in emb.cameras} == {"observation.images.wrist", "observation.images.corner"}
    assert emb.proprio.keys["lerobot"] == ("observation.state",) and emb.action.keys["lerobot"] == "action"


def _base() -> dict:
    return yaml.safe_load((EMBODIMENTS / "libero.yaml").read_text())


def _set(d, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    last = keys[-1]
    if value is _DELETE:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


_DELETE = object()

MALFORMED = [
    ("name", _DELETE, "name: missing required field"),
    ("name", "", "name: expected a non-empty string"),
    ("control_hz", -5, "control_hz: expected a positive number"),
    ("control_hz", "fast", "control_hz: expected a positive number"),
    ("image_size", [224], "image_size: expected [H, W]"),
    ("image_size", [224, 0], "image_size[1]: expected a positive integer"),
    ("image_size", [100, 100], "image_size[0]: expected a multiple of 16"),
    ("image_size", [224.0, 224], "image_size[0]: expected a positive integer"),
    ("cameras", [], "cameras: expected a non-empty list"),
    ("cameras.1.name", "wrist", "cameras[1].name: duplicate camera name 'wrist'"),
    ("cameras.0.role", "side", "cameras[0].role: expected one of primary, secondary, wrist"),
    ("cameras.1.role", "wrist", "cameras: expected at least one camera with role 'primary'"),
    ("cameras.0", "wrist", "cameras[0]: expected a mapping"),
    ("proprio.dim", 0, "proprio.dim: expected a positive integer"),
    ("proprio.dim", True, "proprio.dim: expected a positive integer"),
    ("proprio.names", ["a", "b"], "proprio.names: expected 9 names"),
    ("action.names", ["x"] * 7, "action.names: duplicate dimension names"),
    ("action.chunk_size", 2.5, "action.chunk_size: expected a positive integer"),
    ("action.execute_steps", 17, "action.execute_steps: expected at most chunk_size (16)"),
    ("action.chunk_size", 2000, "action: chunk_size * dim = 2000 * 7 = 14000 values do not fit"),
    ("proprio.dim", 20000, "proprio.dim: 20000 values do not fit"),
    ("value.gamma", 1.5, "value.gamma: expected a number in (0, 1]"),
    ("value.gamma", 0, "value.gamma: expected a number in (0, 1]"),
    ("value", _DELETE, "value: missing required field"),
    ("normalization.action", "zscore", "normalization.action: expected one of minmax, quantile, none"),
    ("action.chunk", 4, "action.chunk: unknown field"),
    ("cameras.0.keys", ["x"], "cameras[0].keys: expected a mapping"),
]


@pytest.mark.parametrize("field, value, message", MALFORMED, ids=[f"{m[0]}={m[1]!r}"[:40] for m in MALFORMED])
def test_malformed_embodiment_gives_one_line_error(tmp_path, field, value, message):
    data = copy.deepcopy(_base())
    if field.startswith("proprio."):
        data["proprio"].pop("names")
    _set(data, field, value)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EmbodimentError) as info:
        Embodiment.from_yaml(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(EmbodimentError, match="file not found"):
        Embodiment.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(EmbodimentError, match="not valid YAML") as info:
        Embodiment.from_yaml(bad)
    assert "\n" not in str(info.value)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(EmbodimentError, match="<root>: expected a mapping"):
        Embodiment.from_yaml(top)


def test_new_robot_costs_one_file(tmp_path):
    """A 4-camera robot with no code change: the chunk check uses its own image size."""
    data = {
        "name": "quad", "control_hz": 10, "image_size": [32, 48],
        "cameras": [{"name": n, "role": r} for n, r in
                    (("a", "wrist"), ("b", "primary"), ("c", "secondary"), ("d", "secondary"))],
        "proprio": {"dim": 3}, "action": {"dim": 2, "chunk_size": 8}, "value": {"gamma": 1},
    }
    path = Path(tmp_path / "quad.yaml")
    path.write_text(yaml.safe_dump(data))
    emb = Embodiment.from_yaml(path)
    assert emb.latent_frame_shape == (16, 4, 6)
    assert emb.action.execute_steps == 8  # defaults to the chunk size
    assert emb.normalization == {"action": "minmax", "proprio": "minmax"}


def test_one_compatibility_rule_per_use():
    """Embodiment.difference: the one "same robot?" rule of data, checkpoints, inference and simulators."""
    import dataclasses

    from cosmos_policy_lightning.embodiment import COMPATIBILITY, load_embodiment

    base = load_embodiment("aloha_sim")
    swapped = dataclasses.replace(base, cameras=base.cameras[::-1])
    assert swapped.difference(base, "data") is None          # shards store images by camera name
    assert swapped.difference(base, "checkpoint")[0] == "cameras"   # each camera is a latent slot
    other_gamma = dataclasses.replace(base, value=dataclasses.replace(base.value, gamma=0.99))
    assert other_gamma.difference(base, "checkpoint") == ("value.gamma", 0.99, 0.998)
    assert other_gamma.difference(base, "inference") is None  # acting and ranking values do not use it
    metaworld = load_embodiment("metaworld")
    assert metaworld.difference(base, "simulator") == ("proprio.dim", 4, 14)
    assert set(COMPATIBILITY) == {"data", "checkpoint", "inference", "simulator"}
    with pytest.raises(KeyError):
        base.difference(base, "dance")
