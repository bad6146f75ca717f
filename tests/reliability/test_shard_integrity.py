"""Shard integrity (issue 14, item 5): the manifest records each shard's sample count, size and SHA-256;
the data module checks sizes at set-up and sample counts while reading; a truncated shard is one line
naming the shard -- for pixel shards and for the latent cache."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.data.integrity import check_shard_sizes, verify_checksums
from cosmos_policy_lightning.errors import DataError

from ..fixtures.factories import EpisodeSpec, write_embodiment, write_robomimic
from ..fixtures.shard_factory import standard_episodes, write_dataset


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A real conversion: 10 robomimic episodes, 3 held out, small shards."""
    root = tmp_path_factory.mktemp("conv")
    emb = write_embodiment(root)
    src = write_robomimic(root / "d.hdf5", [EpisodeSpec(5 + i % 3, i, success=i % 3 != 0) for i in range(10)])
    convert(str(src), output=str(root / "out"), embodiment=str(emb), val_fraction=0.3, shard_size_mb=0.05,
            text_encoder="none", progress=False)
    return root / "out"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _member_offsets(path: Path) -> list[tuple[str, int]]:
    """``(member name, offset of its header)`` of every member of a tar, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset) for m in tar]


def _cut_at_sample(path: Path, samples_kept: int) -> int:
    """Truncate a shard right before the first member of sample ``samples_kept`` (a clean sample
    boundary: what a reader sees as a shorter, valid-looking tar). Returns the samples it had."""
    keys, cut = [], None
    for name, offset in _member_offsets(path):
        key = name.split(".", 1)[0]
        if key not in keys:
            keys.append(key)
            if len(keys) == samples_kept + 1:
                cut = offset
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    return len(keys)


def _drop_size_records(data_dir: Path) -> None:
    """A manifest as older conversions wrote it: no ``bytes`` / ``sha256`` per shard."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("bytes", None)
        entry.pop("sha256", None)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def _module(data_dir: Path, **kw) -> CosmosDataModule:
    return CosmosDataModule(str(data_dir), batch_size=2, num_workers=0, shuffle_buffer=4, augment=False, **kw)


def test_manifest_records_samples_bytes_and_checksum(converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3
    for entry in manifest["shards"]:
        path = converted / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with tarfile.open(path) as tar:
            assert entry["samples"] == len({m.name.split(".", 1)[0] for m in tar})
    listed = [(converted / e["name"], e["sha256"]) for e in manifest["shards"]]
    assert verify_checksums(listed, converted / "manifest.json") == len(listed)


def test_flipped_byte_fails_the_checksum(converted, tmp_path):
    data = _copy(converted, tmp_path / "d")
    entry = json.loads((data / "manifest.json").read_text())["shards"][0]
    raw = bytearray((data / entry["name"]).read_bytes())
    raw[700] ^= 0xFF
    (data / entry["name"]).write_bytes(bytes(raw))
    check_shard_sizes([(data / entry["name"], entry["bytes"])], data / "manifest.json")  # same size: passes
    with pytest.raises(DataError, match=rf"{entry['name']}: checksum mismatch"):
        verify_checksums([(data / entry["name"], entry["sha256"])], data / "manifest.json")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_truncated_shard_is_refused_at_setup_with_sizes(converted, tmp_path, split):
    """Cut at a sample boundary (the case that silently lost samples): refused by size at set-up."""
    data = _copy(converted, tmp_path / "d")
    entry = next(e for e in json.loads((data / "manifest.json").read_text())["shards"] if e["split"] == split)
    _cut_at_sample(data / entry["name"], 1)
    size = (data / entry["name"]).stat().st_size
    with pytest.raises(DataError, match=rf"{entry['name']}: truncated: expected {entry['bytes']} bytes, got {size}") as err:
        _module(data).setup("fit")
    assert "\n" not in str(err.value)


def test_cut_at_a_sample_boundary_is_found_while_reading(converted, tmp_path):
    """Without recorded sizes (an older manifest), the sample count catches it: validation read 20 of
    41 samples silently before."""
    data = _copy(converted, tmp_path / "d")
    _drop_size_records(data)
    entry = next(e for e in json.loads((data / "manifest.json").read_text())["shards"] if e["split"] == "validation")
    had = _cut_at_sample(data / entry["name"], 2)
    assert had == entry["samples"] > 2
    dm = _module(data)
    dm.setup("validate")
    with pytest.raises(DataError, match=rf"{entry['name']}: truncated: expected {had} samples, read 2") as err:
        list(dm.val_dataloader())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_cut_inside_a_member_is_one_line_naming_the_shard(converted, tmp_path, split):
    """A tar that ends inside a member: was a tarfile.ReadError traceback (validation) or a 'missing
    member meta.json' after 37 steps (training)."""
    data = _copy(converted, tmp_path / "d")
    _drop_size_records(data)
    shards = [e for e in json.loads((data / "manifest.json").read_text())["shards"] if e["split"] == split]
    for entry in shards:  # every shard of the split, so the resampled training stream meets one at once
        path = data / entry["name"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])
    dm = _module(data)
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    with pytest.raises(DataError, match=rf"{split}-\d+\.tar: (truncated|sample .* lacks member)") \
            as err:
        for _ in zip(range(50), loader):
            pass
    assert "\n" not in str(err.value)


def test_cut_inside_member_data_is_a_tar_read_error_in_one_line(converted, tmp_path):
    data = _copy(converted, tmp_path / "d")
    _drop_size_records(data)
    entry = next(e for e in json.loads((data / "manifest.json").read_text())["shards"] if e["split"] == "validation")
    path = data / entry["name"]
    with tarfile.open(path) as tar:
        member = [m for m in tar if m.name.endswith(".jpg")][3]
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    dm = _module(data)
    dm.setup("validate")
    with pytest.raises(DataError, match=rf"{entry['name']}: truncated or corrupt shard: tar read error .* after \d+ of "
                                        rf"{entry['samples']} samples") as err:
        list(dm.val_dataloader())
    assert "\n" not in str(err.value)


def test_shard_factory_datasets_without_sizes_still_load(tmp_path):
    """Manifests without ``bytes`` (hand-written, older conversions) are read as before."""
    write_dataset(tmp_path / "d", standard_episodes(2, 1, 1, 1, length=5))
    dm = _module(tmp_path / "d")
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))["episode"]) == 2
    assert sum(len(b["episode"]) for b in dm.val_dataloader()) == 2 * 5 + 1


def test_latent_cache_records_and_checks_its_shards(tmp_path):
    """The latent cache gets the same guarantees: sizes and checksums recorded, a truncated latent shard
    refused at set-up with the same one line."""
    from cosmos_policy_lightning.model.vae import VideoVAE
    from cosmos_policy_lightning.training.prepare import prepare_latent_cache

    from ..fixtures.checkpoint_factory import tiny_vae_dir

    write_dataset(tmp_path / "d", standard_episodes(2, 1, 1, 1, length=5))
    vae = str(tiny_vae_dir(tmp_path))
    dm = _module(tmp_path / "d", latent_cache=True, vae=vae)
    with pytest.raises(DataError, match="no finished latent cache"):  # the data module only reads caches
        dm.setup("fit")
    prepare_latent_cache(dm, VideoVAE(vae))
    dm.setup("fit")
    cache = json.loads((tmp_path / "d" / "latents" / "manifest.json").read_text())
    assert cache["status"] == "complete"
    for entry in cache["shards"]:
        path = tmp_path / "d" / "latents" / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    shard = tmp_path / "d" / "latents" / cache["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(DataError, match=rf"{shard.name}: truncated: expected {cache['shards'][0]['bytes']} bytes"):
        _module(tmp_path / "d", latent_cache=True, vae=vae).setup("fit")


def test_verify_command_reads_every_shard(converted, tmp_path, capsys):
    """``cosmos-policy verify``: sizes, sample counts and SHA-256 of every shard, one line per bad shard."""
    from cosmos_policy_lightning.cli import main

    from .faults import one_line_error

    assert main(["verify", str(converted)]) == 0
    assert "shards, sizes, sample counts and SHA-256 as recorded" in capsys.readouterr().out
    data = _copy(converted, tmp_path / "d")
    entry = json.loads((data / "manifest.json").read_text())["shards"][1]
    raw = bytearray((data / entry["name"]).read_bytes())
    raw[1000] ^= 0x01  # same size, other bytes: only the checksum can tell
    (data / entry["name"]).write_bytes(bytes(raw))
    assert main(["verify", str(data)]) == 2
    captured = capsys.readouterr()
    assert f"bad shard: {data / entry['name']}: sha256 differs" in captured.out
    one_line_error(captured.err, "1 of", "shards differ from their manifest")


def test_rerun_of_a_finished_conversion_notices_a_damaged_shard(tmp_path):
    """Running the same ``convert`` again says "nothing to do" only while the shards are intact."""
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / "d.hdf5", [EpisodeSpec(5, i) for i in range(4)])
    kw = dict(output=str(tmp_path / "out"), embodiment=str(emb), val_fraction=0.25, text_encoder="none",
              progress=False)
    manifest = convert(str(src), **kw)
    assert convert(str(src), **kw) == manifest
    shard = tmp_path / "out" / manifest["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-10240])
    with pytest.raises(DataError, match=rf"{shard.name}: shard listed in manifest.json is missing or changed"):
        convert(str(src), **kw)
