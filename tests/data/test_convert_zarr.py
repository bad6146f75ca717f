"""`--format zarr`: Diffusion Policy replay buffers, Zarr format 2 and 3, directory and .zarr.zip,
plain and Jpeg2k-compressed image chunks."""

import pytest

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from ..fixtures.convert_checks import check_conversion
from ..fixtures.factories import GAMMA, K, EpisodeSpec, write_embodiment, write_zarr

SPECS = [EpisodeSpec(5, 1), EpisodeSpec(3, 2, success=False), EpisodeSpec(7, 3, success=False, score=0.4)]


@pytest.mark.parametrize("zarr_format,name,jpeg2k", [
    (2, "replay.zarr", False),
    (3, "replay.zarr", False),
    (2, "replay.zarr.zip", False),
    (2, "replay.zarr", True),
    (3, "replay.zarr.zip", True),
])
def test_replay_buffer_round_trip(tmp_path, zarr_format, name, jpeg2k):
    src = write_zarr(tmp_path / name, SPECS, zarr_format=zarr_format, jpeg2k=jpeg2k, success_meta=True)
    emb = write_embodiment(tmp_path)
    manifest = convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), format="zarr",
                       val_episodes=["episode_000001"], instruction="push the T", text_encoder="none",
                       progress=False)
    check_conversion(tmp_path / "out", {f"episode_{i:06d}": s for i, s in enumerate(SPECS)}, chunk_size=K,
                     gamma=GAMMA, instructions={f"episode_{i:06d}": "push the T" for i in range(3)})
    assert manifest["splits"]["validation"] == ["episode_000001"]
    assert manifest["counts"]["train"] == {"episodes": 2, "successes": 1, "failures": 1, "samples": 12, "shards": 1}


def test_image_chunks_straddling_episodes_are_read_once_per_block(tmp_path):
    import zarr

    from cosmos_policy_lightning.data.episode import FrameSource

    src = write_zarr(tmp_path / "r.zarr", SPECS, zarr_format=3, image_chunk=4)
    arr = zarr.open_group(str(src), mode="r")["data/front_img"]
    blocks = FrameSource(arr, "x", 5, 15).blocks(6)  # episode rows 5..14, chunks of 4 rows
    assert blocks == [(0, 3), (3, 10)]  # boundaries on multiples of 8 = 2 chunks
    emb = write_embodiment(tmp_path)
    convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), format="zarr", all_success=True,
            val_fraction=0.0, text_encoder="none", progress=False)
    check_conversion(tmp_path / "out", {f"episode_{i:06d}": s for i, s in enumerate(SPECS)}, chunk_size=K,
                     gamma=GAMMA, successes={f"episode_{i:06d}": True for i in range(3)},
                     scores={f"episode_{i:06d}": 1.0 for i in range(3)})


def test_directory_of_stores(tmp_path):
    write_zarr(tmp_path / "src" / "a.zarr", SPECS[:2], zarr_format=2)
    write_zarr(tmp_path / "src" / "b.zarr.zip", SPECS[2:], zarr_format=3)
    emb = write_embodiment(tmp_path)
    manifest = convert(str(tmp_path / "src"), output=str(tmp_path / "out"), embodiment=str(emb), format="zarr",
                       all_success=True, val_fraction=0.0, text_encoder="none", progress=False)
    assert set(manifest["episodes"]) == {"a-episode_000000", "a-episode_000001", "b-episode_000000"}
    assert manifest["counts"]["train"]["samples"] == 15


def test_unreadable_store_is_one_line(tmp_path):
    store = tmp_path / "broken.zarr"
    store.mkdir()
    (store / ".zgroup").write_text("{not json")
    emb = write_embodiment(tmp_path)
    with pytest.raises(DataError) as err:
        convert(str(store), output=str(tmp_path / "out"), embodiment=str(emb), format="zarr", all_success=True,
                text_encoder="none", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "broken.zarr" in msg and "unreadable Zarr store" in msg


def test_corrupt_image_chunk_names_episode_and_key(tmp_path):
    src = write_zarr(tmp_path / "r.zarr", SPECS, zarr_format=2, jpeg2k=True)
    (src / "data" / "front_img" / "6.0.0.0").write_bytes(b"garbage")  # row 6 = episode 1, step 1
    emb = write_embodiment(tmp_path)
    kw = dict(embodiment=str(emb), format="zarr", all_success=True, text_encoder="none", progress=False,
              val_fraction=0.0)
    with pytest.raises(DataError, match=r"r\.zarr: episode episode_000001: key data/front_img: cannot read frames"):
        convert(str(src), output=str(tmp_path / "out"), **kw)
    manifest = convert(str(src), output=str(tmp_path / "out2"), skip_bad=True, **kw)
    assert list(manifest["bad_episodes"]) == ["episode_000001"]
    assert manifest["counts"]["train"]["episodes"] == 2


def _write_pusht_zarr(path, lengths, seed=0):
    """A replay buffer in the layout of Diffusion Policy's pusht_cchi_v7_replay.zarr (zarr format 2):
    ``data/img (N, 96, 96, 3) float32`` holding 0..255, ``data/state (N, 5)``, ``data/action (N, 2)``,
    ``data/keypoint (N, 9, 2)``, ``data/n_contacts (N, 1)``, ``meta/episode_ends (E,) int64``."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(seed)
    n = sum(lengths)
    arrays = {
        "img": rng.integers(0, 256, size=(n, 96, 96, 3)).astype(np.float32),
        "state": rng.uniform(0, 512, size=(n, 5)).astype(np.float32),
        "action": rng.uniform(0, 512, size=(n, 2)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, size=(n, 9, 2)).astype(np.float32),
        "n_contacts": rng.integers(0, 3, size=(n, 1)).astype(np.float32),
    }
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for name, arr in arrays.items():
        root.create_array(f"data/{name}", data=arr, chunks=(min(n, 100), *arr.shape[1:]))
    root.create_array("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64))
    return arrays


def test_shipped_pusht_embodiment_reads_the_pusht_replay_buffer(tmp_path, capsys):
    """embodiments/pusht.yaml (used by README and docs/convert.md) converts a buffer in Push-T's real layout;
    its float32 0..255 images need --float_image_max 255 and are refused with that hint without it."""
    import numpy as np

    from cosmos_policy_lightning.cli import main
    from cosmos_policy_lightning.data import schema as S

    from ..conftest import EMBODIMENTS
    from ..fixtures.factories import decode_sample, read_split

    src = tmp_path / "pusht_cchi_v7_replay.zarr"
    arrays = _write_pusht_zarr(src, [6, 4])
    args = ["convert", str(src), "--format", "zarr", "--embodiment", str(EMBODIMENTS / "pusht.yaml"),
            "--all_success", "--instruction", "push the T onto the target", "--val_fraction", "0",
            "--text_encoder", "none", "--progress", "false"]
    assert main(args + ["--output", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data/img" in err and "--float_image_max 255" in err, err
    assert main(args + ["--output", str(tmp_path / "out"), "--float_image_max", "255"]) == 0
    samples = sorted((decode_sample(s) for s in read_split(tmp_path / "out", "train")),
                     key=lambda s: (s[S.META]["episode"], s[S.META]["step"]))
    assert len(samples) == 10
    first = samples[0]
    assert first[S.META]["episode"] == "episode_000000" and first[S.META]["step"] == 0
    np.testing.assert_array_equal(first[S.PROPRIO], arrays["state"][0])
    np.testing.assert_array_equal(first[S.ACTIONS][:6], arrays["action"][:6])  # K = 16: padded after step 5
    np.testing.assert_array_equal(first[S.ACTIONS][6:], np.repeat(arrays["action"][5:6], 10, axis=0))
    img = first[S.image_member("top")]
    assert img.shape == (96, 96, 3)
    # JPEG of uniform noise is lossy: the mean level must match 0..255, not saturate (a [0, 1] reading) to white
    assert abs(float(img.mean()) - float(arrays["img"][0].mean())) < 3.0
