"""`--format zarr`: Diffusion Policy replay buffers, Zarr format 2 and 3, directory and .zarr.zip,
plain and Jpeg2k-compressed image chunks."""

import pytest

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError

from .convert_checks import check_conversion
from .factories import GAMMA, K, EpisodeSpec, write_embodiment, write_zarr

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
