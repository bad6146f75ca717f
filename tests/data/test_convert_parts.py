"""Conversion split across machines: ``--part I --num_parts N`` on each, then ``--merge true``, gives the
dataset of a one-machine conversion byte for byte (shards, statistics, manifest)."""

import json
from pathlib import Path

import pytest

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from ..fixtures.factories import EpisodeSpec, write_embodiment, write_episode_dir

SPECS = [EpisodeSpec(4 + (i % 4), i, success=i % 3 != 0) for i in range(11)]


def _kwargs(out: Path, emb: Path, **more) -> dict:
    return dict(output=str(out), embodiment=str(emb), format="episode_hdf5", val_fraction=0.2, shard_size_mb=0.05,
                text_encoder="none", progress=False, instruction="pick up the cube",
                success_regex="episode_([1-9]|10)\\.hdf5", **more)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_parts_then_merge_equal_one_machine(tmp_path):
    src = write_episode_dir(tmp_path / "src", SPECS)
    emb = write_embodiment(tmp_path)
    one = convert(str(src), **_kwargs(tmp_path / "one", emb))
    out = tmp_path / "split"
    parts = [convert(str(src), **_kwargs(out, emb, part=i, num_parts=3)) for i in (2, 0, 1)]  # any order
    assert sorted(e for p in parts for e in p["part"]["episodes"]) == sorted(one["episodes"])
    assert not list(out.glob("*.tar")), "parts write no shard"
    with pytest.raises(DataError, match="holds a conversion|not finished|other options"):
        convert(str(src), **_kwargs(out, emb, num_parts=4, merge=True))   # no such parts
    merged = convert(str(src), **_kwargs(out, emb, num_parts=3, merge=True))
    assert merged["status"] == "complete" and not list(out.glob("part-*"))
    a, b = _files(tmp_path / "one"), _files(out)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != S.MANIFEST:
            assert a[name] == b[name], name        # shards and stats.json: byte for byte
    strip = lambda m: {k: v for k, v in m.items() if k != "source"}  # noqa: E731
    assert strip(json.loads(a[S.MANIFEST])) == strip(json.loads(b[S.MANIFEST]))
    assert len(merged["shards"]) >= 3  # the test splits episodes over several shards


def test_a_missing_part_is_named(tmp_path):
    src = write_episode_dir(tmp_path / "src", SPECS)
    emb = write_embodiment(tmp_path)
    out = tmp_path / "split"
    convert(str(src), **_kwargs(out, emb, part=0, num_parts=2))
    with pytest.raises(DataError, match=r"part-1-of-2: part 1 of 2 is not finished; run the same convert command "
                                        r"with --part 1 --num_parts 2 first"):
        convert(str(src), **_kwargs(out, emb, num_parts=2, merge=True))
    convert(str(src), **_kwargs(out, emb, part=1, num_parts=2, seed=5))   # a part of another split
    with pytest.raises(DataError, match="part 1 was converted with other options"):
        convert(str(src), **_kwargs(out, emb, num_parts=2, merge=True))
    with pytest.raises(DataError, match="expected 0 <= part < num_parts"):
        convert(str(src), **_kwargs(out, emb, part=2, num_parts=2))


def test_slurm_array_script_converts_and_merges(tmp_path):
    """tools/cluster/slurm_convert.sh run as SLURM would (array tasks 0 and 1, then the merge job), for real."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[2] / "tools" / "cluster" / "slurm_convert.sh"
    src = write_episode_dir(tmp_path / "src", SPECS[:6])
    emb = write_embodiment(tmp_path)
    args = [str(script), str(src), "--output", str(tmp_path / "out"), "--embodiment", str(emb), "--format",
            "episode_hdf5", "--val_fraction", "0.2", "--text_encoder", "none", "--all_success", "true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"OMP_NUM_THREADS": "1"}
    for task in ("0", "1"):
        run = subprocess.run(args, env={**env, "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2"},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    run = subprocess.run(args, env={**env, "MERGE": "1", "NUM_PARTS": "2"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / S.MANIFEST).read_text())
    assert manifest["status"] == "complete" and len(manifest["episodes"]) == 6
    outside = subprocess.run(args, env=env, capture_output=True, text=True)
    assert outside.returncode != 0 and "run it as an array job" in outside.stderr
