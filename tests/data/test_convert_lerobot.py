"""`cosmos-policy convert --format lerobot`: LeRobot datasets v2.1 and v3.0 (real parquet files and
real AV1 / H.264 / HEVC mp4 files written by tests/fixtures/lerobot_factory.py), labels, the same episodes as
robomimic HDF5, bad input, and a Hub dataset id read offline from a Hugging Face cache."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data import schema as S
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.data.sources import LabelOptions, open_source
from cosmos_policy_lightning.data.sources.lerobot import hub_patterns
from cosmos_policy_lightning.embodiment import Embodiment
from cosmos_policy_lightning.errors import DataError

from ..fixtures.convert_checks import check_conversion
from ..fixtures.factories import (CAMERAS, GAMMA, K, EpisodeSpec, decode_sample, episode_arrays, read_split, write_embodiment,
                        write_robomimic)
from ..fixtures.lerobot_factory import DEFAULT_TASK, episode_id, write_dataset_hub_cache, write_lerobot_specs

SPECS = [EpisodeSpec(7, 1, instruction="stack the cups"), EpisodeSpec(5, 2, success=False),
         EpisodeSpec(9, 3, instruction="stack the cups"), EpisodeSpec(4, 4), EpisodeSpec(6, 5, success=False)]
#: mean absolute pixel error allowed after lossy video coding (yuv420p, CRF 20), resizing and JPEG
CODEC_TOLERANCE = 8.0
FAST = dict(text_encoder="none", progress=False)


def _ids(specs):
    return {episode_id(i): s for i, s in enumerate(specs)}


def _instructions(specs):
    return {episode_id(i): s.instruction or DEFAULT_TASK for i, s in enumerate(specs)}


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """v3.0, AV1: three then two episodes per parquet and per mp4 file; the wrist camera stored as PNG
    images inside the parquet; success from next.success."""
    root = tmp_path_factory.mktemp("lerobot_v3")
    emb = write_embodiment(root)
    src = write_lerobot_specs(root / "ds", SPECS, version="v3.0", codec="libsvtav1",
                              image_keys=("observation.images.wrist",), episodes_per_file=3)
    out = root / "out"
    manifest = convert(str(src), output=str(out), embodiment=str(emb), format="lerobot", val_fraction=0.4, **FAST)
    return src, emb, out, manifest


def test_v3_several_episodes_per_file_and_images_in_parquet(v3):
    src, _, out, manifest = v3
    episodes = pq.read_table(src / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    starts = {r["episode_index"]: r["videos/observation.images.front/from_timestamp"] for r in episodes}
    assert starts[1] == pytest.approx(0.7) and starts[2] == pytest.approx(1.2) and starts[4] == pytest.approx(0.4)
    assert sorted(p.name for p in (src / "videos/observation.images.front/chunk-000").iterdir()) == \
        ["file-000.mp4", "file-001.mp4"]
    assert "observation.images.wrist" in pq.read_schema(src / "data/chunk-000/file-000.parquet").names
    check_conversion(out, _ids(SPECS), chunk_size=K, gamma=GAMMA, instructions=_instructions(SPECS),
                     image_tolerance=CODEC_TOLERANCE)
    assert manifest["source"]["format"] == "lerobot"
    assert manifest["settings"]["keys"]["cameras"] == {"wrist": "observation.images.wrist",
                                                       "front": "observation.images.front"}
    assert manifest["settings"]["tolerance_s"] == 1e-4
    assert sum(manifest["counts"][s]["failures"] for s in S.SPLITS) == 2  # from next.success
    assert manifest["instructions"] == [DEFAULT_TASK, "stack the cups"]


def test_explicit_options_win_over_the_success_column(v3):
    src, emb, _, _ = v3
    with open_source("lerobot", str(src), Embodiment.from_yaml(emb), LabelOptions(all_success=True)) as reader:
        refs = reader.list_episodes()
        with reader.open(refs[1]) as episode:
            assert episode.success and episode.score == 1.0
    assert refs[1].aliases[:2] == ("episode_000001", "1")  # a sidecar may use the episode_index


@pytest.mark.parametrize("codec", ["libsvtav1", "libx264", "libx265"])
def test_each_codec_decodes_the_frame_of_each_timestamp_with_one_seek_per_episode(tmp_path, codec):
    """AV1, H.264 and HEVC files holding several episodes: every row gets its own frame (closer to the
    source frame of its step than to the neighbouring steps), decoded sequentially."""
    specs = [EpisodeSpec(6, 1), EpisodeSpec(7, 2), EpisodeSpec(5, 3), EpisodeSpec(6, 4)]
    hw = (40, 64)  # libx265 in PyAV's wheel corrupts memory on 48-pixel-wide frames (see encode_video)
    src = write_lerobot_specs(tmp_path / "ds", specs, version="v3.0", codec=codec, episodes_per_file=4, gop=3, hw=hw)
    emb = Embodiment.from_yaml(write_embodiment(tmp_path))
    with open_source("lerobot", str(src), emb, LabelOptions()) as reader:
        for ref, spec in zip(reader.list_episodes(), specs):
            arrays = episode_arrays(spec, hw)
            with reader.open(ref) as episode:
                for cam in CAMERAS:
                    frames = episode.images[cam]
                    decoded = np.concatenate([np.stack(frames.read(a, b)) for a, b in frames.blocks(4)])
                    assert decoded.shape == arrays[cam].shape
                    err = np.abs(decoded.astype(np.int16)[:, None] - arrays[cam].astype(np.int16)[None]).mean((2, 3, 4))
                    assert np.all(np.argmin(err, axis=1) == np.arange(spec.length)), (ref.episode_id, cam, err)
                    assert err.diagonal().max() < CODEC_TOLERANCE
                    # one seek; open-GOP HEVC keyframes are indexed by decode time, so a seek may land
                    # after the target and is retried once from further back
                    assert frames.data.seeks <= (2 if codec == "libx265" else 1)


def test_v21_h264_gives_the_same_samples_as_robomimic(tmp_path):
    """The same episodes as robomimic HDF5 and as a LeRobot v2.1 dataset (one H.264 mp4 per episode and
    camera, success from next.reward): actions, proprio, values and labels identical, images within
    codec error."""
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(7, 1), EpisodeSpec(5, 2, success=False), EpisodeSpec(6, 3)]
    h5 = write_robomimic(tmp_path / "d.hdf5", specs, problem_instruction=DEFAULT_TASK)
    ds = write_lerobot_specs(tmp_path / "ds", specs, labels="reward", version="v2.1", codec="libx264")
    assert (ds / "meta/episodes.jsonl").is_file() and (ds / "meta/episodes_stats.jsonl").is_file()
    assert (ds / "videos/chunk-000/observation.images.front/episode_000002.mp4").is_file()
    kw = dict(embodiment=str(emb), val_fraction=0.0, **FAST)
    convert(str(h5), output=str(tmp_path / "h5"), format="robomimic", **kw)
    convert(str(ds), output=str(tmp_path / "lr"), format="lerobot", **kw)
    a = {s["__key__"]: decode_sample(s) for s in read_split(tmp_path / "h5", "train")}
    b = {s["__key__"]: decode_sample(s) for s in read_split(tmp_path / "lr", "train")}
    assert len(a) == len(b) == sum(s.length for s in specs)
    for i, spec in enumerate(specs):
        for t in range(spec.length):
            x, y = a[S.sample_key(f"demo_{i}", t)], b[S.sample_key(episode_id(i), t)]
            for member in (S.ACTIONS, S.PROPRIO, S.FUTURE_PROPRIO):
                assert x[member].tobytes() == y[member].tobytes()
            mx, my = dict(x[S.META]), dict(y[S.META])
            assert mx.pop("episode") == f"demo_{i}" and my.pop("episode") == episode_id(i)
            assert mx == my  # step, future step, length, success, score, value, instruction
            for cam in CAMERAS:
                for name in (S.image_member(cam), S.image_member(cam, future=True)):
                    diff = np.abs(x[name].astype(np.int16) - y[name].astype(np.int16)).mean()
                    assert diff < CODEC_TOLERANCE, (i, t, name, diff)


def test_sidecar_names_episodes_by_index_and_tasks_from_a_pandas_index(tmp_path):
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(4, s, instruction=f"task {s % 2}") for s in range(4)]
    src = write_lerobot_specs(tmp_path / "ds", specs, labels="none", version="v3.0", codec="libx264",
                              task_column="__index_level_0__")
    assert "__index_level_0__" in pq.read_schema(src / "meta/tasks.parquet").names
    with pytest.raises(DataError, match=r"episode episode_00000\d: no success label .* pass --all_success, "
                                        r"--success_sidecar or --success_regex"):
        convert(str(src), output=str(tmp_path / "none"), embodiment=str(emb), format="lerobot", **FAST)
    sidecar = tmp_path / "labels.json"
    sidecar.write_text(json.dumps([{"episode": 0, "success": True}, {"episode": "1", "success": False},
                                   {"episode": 2, "score": 0.5}, {"episode": "episode_000003", "success": True}]))
    manifest = convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), format="lerobot",
                       success_sidecar=str(sidecar), val_episodes=["3"], **FAST)
    eps = manifest["episodes"]
    assert [(eps[episode_id(i)]["success"], eps[episode_id(i)]["score"]) for i in range(4)] == \
        [(True, 1.0), (False, 0.0), (False, 0.5), (True, 1.0)]
    assert manifest["splits"]["validation"] == [episode_id(3)]
    assert [eps[episode_id(i)]["instruction"] for i in range(4)] == ["task 0", "task 1", "task 0", "task 1"]


# ------------------------------------------------------------------------------------------ bad input
def _dataset(tmp_path, specs=None, **kw):
    emb = write_embodiment(tmp_path)
    kw = {"version": "v2.1", "codec": "libx264", **kw}
    return write_lerobot_specs(tmp_path / "ds", specs or [EpisodeSpec(4, 1), EpisodeSpec(5, 2), EpisodeSpec(4, 3)],
                               **kw), emb


def test_missing_video_file_is_one_line_or_skipped(tmp_path):
    src, emb = _dataset(tmp_path)
    video = src / "videos/chunk-000/observation.images.front/episode_000001.mp4"
    video.unlink()
    with pytest.raises(DataError) as info:
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), format="lerobot", **FAST)
    text = str(info.value)
    assert "\n" not in text
    assert text == f"{src}: episode episode_000001: key observation.images.front: video file {video} not found"
    manifest = convert(str(src), output=str(tmp_path / "o2"), embodiment=str(emb), format="lerobot",
                       skip_bad=True, val_fraction=0.0, **FAST)
    assert list(manifest["bad_episodes"]) == [episode_id(1)]
    assert manifest["counts"]["train"]["episodes"] == 2


def test_timestamps_out_of_tolerance(tmp_path):
    src, emb = _dataset(tmp_path, timestamp_shift={2: 0.003})
    with pytest.raises(DataError) as info:
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), format="lerobot", **FAST)
    text = str(info.value)
    assert "\n" not in text
    assert (f"{src}: episode episode_000002: key observation.images." in text
            and "within 0.0001 s of timestamp 0.0030 s (step 0;" in text and "nearest frame at 0.0000 s" in text)
    # a looser tolerance accepts the shifted timestamps
    manifest = convert(str(src), output=str(tmp_path / "o2"), embodiment=str(emb), format="lerobot",
                       tolerance_s=0.005, **FAST)
    assert manifest["counts"]["bad_episodes"] == 0 and manifest["settings"]["tolerance_s"] == 0.005


def test_wrong_state_dimension(tmp_path):
    wide = [EpisodeSpec(4, s, override={"gripper": np.zeros((4, 2), np.float32)}) for s in (1, 2)]
    src, emb = _dataset(tmp_path, specs=wide)
    with pytest.raises(DataError, match=r"episode episode_000000: key observation.state: proprio dims 5 = 5, "
                                        r"expected proprio dim 4 \(embodiment toy\)"):
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), format="lerobot", **FAST)


def test_unknown_version_and_unknown_feature_on_the_command_line(tmp_path, capsys):
    src, emb = _dataset(tmp_path, codebase_version="v1.6")
    args = ["convert", str(src), "--format", "lerobot", "--embodiment", str(emb), "--output", str(tmp_path / "o"),
            "--text_encoder", "none", "--progress", "false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {src}/meta/info.json: codebase_version 'v1.6' is not supported "
                   f"(expected one of v2.0, v2.1, v3.0)")
    src2, _ = _dataset(tmp_path / "b")
    assert main([args[0], str(src2), *args[2:], "--camera_keys", "{front: observation.images.top}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src2}/meta/info.json: key observation.images.top is not "
                                               f"a feature of this dataset; features: action, ")
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "notes.txt").write_text("no dataset here")
    assert main([args[0], str(tmp_path / "nodata"), *args[2:]]) == 2
    assert "no meta/info.json files in this directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the Hub
def test_hub_patterns_fetch_metadata_data_and_the_needed_videos_only():
    info = {"data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": {"observation.images.top": {"dtype": "video"}, "observation.images.wrist": {"dtype": "image"},
                         "observation.images.side": {"dtype": "video"}}}
    assert hub_patterns(info, ["observation.images.top", "observation.images.wrist"]) == \
        ["meta/*", "data/chunk-*/file-*.parquet", "videos/observation.images.top/chunk-*/file-*.mp4"]
    v21 = {"data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
           "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
           "features": {"observation.images.top": {"dtype": "video"}}}
    assert hub_patterns(v21, ["observation.images.top"])[1:] == \
        ["data/chunk-*/episode_*.parquet", "videos/chunk-*/observation.images.top/episode_*.mp4"]


def test_hub_dataset_id_offline_from_a_filled_cache(tmp_path):
    """The CLI in a fresh process, HF_HUB_OFFLINE=1, the dataset only in a Hugging Face cache laid out as
    huggingface_hub writes it: ``org/name`` and ``hf://datasets/org/name`` with ``--revision``."""
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(4, 1), EpisodeSpec(5, 2, success=False), EpisodeSpec(4, 3)]
    ds = write_lerobot_specs(tmp_path / "ds", specs, version="v3.0", codec="libx264", episodes_per_file=2)
    commit = "a" * 40
    snap = write_dataset_hub_cache(tmp_path / "hf", "toy-org/toy_dataset", ds, commit=commit)
    assert (snap / "meta/info.json").is_symlink()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = ("import sys; from cosmos_policy_lightning.cli import main; "
            "sys.exit(max(main(a.split('|')) for a in sys.argv[1:]))")
    common = f"--format|lerobot|--embodiment|{emb}|--text_encoder|none|--progress|false|--val_fraction|0"
    runs = [f"convert|toy-org/toy_dataset|--output|{tmp_path / 'a'}|{common}",
            f"convert|hf://datasets/toy-org/toy_dataset|--revision|main|--output|{tmp_path / 'b'}|{common}",
            f"convert|hf://datasets/toy-org/missing|--output|{tmp_path / 'c'}|{common}"]
    proc = subprocess.run([sys.executable, "-c", code, *runs], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]  # the third run: not in the cache
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: hf://datasets/toy-org/missing: cannot fetch the Hub "
                                                     "dataset (revision main): ")
    for out in ("a", "b"):
        manifest = json.loads((tmp_path / out / S.MANIFEST).read_text())
        assert manifest["status"] == "complete" and manifest["source"]["paths"] == [str(snap)]
        assert manifest["counts"]["train"]["episodes"] == 3 and manifest["counts"]["train"]["failures"] == 1
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (tmp_path / "b" / "train-000000.tar").read_bytes()


def test_revision_needs_a_hub_dataset_and_a_mistyped_folder_is_named(tmp_path, monkeypatch):
    src, emb = _dataset(tmp_path)
    with pytest.raises(DataError, match="--revision 'v3.0' only applies to a Hub dataset id"):
        convert(str(src), output=str(tmp_path / "o"), embodiment=str(emb), format="lerobot", revision="v3.0", **FAST)
    monkeypatch.chdir(tmp_path)  # "data/pusht": no such folder here, nor a Hub dataset (offline: conftest.py)
    with pytest.raises(DataError, match=r"^hf://datasets/data/pusht: cannot fetch the Hub dataset .* "
                                        r"\(and there is no local folder data/pusht\)$"):
        convert("data/pusht", output=str(tmp_path / "o"), embodiment=str(emb), format="lerobot", **FAST)


# ------------------------------------------------------------------------------------------ the bundled sample
def test_bundled_lerobot_sample_matches_the_robomimic_sample(repo):
    """samples/lerobot_metaworld is the Meta-World sample exported as LeRobot v3.0 (AV1 at LeRobot's
    CRF 30): every episode has the same actions, proprio, success and instruction, and its frames agree
    with the robomimic frames within codec error."""
    emb = Embodiment.from_yaml(repo / "embodiments/metaworld.yaml")
    h5 = open_source("robomimic", str(repo / "samples/metaworld"), emb, LabelOptions())
    lr = open_source("lerobot", str(repo / "samples/lerobot_metaworld"), emb, LabelOptions())
    with h5, lr:
        a, b = h5.list_episodes(), lr.list_episodes()
        assert len(a) == len(b) == 24
        errors = []
        for ra, rb in zip(a, b):
            with h5.open(ra) as x, lr.open(rb) as y:
                np.testing.assert_array_equal(x.actions, y.actions)
                np.testing.assert_array_equal(x.proprio, y.proprio)
                assert (x.success, x.score, x.instruction) == (y.success, y.score, y.instruction)
                for cam in emb.camera_names:
                    fx = np.stack(x.images[cam].read(0, x.length)).astype(np.int16)
                    fy = np.stack(y.images[cam].read(0, y.length)).astype(np.int16)
                    errors.append(np.abs(fx - fy).mean())
        assert max(errors) < 6.0, max(errors)
