"""Bad input: each case stops the conversion with one line naming file, episode and key, or, with
``skip_bad``, skips that episode and counts it in the manifest."""

import numpy as np
import pytest
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from ..fixtures.factories import EpisodeSpec, episode_arrays, write_embodiment, write_episode_hdf5, write_robomimic


def _arrays(T=5, seed=2):
    return episode_arrays(EpisodeSpec(T, seed))


def _nan_actions():
    a = _arrays()["actions"].copy()
    a[3, 1] = np.nan
    return {"actions": a}


def _inf_proprio():
    g = _arrays()["gripper"].copy()
    g[2] = np.inf
    return {"gripper": g}


def _empty():
    return {k: v[:0] for k, v in _arrays().items()}


# name -> (spec of the bad episode demo_1, regex its message must match)
CASES = {
    "one_step": (EpisodeSpec(1, 2), r"demo_1: key data/demo_1/actions: episode has 1 step\(s\); at least 2"),
    "empty": (EpisodeSpec(5, 2, override=_empty()), r"demo_1: key data/demo_1/actions: episode has 0 step"),
    "nan_actions": (EpisodeSpec(5, 2, override=_nan_actions()),
                    r"demo_1: key data/demo_1/actions: actions contain NaN or inf \(first at step 3, dim 1\)"),
    "inf_proprio": (EpisodeSpec(5, 2, override=_inf_proprio()),
                    r"demo_1: key data/demo_1/obs/joint_pos\+data/demo_1/obs/gripper: proprio contain NaN or inf"),
    "action_dim": (EpisodeSpec(5, 2, override={"actions": _arrays()["actions"][:, :2]}),
                   r"demo_1: key data/demo_1/actions: expected action dim 3 \(embodiment toy\), got 2"),
    "proprio_dim": (EpisodeSpec(5, 2, override={"joint_pos": _arrays()["joint_pos"][:, :1]}),
                    r"demo_1: key .*obs/joint_pos\+.*obs/gripper: proprio dims 1\+1 = 2, expected proprio dim 4"),
    "image_rank": (EpisodeSpec(5, 2, override={"front": _arrays()["front"][..., 0]}),
                   r"demo_1: key data/demo_1/obs/front_rgb: images of the wrong rank"),
    "image_channels": (EpisodeSpec(5, 2, override={"front": _arrays()["front"][..., :1]}),
                       r"demo_1: key data/demo_1/obs/front_rgb: expected RGB images \(T, H, W, 3\)"),
    "image_length": (EpisodeSpec(5, 2, override={"wrist": _arrays(T=6)["wrist"]}),
                     r"demo_1: key data/demo_1/obs/wrist_rgb: 6 frames, but data/demo_1/actions has 5 steps"),
    "proprio_length": (EpisodeSpec(5, 2, override={"joint_pos": _arrays(T=4)["joint_pos"]}),
                       r"demo_1: key data/demo_1/obs/joint_pos: 4 steps, but data/demo_1/actions has 5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_episode_is_one_line_or_skipped(tmp_path, case):
    bad, pattern = CASES[case]
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "demos.hdf5", [EpisodeSpec(4, 1), bad, EpisodeSpec(6, 3)])
    kw = dict(embodiment=str(emb), format="robomimic", val_fraction=0.0, text_encoder="none", progress=False)
    with pytest.raises(DataError) as err:
        convert(str(src), output=str(tmp_path / "a"), **kw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(src))
    assert __import__("re").search(pattern, message), message
    manifest = convert(str(src), output=str(tmp_path / "b"), skip_bad=True, **kw)
    assert manifest["counts"]["bad_episodes"] == 1
    assert manifest["bad_episodes"] == {"demo_1": message}
    assert set(manifest["episodes"]) == {"demo_0", "demo_2"}
    assert manifest["counts"]["train"]["samples"] == 10


def test_missing_key_names_what_was_looked_for(tmp_path):
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "demos.hdf5", [EpisodeSpec(4, 1)], drop=("obs/front_rgb",))
    with pytest.raises(DataError, match=r"demos\.hdf5: episode demo_0: key front_rgb missing \(looked for "
                                        r"obs/front_rgb, front_rgb\); available: .*obs/wrist_rgb"):
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), text_encoder="none", progress=False)


def test_missing_file_and_unreadable_file(tmp_path):
    emb = write_embodiment(tmp_path)
    kw = dict(output=str(tmp_path / "o"), embodiment=str(emb), text_encoder="none", progress=False)
    with pytest.raises(DataError, match=r"nope\.hdf5: file not found"):
        convert(str(tmp_path / "nope.hdf5"), **kw)
    (tmp_path / "junk.hdf5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match=r"junk\.hdf5: not a readable HDF5 file"):
        convert(str(tmp_path / "junk.hdf5"), **kw)
    (tmp_path / "eps").mkdir()
    write_episode_hdf5(tmp_path / "eps" / "good.hdf5", EpisodeSpec(3, 1))
    (tmp_path / "eps" / "torn.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"torn\.hdf5: not a readable HDF5 file"):
        convert(str(tmp_path / "eps"), format="episode_hdf5", all_success=True, **kw)
    manifest = convert(str(tmp_path / "eps"), format="episode_hdf5", all_success=True, skip_bad=True,
                       **{**kw, "output": str(tmp_path / "o2")})
    assert list(manifest["bad_episodes"]) == ["torn"] and list(manifest["episodes"]) == ["good"]


def test_embodiment_without_keys_for_the_format(tmp_path, embodiments_dir):
    src = write_robomimic(tmp_path / "demos.hdf5", [EpisodeSpec(4, 1)])
    with pytest.raises(DataError, match=r"aloha\.yaml: cameras\[0\] \(left_wrist\): no key for format 'robomimic' "
                                        r"\(the YAML has keys for episode_hdf5\)"):
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(embodiments_dir / "aloha.yaml"),
                text_encoder="none", progress=False)


def test_a_misspelt_format_in_the_yaml_is_named(tmp_path):
    """Keys written under ``robomimc`` (a typo) are not found for ``--format robomimic``: the error says
    which formats the YAML does have keys for."""
    emb = yaml.safe_load(write_embodiment(tmp_path).read_text())
    for part in (*emb["cameras"], emb["proprio"], emb["action"]):
        part["keys"] = {"robomimc": part["keys"]["robomimic"]}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(emb))
    src = write_robomimic(tmp_path / "demos.hdf5", [EpisodeSpec(4, 1)])
    with pytest.raises(DataError, match=r"no key for format 'robomimic' \(the YAML has keys for robomimc\)"):
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(tmp_path / "typo.yaml"), text_encoder="none",
                progress=False)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "demos.hdf5", [EpisodeSpec(4, 1), EpisodeSpec(1, 2)])
    code = main(["convert", str(src), "--output", str(tmp_path / "o"), "--embodiment", str(emb),
                 "--text_encoder", "none", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and "demo_1" in err[-1] and "at least 2" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_output_directory_that_is_not_a_conversion_is_refused(tmp_path):
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "demos.hdf5", [EpisodeSpec(4, 1)])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no manifest.json"):
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), text_encoder="none", progress=False)
