"""The source-format registry (``data/sources/registry.py``) is the one list of formats: every registered
format converts through ``cosmos-policy convert --format``, an unregistered one is refused in one line
naming the registered ones, and a reader's ``directory_is_one_source`` / ``source_markers`` decide how a
directory is discovered (a reader defined here and registered for one test shows it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.episode import Episode, build_episode
from cosmos_policy_lightning.data.schema import sanitize_episode_id
from cosmos_policy_lightning.data.sources import READERS, LabelOptions, open_source
from cosmos_policy_lightning.data.sources.base import EpisodeRef, SourceReader
from cosmos_policy_lightning.embodiment import Embodiment

from ..fixtures.convert_checks import check_conversion
from ..fixtures.factories import (CAMERAS, GAMMA, K, EpisodeSpec, episode_arrays, proprio_of, write_embodiment,
                        write_episode_dir, write_robomimic, write_zarr)
from ..fixtures.lerobot_factory import write_lerobot_specs

SPECS = [EpisodeSpec(4, 1), EpisodeSpec(3, 2, success=False)]

#: A small real source per registered format (tests/fixtures/factories.py, tests/fixtures/lerobot_factory.py). A format
#: registered without an entry here fails test_every_registered_format_has_a_test_writer.
WRITERS = {
    "robomimic": lambda d: write_robomimic(d / "demos.hdf5", SPECS),
    "episode_hdf5": lambda d: write_episode_dir(d / "episodes", SPECS, rollout_attrs=True),
    "zarr": lambda d: write_zarr(d / "replay.zarr", SPECS, success_meta=True),
    "lerobot": lambda d: write_lerobot_specs(d / "lerobot", SPECS),
}


def _convert_args(src: Path, out: Path, emb: Path, fmt: str) -> list[str]:
    return ["convert", str(src), "--format", fmt, "--output", str(out), "--embodiment", str(emb),
            "--val_fraction", "0", "--text_encoder", "none", "--progress", "false"]


def test_every_registered_format_has_a_test_writer():
    assert set(WRITERS) == set(READERS)


@pytest.mark.parametrize("fmt", list(READERS))
def test_every_registered_format_converts_through_the_cli(fmt, tmp_path):
    src = WRITERS[fmt](tmp_path)
    emb = write_embodiment(tmp_path)
    assert main(_convert_args(src, tmp_path / "out", emb, fmt)) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["format"] == fmt
    assert manifest["counts"]["train"]["episodes"] == len(SPECS)
    assert manifest["counts"]["train"]["samples"] == sum(s.length for s in SPECS)


def test_help_lists_every_registered_format_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for name, cls in READERS.items():
        assert f"{name} ({cls.summary})" in text


def test_unregistered_format_is_refused_in_one_line_naming_the_registered_ones(tmp_path, capsys):
    src = write_robomimic(tmp_path / "demos.hdf5", SPECS)
    emb = write_embodiment(tmp_path)
    assert main(_convert_args(src, tmp_path / "out", emb, "hdf5")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --format: expected one of {', '.join(READERS)}, got 'hdf5'"
    assert not (tmp_path / "out").exists()  # refused before anything is read or written


# ------------------------------------------------------------------------------ a reader defined here
MARKER = "episode.json"


class NpyDirReader(SourceReader):
    """One directory per episode: ``episode.json`` (``{"success": bool}``) and one ``<key>.npy`` per key."""

    summary = "test: one directory of .npy arrays per episode"
    suffixes = (MARKER,)  # when directories are not sources, the search finds the marker files instead
    directory_is_one_source = True
    source_markers = (MARKER,)

    def list_episodes(self) -> list[EpisodeRef]:
        return [EpisodeRef(sanitize_episode_id(p.name), str(p), None, (p.name,)) for p in self.paths]

    def _open(self, ref: EpisodeRef) -> Episode:
        d = Path(ref.path)
        episode = build_episode(
            episode_id=ref.episode_id, source=ref.path, embodiment=self.embodiment,
            actions=(self.keys.action, np.load(d / f"{self.keys.action}.npy")),
            proprio=[(k, np.load(d / f"{k}.npy")) for k in self.keys.proprio],
            cameras={cam: (k, np.load(d / f"{k}.npy")) for cam, k in self.keys.cameras.items()},
            aliases=ref.aliases)
        return self.labeler.label(episode, ref, [json.loads((d / MARKER).read_text())], per_episode_file=True)


def _write_npy_episode(directory: Path, spec: EpisodeSpec) -> None:
    directory.mkdir(parents=True)
    arrays = episode_arrays(spec)
    np.save(directory / "action.npy", arrays["actions"])
    np.save(directory / "state.npy", proprio_of(arrays))
    for cam in CAMERAS:
        np.save(directory / f"{cam}.npy", arrays[cam])
    (directory / MARKER).write_text(json.dumps({"success": spec.success}))


@pytest.fixture
def npy_dirs(tmp_path, monkeypatch):
    """``root/{a/ep_one, b/ep_two, ep_three}`` registered as format ``npy_dirs`` for this test only."""
    monkeypatch.setitem(READERS, "npy_dirs", NpyDirReader)
    root = tmp_path / "root"
    specs = {"ep_one": EpisodeSpec(4, 1), "ep_two": EpisodeSpec(3, 2, success=False), "ep_three": EpisodeSpec(5, 3)}
    for rel, (eid, spec) in zip(("a/ep_one", "b/ep_two", "ep_three"), specs.items()):
        _write_npy_episode(root / rel, spec)
    (root / "notes").mkdir()  # a directory without the marker is searched, not taken as a source
    (root / "notes" / "readme.txt").write_text("not an episode")
    return root, specs


def _overrides() -> list[str]:
    return ["--camera_keys", "{wrist: wrist, front: front}", "--proprio_keys", "[state]", "--action_key", "action"]


def test_a_format_registered_at_run_time_converts_through_the_cli(npy_dirs, tmp_path):
    root, specs = npy_dirs
    emb = write_embodiment(tmp_path)
    assert main(_convert_args(root, tmp_path / "out", emb, "npy_dirs") + _overrides()) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["paths"] == [str((root / p).resolve()) for p in ("a/ep_one", "b/ep_two", "ep_three")]
    check_conversion(tmp_path / "out", specs, chunk_size=K, gamma=GAMMA)


def test_directory_is_one_source_drives_discovery(npy_dirs, tmp_path, monkeypatch):
    root, _ = npy_dirs
    emb = Embodiment.from_yaml(write_embodiment(tmp_path))
    keys = dict(camera_keys={c: c for c in CAMERAS}, proprio_keys=["state"], action_key="action")

    def paths(source: Path) -> list[Path]:
        with open_source("npy_dirs", str(source), emb, LabelOptions(), **keys) as reader:
            return reader.paths

    # a directory holding the marker is one source; a folder above is searched for such directories
    assert paths(root / "a" / "ep_one") == [(root / "a" / "ep_one").resolve()]
    assert paths(root) == [(root / p).resolve() for p in ("a/ep_one", "b/ep_two", "ep_three")]
    # the same reader with the attribute off: directories are only searched, for files ending in suffixes
    monkeypatch.setattr(NpyDirReader, "directory_is_one_source", False)
    assert paths(root / "a" / "ep_one") == [(root / "a" / "ep_one" / MARKER).resolve()]
    assert paths(root) == [(root / p / MARKER).resolve() for p in ("a/ep_one", "b/ep_two", "ep_three")]
