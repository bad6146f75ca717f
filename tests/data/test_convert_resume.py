"""Resumability: a conversion killed mid-run (a real subprocess, SIGKILL) and run again ends with the
same shards, byte for byte, as an uninterrupted one; a finished one is not redone; other settings
are refused unless --overwrite."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from ..fixtures.convert_checks import check_conversion
from ..fixtures.factories import GAMMA, K, EpisodeSpec, write_embodiment, write_episode_dir

SPECS = [EpisodeSpec(4 + (i % 4), i, success=i % 3 != 0) for i in range(14)]


def _args(src: Path, out: Path, emb: Path) -> list[str]:
    return ["convert", str(src), "--output", str(out), "--embodiment", str(emb), "--format", "episode_hdf5",
            "--val_fraction", "0.2", "--shard_size_mb", "0.2", "--text_encoder", "none", "--progress", "false",
            "--success_regex", "episode_([1-9]|1[0-3])\\.hdf5"]


def _kwargs(src: Path, out: Path, emb: Path) -> dict:
    return dict(output=str(out), embodiment=str(emb), format="episode_hdf5", val_fraction=0.2, shard_size_mb=0.2,
                text_encoder="none", progress=False, success_regex="episode_([1-9]|1[0-3])\\.hdf5")


def _run_and_kill(args: list[str], out: Path, ready, timeout: float = 120.0) -> None:
    """Start the CLI in a subprocess and SIGKILL it once ``ready(out)``.

    The conversion runs at its own speed. To kill it at a chosen point without a hook in the converter,
    the test freezes the process (SIGSTOP) before each look at the folder and lets it go on (SIGCONT)
    for a few milliseconds at a time; the kill then lands on exactly the state that ``ready`` saw.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_policy_lightning.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"conversion ended before the kill: {proc.stderr.read().decode()[-500:]}")
            proc.send_signal(signal.SIGSTOP)
            if ready(out):
                break
            if time.monotonic() > deadline:
                pytest.fail("conversion never reached the kill point")
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / S.MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _records(out: Path) -> int:
    return len(list((out / ".work").glob("*.json"))) if (out / ".work").is_dir() else 0


def test_killed_conversion_resumes_to_identical_shards(tmp_path):
    src = write_episode_dir(tmp_path / "src", SPECS)
    emb = write_embodiment(tmp_path)
    ref = tmp_path / "ref"
    convert(str(src), **_kwargs(src, ref, emb))

    out = tmp_path / "out"
    # 1st kill: some episodes finished, no shard yet
    _run_and_kill(_args(src, out, emb), out, lambda o: _records(o) >= 2)
    assert _manifest(out)["status"] == "in_progress" and not _manifest(out)["shards"]
    # 2nd kill: after at least one shard is written and listed
    _run_and_kill(_args(src, out, emb), out, lambda o: len(_manifest(o).get("shards", [])) >= 1)
    state = _manifest(out)
    assert state["status"] == "in_progress"
    assert len(state["shards"]) < len(json.loads((ref / S.MANIFEST).read_text())["shards"])
    # a half-written shard as a kill during writing leaves it
    (out / ".train-000005.tar.tmp").write_bytes(b"partial tar")

    convert(str(src), **_kwargs(src, out, emb))  # the resume, to completion

    ref_manifest, manifest = json.loads((ref / S.MANIFEST).read_text()), _manifest(out)
    assert manifest["status"] == "complete"
    assert manifest["shards"] == ref_manifest["shards"]
    assert manifest["counts"] == ref_manifest["counts"] and manifest["episodes"] == ref_manifest["episodes"]
    ref_tars = sorted(p.name for p in ref.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == ref_tars
    for name in ref_tars:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert (out / S.STATS).read_text() == (ref / S.STATS).read_text()
    assert not (out / ".work").exists() and not list(out.glob(".*.tmp"))
    check_conversion(out, {f"episode_{i}": s for i, s in enumerate(SPECS)}, chunk_size=K, gamma=GAMMA,
                     successes={f"episode_{i}": 1 <= i <= 13 for i in range(14)},
                     scores={f"episode_{i}": float(1 <= i <= 13) for i in range(14)})


def test_finished_conversion_is_not_redone_and_other_settings_are_refused(tmp_path):
    src = write_episode_dir(tmp_path / "src", SPECS[:4])
    emb = write_embodiment(tmp_path)
    out = tmp_path / "out"
    kw = _kwargs(src, out, emb)
    convert(str(src), **kw)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = convert(str(src), **kw)
    assert again["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(DataError, match="other settings \\(first difference: shard_size_mb\\).*--overwrite"):
        convert(str(src), **{**kw, "shard_size_mb": 1.0})
    redone = convert(str(src), **{**kw, "shard_size_mb": 1.0, "overwrite": True})
    assert redone["settings"]["shard_size_mb"] == 1.0
    assert {s["name"] for s in redone["shards"]} == {p.name for p in out.glob("*.tar")}
