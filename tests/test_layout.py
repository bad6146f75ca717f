"""The sequence layout reproduces the reference layouts slot by slot and builds every mask."""

import json
import subprocess
import sys

import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.embodiment import Embodiment
from cosmos_policy_lightning.layout import OBJECTIVES, SequenceLayout

from .conftest import EMBODIMENTS


def _layout(name: str) -> SequenceLayout:
    return SequenceLayout.from_embodiment(Embodiment.from_yaml(EMBODIMENTS / f"{name}.yaml"))


def _toy(n_cameras: int) -> SequenceLayout:
    roles = ["primary"] + ["wrist"] * (n_cameras - 1)
    emb = Embodiment.from_dict({
        "name": f"toy{n_cameras}", "control_hz": 10, "image_size": [32, 32],
        "cameras": [{"name": f"cam{i}", "role": r} for i, r in enumerate(roles)],
        "proprio": {"dim": 2}, "action": {"dim": 2, "chunk_size": 4}, "value": {"gamma": 0.9},
    })
    return SequenceLayout.from_embodiment(emb)


REFERENCE = {
    "libero": ["blank", "proprio", "image/wrist", "image/agentview", "action", "future_proprio",
               "future_image/wrist", "future_image/agentview", "value"],
    "robocasa": ["blank", "proprio", "image/wrist", "image/left_agentview", "image/right_agentview", "action",
                 "future_proprio", "future_image/wrist", "future_image/left_agentview",
                 "future_image/right_agentview", "value"],
    "aloha": ["blank", "proprio", "image/left_wrist", "image/right_wrist", "image/cam_high", "action",
              "future_proprio", "future_image/left_wrist", "future_image/right_wrist", "future_image/cam_high",
              "value"],
}


@pytest.mark.parametrize("name, frames, pixels, action, value",
                         [("libero", 9, 33, 4, 8), ("robocasa", 11, 41, 5, 10), ("aloha", 11, 41, 5, 10)])
def test_reference_layouts(name, frames, pixels, action, value):
    lay = _layout(name)
    assert lay.num_latent_frames == frames and lay.num_pixel_frames == pixels
    assert lay.index("action") == action and lay.index("value") == value
    assert [s.name for s in lay.slots] == REFERENCE[name]
    assert [s.latent_index for s in lay.slots] == list(range(frames))
    assert lay.latent_frame_shape == (16, 28, 28)
    # Pixel ranges: frame 0 alone, then 4 per slot, contiguous and covering the whole clip.
    assert lay.slots[0].pixel_frames == (0, 0)
    for prev, cur in zip(lay.slots, lay.slots[1:]):
        assert cur.pixel_frames[0] == prev.pixel_frames[1] + 1
        assert cur.pixel_frames[1] - cur.pixel_frames[0] == 3
    assert lay.slots[-1].pixel_frames[1] == pixels - 1


def test_slot_attributes_libero():
    lay = _layout("libero")
    s = lay.slot("future_image/agentview")
    assert (s.kind, s.time, s.camera, s.latent_index, s.pixel_frames) == ("image", "future", "agentview", 7, (25, 28))
    assert lay.slot("proprio").time == "current" and lay.slot("future_proprio").time == "future"
    assert lay.slot("action").time is None and lay.slot("value").kind == "value"
    assert lay.indices("image") == [2, 3, 6, 7] and lay.indices("image", "future") == [6, 7]
    with pytest.raises(KeyError, match="no slot 'nope'"):
        lay.slot("nope")


@pytest.mark.parametrize("n", [1, 4])
def test_one_and_four_cameras(n):
    lay = _toy(n)
    assert lay.num_latent_frames == 2 * n + 5
    assert lay.num_pixel_frames == 1 + 4 * (2 * n + 4)
    assert lay.index("action") == n + 2 and lay.index("future_proprio") == n + 3 and lay.index("value") == 2 * n + 4
    assert [lay.index(f"future_image/cam{i}") for i in range(n)] == list(range(n + 4, 2 * n + 4))
    assert lay.latent_frame_shape == (16, 4, 4)


def _mask(lay, groups):
    return tuple(s.group in groups for s in lay.slots)


@pytest.mark.parametrize("name", ["libero", "robocasa", "aloha"])
def test_every_mask(name):
    lay = _layout(name)
    expect_cond = {
        "policy": {"blank", "s"}, "world_model": {"blank", "s", "a"}, "value": {"blank", "s", "a", "s'"},
        "value_future_state": {"blank", "s'"}, "q_value": {"blank", "s", "a"},
    }
    expect_loss = {"policy": {"a", "s'", "V"}, "world_model": {"s'", "V"}, "value": {"V"},
                   "value_future_state": {"V"}, "q_value": {"V"}}
    expect_loss_main = {"policy": {"a"}, "world_model": {"s'"}, "value": {"V"},
                        "value_future_state": {"V"}, "q_value": {"V"}}
    for obj in OBJECTIVES:
        cond, loss = lay.conditioning_mask(obj), lay.loss_mask(obj)
        assert cond == _mask(lay, expect_cond[obj]), obj
        assert loss == _mask(lay, expect_loss[obj]), obj
        assert lay.loss_mask(obj, auxiliary=False) == _mask(lay, expect_loss_main[obj]), obj
        assert not any(c and l for c, l in zip(cond, loss)), "a conditioning frame never carries loss"
        assert cond[0] and cond[-1] is False  # blank always clean, value always generated
    # Explicit reference masks for LIBERO (index 4 = action, 8 = value).
    if name == "libero":
        T, F = True, False
        assert lay.conditioning_mask("policy") == (T, T, T, T, F, F, F, F, F)
        assert lay.conditioning_mask("world_model") == (T, T, T, T, T, F, F, F, F)
        assert lay.conditioning_mask("value") == (T, T, T, T, T, T, T, T, F)
        assert lay.conditioning_mask("value_future_state") == (T, F, F, F, F, T, T, T, F)
        assert lay.conditioning_mask("q_value") == (T, T, T, T, T, F, F, F, F)
        assert lay.loss_mask("value_future_state") == (F, F, F, F, F, F, F, F, T)


def test_unknown_objective():
    with pytest.raises(ValueError, match="unknown objective 'dance'"):
        _layout("libero").conditioning_mask("dance")


def test_cli_layout_json_shape(capsys):
    assert main(["layout", str(EMBODIMENTS / "aloha.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"embodiment", "num_latent_frames", "num_pixel_frames", "latent_frame_shape",
                         "slots", "conditioning"}
    assert data["embodiment"] == "aloha" and data["num_latent_frames"] == 11 and data["num_pixel_frames"] == 41
    assert data["latent_frame_shape"] == [16, 28, 28]
    assert data["slots"][4] == {"name": "image/cam_high", "kind": "image", "time": "current", "camera": "cam_high",
                                "latent_index": 4, "pixel_frames": [13, 16]}
    assert data["slots"][10]["name"] == "value" and data["slots"][10]["time"] is None
    assert set(data["conditioning"]) == set(OBJECTIVES)
    assert all(len(m) == 11 and all(isinstance(b, bool) for b in m) for m in data["conditioning"].values())


def test_cli_layout_table_console_script():
    out = subprocess.run([sys.executable, "-m", "cosmos_policy_lightning.cli", "layout",
                          str(EMBODIMENTS / "aloha.yaml")], capture_output=True, text=True, check=True).stdout
    assert "11 latent frames" in out and "future_image/cam_high" in out
    assert sum(line.count("│") > 0 for line in out.splitlines()) == 11  # one row per slot


def test_cli_layout_bad_file_one_line(tmp_path, capsys):
    bad = tmp_path / "robot.yaml"
    bad.write_text("name: x\n")
    assert main(["layout", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "control_hz: missing required field" in err


def test_objectives_are_one_table():
    from cosmos_policy_lightning.layout import OBJECTIVE_TABLE, objective, objective_index, value_objectives

    assert OBJECTIVES == tuple(o.name for o in OBJECTIVE_TABLE)
    assert [o.name for o in OBJECTIVE_TABLE if o.successes_only] == ["policy"]
    assert value_objectives() == ("value", "value_future_state", "q_value")
    assert objective_index("q_value") == 4 and objective("world_model").auxiliary == {"V"}
    with pytest.raises(ValueError, match="expected one of policy, world_model"):
        objective_index("dance")


def test_adding_an_objective_is_one_entry(monkeypatch):
    """CONTRIBUTING's "Adding an objective": one entry in OBJECTIVE_TABLE gives its masks, its index and
    (being value-only) its place among the planner's conditionings."""
    import cosmos_policy_lightning.layout as layout_module

    extra = layout_module.Objective("value_from_state", frozenset({"blank", "s"}), frozenset({"V"}))
    monkeypatch.setattr(layout_module, "OBJECTIVE_TABLE", layout_module.OBJECTIVE_TABLE + (extra,))
    lay = _layout("libero")
    T, F = True, False
    assert lay.conditioning_mask("value_from_state") == (T, T, T, T, F, F, F, F, F)
    assert lay.loss_mask("value_from_state") == (F, F, F, F, F, F, F, F, T)
    assert layout_module.objective_index("value_from_state") == 5
    assert layout_module.value_objectives()[-1] == "value_from_state"
