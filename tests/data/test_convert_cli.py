"""`cosmos-policy convert` on the command line: --help documents every option; parallel workers give
the same shards as one process."""

import inspect

import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.convert import convert

from ..fixtures.factories import EpisodeSpec, write_embodiment, write_robomimic


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    doc = inspect.getdoc(convert)
    for name in inspect.signature(convert).parameters:
        option = name if name == "source" else f"--{name}"
        assert option in text, option
        assert f"    {name}: " in doc, f"Args: section lacks {name}"
    for word in ("robomimic", "episode_hdf5", "zarr", "minilm"):
        assert word in text


def test_two_workers_write_the_same_shards_as_one(tmp_path):
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "d.hdf5", [EpisodeSpec(3 + i % 5, i, success=i % 2 == 0) for i in range(8)])
    kw = dict(embodiment=str(emb), val_fraction=0.25, shard_size_mb=0.1, text_encoder="none", progress=False)
    one = convert(str(src), output=str(tmp_path / "w1"), workers=1, **kw)
    two = convert(str(src), output=str(tmp_path / "w2"), workers=2, **kw)
    assert one["shards"] == two["shards"] and len(one["shards"]) >= 3
    for shard in one["shards"]:
        assert (tmp_path / "w1" / shard["name"]).read_bytes() == (tmp_path / "w2" / shard["name"]).read_bytes()
    assert (tmp_path / "w1" / "stats.json").read_text() == (tmp_path / "w2" / "stats.json").read_text()


def test_command_line_key_overrides_and_validation_list(tmp_path):
    import json

    import yaml

    emb = write_embodiment(tmp_path)
    data = yaml.safe_load(emb.read_text())
    for cam in data["cameras"]:
        del cam["keys"]["robomimic"]
    del data["proprio"]["keys"]["robomimic"], data["action"]["keys"]["robomimic"]
    emb.write_text(yaml.safe_dump(data))
    src = write_robomimic(tmp_path / "d.hdf5", [EpisodeSpec(3, i) for i in range(3)])
    base = ["convert", str(src), "--output", str(tmp_path / "o"), "--embodiment", str(emb), "--text_encoder", "none",
            "--progress", "false"]
    assert main(base) == 2  # no robomimic keys in the YAML and none given
    code = main(base + ["--camera_keys", "{wrist: wrist_rgb, front: front_rgb}", "--proprio_keys", "[joint_pos, gripper]",
                        "--action_key", "actions", "--val_episodes", "[demo_1]"])
    assert code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["settings"]["keys"] == {"cameras": {"wrist": "wrist_rgb", "front": "front_rgb"},
                                            "proprio": ["joint_pos", "gripper"], "action": "actions"}
    assert manifest["splits"]["validation"] == ["demo_1"]
