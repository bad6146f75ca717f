"""``cosmos-policy convert`` under faults (issue 14, items 1, 3 and 6): concurrent runs on one folder,
outputs that cannot be written, symlink loops, a killed parent, labels that contradict each other,
and options checked before the work starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from ..fixtures.factories import EpisodeSpec, write_embodiment, write_robomimic, write_zarr
from .faults import REPO, cli_command, one_line_error, run_with_faults

QUIET = ["--text_encoder", "none", "--progress", "false"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """``(source, embodiment)``: 6 short robomimic episodes."""
    root = tmp_path_factory.mktemp("small")
    emb = write_embodiment(root)
    src = write_robomimic(root / "d.hdf5", [EpisodeSpec(4 + i % 3, i, success=i % 2 == 0) for i in range(6)])
    return src, emb


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> tuple[Path, Path]:
    """``(source, embodiment)`` that takes seconds to convert: 10 episodes of 80 steps at 128x128."""
    root = tmp_path_factory.mktemp("slow")
    emb = write_embodiment(root, image_size=(128, 128))
    src = write_robomimic(root / "d.hdf5", [EpisodeSpec(80, i, success=i % 3 != 0) for i in range(10)])
    return src, emb


def _convert_args(src: Path, emb: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(src), "--output", str(out), "--embodiment", str(emb), *QUIET, *extra]


def _shard_episodes(out: Path) -> dict[str, list[str]]:
    """Episode of every sample in the shards of each split, read from the tar files themselves."""
    found: dict[str, list[str]] = {"train": [], "validation": []}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".meta.json"):
                    found[path.name.split("-")[0]].append(json.load(tar.extractfile(member))["episode"])
    return found


def _assert_consistent(out: Path) -> dict:
    """The manifest says complete and the shards hold exactly its splits: every training episode's
    steps once, no validation episode among them (what two racing conversions broke)."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    found = _shard_episodes(out)
    for split in ("train", "validation"):
        expected = {e: m["length"] for e, m in manifest["episodes"].items() if m["split"] == split}
        counts = {e: found[split].count(e) for e in set(found[split])}
        assert counts == expected, split
    return manifest


# ------------------------------------------------------------------------------------ concurrency
def _race(commands: list[list[str]], out: Path, logs_dir: Path) -> tuple[list[int], list[str]]:
    """Start ``commands`` together and make them collide: this test holds the folder's lock while they
    start, until each reports that it waits for it, then lets them race for it (as ranks of one job do).
    Returns exit statuses and stderr texts."""
    from filelock import FileLock

    from cosmos_policy_lightning.locking import LOCK_NAME

    out.mkdir(parents=True, exist_ok=True)
    logs = [logs_dir / f"stderr{i}.txt" for i in range(len(commands))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with FileLock(str(out / LOCK_NAME)):
        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
                 for cmd, log in zip(commands, logs)]
        deadline = time.time() + 120
        while time.time() < deadline and not all("waiting for it to finish" in log.read_text() for log in logs):
            time.sleep(0.1)
    codes = [p.wait(timeout=600) for p in procs]
    return codes, [log.read_text() for log in logs]


def test_two_runs_with_equal_options_convert_once(slow, tmp_path):
    """One converts while the other waits, then finds the finished conversion and reuses it (before: one
    died with 'No such file or directory: .work/<episode>.spill')."""
    src, emb = slow
    out = tmp_path / "out"
    args = cli_command(_convert_args(src, emb, out, "--val_fraction", "0.2"))
    codes, errs = _race([args, args], out, tmp_path)
    assert codes == [0, 0], errs
    assert all("waiting for it to finish" in e for e in errs), errs
    assert sum("nothing to do" in e for e in errs) == 1, errs
    _assert_consistent(out)


def test_two_runs_with_other_options_started_together(slow, tmp_path):
    """Seeds 1 and 2 into one folder at once (before: both 'complete', training shards holding validation
    episodes, some missing, some twice): one converts, the other is refused in one line."""
    src, emb = slow
    out = tmp_path / "out"
    codes, errs = _race([cli_command(_convert_args(src, emb, out, "--seed", str(seed))) for seed in (1, 2)], out,
                        tmp_path)
    assert sorted(codes) == [0, 2], errs
    one_line_error(errs[codes.index(2)], str(out), "other settings", "seed")
    manifest = _assert_consistent(out)
    assert manifest["settings"]["seed"] == 1 + codes.index(0)


def test_a_run_with_other_options_is_refused_at_once(slow, tmp_path):
    """A second run with other options arriving while the first converts is refused without waiting."""
    src, emb = slow
    out = tmp_path / "out"
    first = _start(_convert_args(src, emb, out, "--seed", "1"))
    deadline = time.time() + 120
    while not (out / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.05)  # the first holds the lock and has written its in-progress manifest
    second = subprocess.run(cli_command(_convert_args(src, emb, out, "--seed", "2")), capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=600)
    assert first.wait(timeout=600) == 0, first.communicate()[1][-2000:]
    assert second.returncode == 2
    one_line_error(second.stderr, str(out), "other settings", "seed")
    manifest = _assert_consistent(out)
    assert manifest["settings"]["seed"] == 1


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cli_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)


def test_data_modules_of_two_ranks_convert_once(slow, tmp_path):
    """Two processes (the ranks of a torchrun / SLURM job) whose data module converts on first use
    (``convert_from``) into the same folder: one converts, the other waits and reads the result."""
    src, emb = slow
    out = tmp_path / "shards"
    code = ("from cosmos_policy_lightning.data.datamodule import CosmosDataModule; "
            "from cosmos_policy_lightning.training.prepare import prepare_dataset; "
            f"dm = CosmosDataModule({str(out)!r}, embodiment={str(emb)!r}, num_workers=0, "
            f"convert_from={{'source': {str(src)!r}, 'text_encoder': 'none', 'progress': False}}); "
            "prepare_dataset(dm); assert dm.info.splits['train'].total_samples > 0")
    codes, errs = _race([[sys.executable, "-c", code]] * 2, out, tmp_path)
    assert codes == [0, 0], [e[-2000:] for e in errs]
    assert sum("nothing to do" in e for e in errs) == 1, errs
    _assert_consistent(out)


def test_killed_parent_takes_its_workers_along(slow, tmp_path):
    """``kill -9`` of ``convert --workers 2``: the spawn workers and the resource tracker end too."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    src, emb = slow
    out = tmp_path / "out"
    parent = subprocess.Popen(cli_command(_convert_args(src, emb, out, "--workers", "2")), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    children: set[int] = set()
    while time.time() < deadline:
        children = _descendants(parent.pid)
        if len(children) >= 3 and any((out / ".work").glob("*.spill")):  # 2 workers + resource tracker, busy
            break
        time.sleep(0.05)
    assert len(children) >= 3, "the workers did not start"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)], "orphaned conversion processes"
    # and the folder is resumable: the same command finishes the conversion
    assert main(_convert_args(src, emb, out, "--workers", "2")) == 0
    _assert_consistent(out)


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------------------ outputs
def test_output_that_is_a_file(small, tmp_path, capsys):
    src, emb = small
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert main(_convert_args(src, emb, out)) == 2
    one_line_error(capsys.readouterr().err, str(out), "--output is a file")


def test_read_only_output(small, tmp_path):
    src, emb = small
    out = tmp_path / "out"
    run = run_with_faults(cli_command(_convert_args(src, emb, out)), read_only=(out,))
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run.stderr, str(out), "--output directory is not writable")


def test_full_disk(slow, tmp_path):
    """The output fills a 256 KiB file system mid-conversion: one line naming the file and the cause;
    the manifest never says complete."""
    src, emb = slow
    out = tmp_path / "out"
    run = run_with_faults(cli_command(_convert_args(src, emb, out)), full_disk={out: 256})
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run.stderr, "no space left on device (errno 28)")
    manifest = out / "manifest.json"  # the tmpfs is gone with its namespace: nothing was left behind here
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"


def test_symlink_loop_among_sources(small, tmp_path, capsys):
    src, emb = small
    folder = tmp_path / "sources"
    (folder / "task").mkdir(parents=True)
    os.symlink(src, folder / "task" / "demo.hdf5")
    os.symlink(folder / "b.hdf5", folder / "a.hdf5")
    os.symlink(folder / "a.hdf5", folder / "b.hdf5")
    assert main(_convert_args(folder, emb, tmp_path / "out")) == 2
    one_line_error(capsys.readouterr().err, "a.hdf5: symbolic link loop")
    os.unlink(folder / "a.hdf5"), os.unlink(folder / "b.hdf5")
    os.symlink(folder, folder / "task" / "again")  # a directory link back to an ancestor
    assert main(_convert_args(folder, emb, tmp_path / "out")) == 2
    one_line_error(capsys.readouterr().err, "again: symbolic link loop")


# ------------------------------------------------------------------------------------ options, labels
@pytest.mark.parametrize("spec, fragment", [("t5:/nonexistent/t5-model", "holds no config.json"),
                                            ("bert", "unknown encoder 'bert'")])
def test_text_encoder_is_checked_before_converting(small, tmp_path, capsys, spec, fragment):
    src, emb = small
    out = tmp_path / "out"
    args = ["convert", str(src), "--output", str(out), "--embodiment", str(emb), "--progress", "false",
            "--text_encoder", spec]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "--text_encoder", fragment)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()


def test_boolean_options_are_flags(small, tmp_path):
    """``--all_success`` as the README writes it (no ``true``); ``--all_success false`` still works."""
    src, emb = small
    out = tmp_path / "out"
    assert main(_convert_args(src, emb, out, "--all_success", "--skip_bad")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["labels"]["all_success"] is True
    assert manifest["counts"]["train"]["failures"] == 0
    assert main(_convert_args(src, emb, out, "--all_success", "false", "--overwrite")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["labels"]["all_success"] is False and manifest["counts"]["train"]["failures"] > 0


def test_duplicate_top_level_key_in_embodiment_is_refused(tmp_path, capsys):
    text = yaml.safe_dump({"name": "toy", "control_hz": 10, "image_size": [32, 32],
                           "cameras": [{"name": "front", "role": "primary"}], "proprio": {"dim": 2},
                           "action": {"dim": 2, "chunk_size": 4}, "value": {"gamma": 0.9}}, sort_keys=False)
    path = tmp_path / "dup.yaml"
    path.write_text(text + "action: {dim: 7, chunk_size: 16}\n")
    line = len(text.splitlines()) + 1
    assert main(["layout", str(path)]) == 2
    one_line_error(capsys.readouterr().err, f"dup.yaml: line {line}: key 'action' appears twice")


def test_zarr_rows_after_the_last_episode_end_are_warned(tmp_path):
    import zarr

    emb = write_embodiment(tmp_path)
    store = write_zarr(tmp_path / "replay.zarr", [EpisodeSpec(5, 1), EpisodeSpec(6, 2), EpisodeSpec(4, 3)])
    root = zarr.open_group(str(store), mode="r+")
    root["meta/episode_ends"][:] = np.array([5, 11, 11])  # the last episode was recorded without its end
    with pytest.warns(UserWarning, match=r"replay.zarr: 4 row\(s\) of data/action after the last meta/episode_ends"):
        manifest = convert(str(store), output=str(tmp_path / "out"), embodiment=str(emb), format="zarr",
                           all_success=True, val_fraction=0.0, text_encoder="none", progress=False, skip_bad=True)
    assert manifest["counts"]["train"]["samples"] == 11


@pytest.mark.parametrize("success, score, fragment", [
    (True, 0.0, "success is true but the success score is 0"),
    (False, 1.0, "success is false but the success score is 1")])
def test_contradictory_labels_are_refused(tmp_path, success, score, fragment):
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "d.hdf5", [EpisodeSpec(4, 1), EpisodeSpec(5, 2, success=success, score=score)],
                          success_attrs=True)
    with pytest.raises(DataError, match=rf"demo_1.*{fragment}"):
        convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), val_fraction=0.0, text_encoder="none",
                progress=False)


def test_lerobot_video_window_shorter_than_the_rows_is_refused(tmp_path):
    """Issue 22, finding 8: a LeRobot v3 episode whose video window (``to_timestamp``) is shorter than its rows
    converted without a word (its last rows read the next episode's frames)."""
    import pyarrow.parquet as pq

    from ..fixtures.lerobot_factory import write_lerobot_specs

    emb = write_embodiment(tmp_path)
    src = write_lerobot_specs(tmp_path / "ds", [EpisodeSpec(6, 1), EpisodeSpec(5, 2)], version="v3.0",
                              episodes_per_file=2)
    meta = next((src / "meta" / "episodes").glob("**/*.parquet"))
    table = pq.read_table(meta)
    column = "videos/observation.images.front/to_timestamp"
    ends = table[column].to_pylist()
    ends[0] -= 2 / 10  # two frames short at 10 fps
    import pyarrow as pa

    field = table.schema.get_field_index(column)
    pq.write_table(table.set_column(field, column, pa.array(ends, type=table.schema.field(column).type)), meta)
    with pytest.raises(DataError, match=r"episode episode_000000: key observation.images.front: video window "
                                        r"from_timestamp 0 .. to_timestamp 0.4 .* is shorter than the episode's "
                                        r"6 rows"):
        convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), format="lerobot", val_fraction=0.0,
                text_encoder="none", progress=False)


def test_the_held_out_split_keeps_successes_and_failures_in_proportion(tmp_path, capsys):
    """Issue 22, finding 15: the split ignored outcomes; the three-task recipe held out no failure, so the
    held-out value AUROC was undefined. Now each outcome is held out in proportion (at least one of each
    class that has two episodes), for every seed; a class too small to hold out is reported."""
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(4, i, success=i not in (3, 7)) for i in range(10)]  # 8 successes, 2 failures
    src = write_robomimic(tmp_path / "d.hdf5", specs)
    for seed in range(5):
        manifest = convert(str(src), output=str(tmp_path / f"out{seed}"), embodiment=str(emb), val_fraction=0.2,
                           seed=seed, text_encoder="none", progress=False)
        held_out = manifest["counts"]["validation"]
        assert (held_out["successes"], held_out["failures"]) == (1, 1), (seed, held_out)
    one = write_robomimic(tmp_path / "one.hdf5", [EpisodeSpec(4, i, success=i != 2) for i in range(6)])
    capsys.readouterr()
    manifest = convert(str(one), output=str(tmp_path / "one"), embodiment=str(emb), val_fraction=0.3,
                       text_encoder="none", progress=False)
    assert manifest["counts"]["train"]["failures"] == 1 and manifest["counts"]["validation"]["failures"] == 0
    assert "the only failed episode stays in training; no failed episode is held out" in capsys.readouterr().err
