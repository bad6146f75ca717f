"""The latent cache is derived data and is never stale or mixed (issue 22, findings 1, 2, 3, 10, 12):
one lock order covers a dataset and its cache, ``convert --overwrite`` deletes the cache, the cache's
fingerprint covers the content it encodes, statistics edited by hand are refused, and a damaged shard
(pixel or latent) is never read silently -- the build re-encodes a damaged latent shard, training names
the command that rebuilds it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.data.dataset_info import read_dataset_info
from cosmos_policy_lightning.data.latent_cache import dataset_content, read_cache_manifest
from cosmos_policy_lightning.data.integrity import file_sha256
from cosmos_policy_lightning.errors import DataError
from cosmos_policy_lightning.locking import folder_lock
from cosmos_policy_lightning.model.vae import VideoVAE
from cosmos_policy_lightning.training.prepare import prepare_latent_cache

from ..fixtures.checkpoint_factory import tiny_vae_dir
from ..fixtures.factories import EpisodeSpec, write_embodiment, write_robomimic
from .faults import REPO, cli_command, one_line_error

ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _source(path: Path, seed0: int) -> Path:
    return write_robomimic(path, [EpisodeSpec(5, seed0 + i, success=i % 3 != 0) for i in range(6)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A converted dataset with a finished latent cache (tiny VAE), copied by each test."""
    root = tmp_path_factory.mktemp("cachefaults")
    emb = write_embodiment(root)
    src, other = _source(root / "a.hdf5", 0), _source(root / "b.hdf5", 50)
    convert(str(src), output=str(root / "data"), embodiment=str(emb), val_fraction=0.3, shard_size_mb=0.02,
            text_encoder="none", progress=False)
    vae = str(tiny_vae_dir(root))
    prepare_latent_cache(_dm(root / "data", vae), VideoVAE(vae))
    return root, emb, src, other, vae


def _dm(data: Path, vae: str, **kw) -> CosmosDataModule:
    return CosmosDataModule(str(data), num_workers=0, batch_size=2, latent_cache=True, vae=vae, latent_views=1,
                            **kw)


def _flip(shard: Path, member_suffix: str) -> None:
    """Flip one bit inside the data of the first member whose name ends with ``member_suffix`` (the tar
    headers stay valid: only a checksum can tell)."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(member_suffix))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0x01
    shard.write_bytes(bytes(raw))


def _copy(base, tmp: Path) -> Path:
    shutil.copytree(base[0] / "data", tmp / "data")
    return tmp / "data"


def _convert_args(src: Path, emb: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", src, "--embodiment", emb, "--output", out, "--val_fraction", "0.3", "--shard_size_mb",
            "0.02", "--text_encoder", "none", "--progress", "false", *extra]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(cli_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV})


def test_convert_overwrite_deletes_the_cache_and_a_stale_cache_is_refused(base, tmp_path):
    """Finding 2: ``convert --overwrite`` used to leave ``latents/`` in place and ``fit`` trained on the
    old data. Now the cache goes with the old shards, and a cache kept elsewhere is refused as stale by
    its content fingerprint."""
    root, emb, _, other, vae = base
    data = _copy(base, tmp_path)
    elsewhere = tmp_path / "cache_elsewhere"
    shutil.copytree(data / "latents", elsewhere)
    convert(str(other), output=str(data), embodiment=str(emb), val_fraction=0.3, shard_size_mb=0.02,
            text_encoder="none", progress=False, overwrite=True)
    assert not (data / "latents").exists()
    with pytest.raises(DataError, match=r"the latent cache is stale: it encodes other shards or statistics"):
        _dm(data, vae, latent_dir=str(elsewhere)).setup("fit")
    # rebuilt: it now encodes the new content
    prepare_latent_cache(_dm(data, vae), VideoVAE(vae))
    fp = read_cache_manifest(data / "latents")["fingerprint"]
    assert fp["content"] == dataset_content(read_dataset_info(data))


def test_statistics_edited_by_hand_are_refused(base, tmp_path):
    """Finding 2: ``stats.json`` carried no checksum; edited by hand it was trained on silently."""
    data = _copy(base, tmp_path)
    stats = json.loads((data / "stats.json").read_text())
    stats["successful"]["action"]["max"][0] *= 2
    (data / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(DataError, match=r"stats.json: content differs from the stats_sha256 recorded in"):
        read_dataset_info(data)


def test_cache_build_and_convert_overwrite_exclude_each_other(base, tmp_path):
    """Finding 1: the cache locked only ``DATA/latents`` and convert only ``DATA``, so both ran and the cache
    said complete with latents of old and new data. Now the build holds the dataset's lock first: while
    it runs, ``convert --overwrite`` is refused at once, and the cache that ends encodes one dataset."""
    root, emb, _, other, vae = base
    data = _copy(base, tmp_path)
    shutil.rmtree(data / "latents")
    # The test holds the cache folder's lock: the build takes the dataset's lock, then waits here.
    with folder_lock(data / "latents", "test"):
        build = subprocess.Popen(cli_command(["cache-latents", data, "--vae", vae, "--augment_views", "1"]),
                                 cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**__import__("os").environ, **ENV})
        try:
            line = build.stderr.readline()  # the build's "waiting" line: it holds the dataset's lock now
            assert "another process is writing a latent cache here; waiting" in line, line
            started = time.monotonic()
            done = _run(_convert_args(other, emb, data, "--overwrite"))
            assert done.returncode == 2, done.stderr[-2000:]
            one_line_error(done.stderr, "another process is", "latent cache")
            assert time.monotonic() - started < 120  # refused, not after waiting for the build
        except BaseException:
            build.kill()
            raise
    out, err = build.communicate(timeout=300)
    assert build.returncode == 0, err[-2000:]
    info = read_dataset_info(data)
    manifest = read_cache_manifest(data / "latents")
    assert manifest["status"] == "complete"
    assert manifest["fingerprint"]["content"] == dataset_content(info)
    assert read_dataset_info(data).manifest["source"]["argument"].endswith("a.hdf5")  # the old data, untouched


def test_a_build_with_other_options_is_refused_at_once(base, tmp_path):
    """Finding 12: a second ``cache-latents`` with other options waited for the running build before it was
    refused. The test plays the running build: it holds the dataset's lock with the build's manifest
    (status incomplete) in place."""
    root, _, _, _, vae = base
    data = _copy(base, tmp_path)
    manifest = json.loads((data / "latents" / "manifest.json").read_text())
    (data / "latents" / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    with folder_lock(data, "test"):
        done = _run(["cache-latents", data, "--vae", vae, "--augment_views", "3"], timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    one_line_error(done.stderr, "another process is building a latent cache here with other options",
                   "augment_views (cache 1, expected 3)")


def test_a_damaged_latent_shard_is_rebuilt_by_the_build_and_named_by_training(base, tmp_path):
    """Finding 10: a truncated latent shard said "convert the dataset again" (the pixel data is fine) and
    ``cache-latents`` did not notice it behind a complete manifest. Finding 3 for the cache: flipped bytes
    were trained on. Now training names the rebuild command, and the build re-encodes the shard."""
    root, _, _, _, vae = base
    data = _copy(base, tmp_path)
    entries = read_cache_manifest(data / "latents")["shards"]
    cut, flipped = data / "latents" / entries[0]["name"], data / "latents" / entries[1]["name"]
    cut.write_bytes(cut.read_bytes()[:-3000])
    with pytest.raises(DataError, match=rf"{cut.name}: truncated: .*rebuild the latent cache: cosmos-policy "
                                        rf"cache-latents {data} --vae {vae}"):
        _dm(data, vae).setup("fit")
    _flip(flipped, "latents.npy")
    done = _run(["cache-latents", data, "--vae", vae, "--augment_views", "1"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("latent shard damaged") == 2
    rebuilt = {e["name"]: e for e in read_cache_manifest(data / "latents")["shards"]}
    assert rebuilt[cut.name]["bytes"] == cut.stat().st_size == entries[0]["bytes"]
    assert rebuilt[flipped.name]["sha256"] == file_sha256(flipped)  # encoded again, intact
    dm = _dm(data, vae)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["latents"].shape[0] == 2
    # training reads the checksum before using a shard's first sample
    _flip(flipped, "latents.npy")
    dm = _dm(data, vae)
    dm.setup("fit")
    with pytest.raises(DataError, match=rf"{flipped.name}: checksum mismatch.*rebuild the latent cache"):
        for _ in zip(range(50), dm.train_dataloader()):
            pass


def test_flipped_byte_in_a_pixel_shard_is_never_trained_on(base, tmp_path):
    """Finding 3: one flipped byte in a pixel shard was trained on (only ``verify`` read the checksum).
    Now the data module hashes each shard before yielding its first sample."""
    root, _, _, _, vae = base
    data = _copy(base, tmp_path)
    entry = json.loads((data / "manifest.json").read_text())["shards"][0]
    _flip(data / entry["name"], ".jpg")
    dm = CosmosDataModule(str(data), num_workers=0, batch_size=2)
    dm.setup("fit")
    with pytest.raises(DataError, match=rf"{entry['name']}: checksum mismatch: .*convert the dataset again"):
        for _ in zip(range(50), dm.train_dataloader()):
            pass
    # opting out is possible (sizes and sample counts only), and the bytes then pass unnoticed
    dm = CosmosDataModule(str(data), num_workers=0, batch_size=2, check_sha256=False)
    dm.setup("fit")
    assert len(list(zip(range(3), dm.train_dataloader()))) == 3
