"""A converted dataset read from a URL (``storage.py``) trains, tests and resumes exactly as its local copy:
served over HTTP from 127.0.0.1 by the standard library's server, and from fsspec's in-memory filesystem.
Real shards, real Trainer, real LightningCLI; the integrity checks (sizes at set-up, sample counts and
SHA-256 while streaming) hold for remote shards too."""

from __future__ import annotations

import functools
import json
import http.server
import shutil
import threading
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.datamodule import CosmosDataModule
from cosmos_policy_lightning.data.integrity import scan_shard
from cosmos_policy_lightning.data.dataset_info import read_dataset_info
from cosmos_policy_lightning.errors import DataError
from cosmos_policy_lightning.storage import file_size, is_url, join, location, open_binary

from ..fixtures.cli_config import cli_override
from ..fixtures.recorder import fit_recorder
from ..fixtures.shard_factory import standard_episodes, write_dataset

REPO = Path(__file__).resolve().parents[2]
HALF, BATCH = 6, 4


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log in the test output
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a loader abandoned mid-shard (a test stops reading) resets its connection


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``serve(folder) -> URL``: serves folders over HTTP on 127.0.0.1 (one server per folder)."""
    servers = []

    def serve(folder: Path) -> str:
        server = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    write_dataset(root / "data", standard_episodes(6, 2, 1, 1, length=10))
    return root


@pytest.fixture(scope="module", params=["http", "memory"])
def remote(request, dataset, served) -> str:
    """The dataset's URL: over HTTP, or copied into fsspec's memory filesystem."""
    if request.param == "http":
        yield served(dataset) + "/data"
        return
    fs = fsspec.filesystem("memory")
    fs.put(str(dataset / "data"), "/remote_ds", recursive=True)
    yield "memory://remote_ds"
    fs.rm("/remote_ds", recursive=True)


def _fit(data: str, root: Path, max_steps: int, ckpt_path: str | None = None, save_every: int | None = None):
    return fit_recorder(data, root, max_steps, 0, ckpt_path, save_every, batch_size=BATCH).seen


def test_urls_and_locations():
    assert is_url("http://127.0.0.1:8000/ds") and is_url("hf://datasets/org/name") and is_url("s3://b/k")
    assert not is_url("/data/ds") and not is_url("runs/shards") and not is_url(Path("C:/x")) and not is_url("C:\\x")
    assert join("http://h/ds/", "latents", "manifest.json") == "http://h/ds/latents/manifest.json"
    assert str(location("http://h/ds") / "manifest.json") == "http://h/ds/manifest.json"  # not pathlib's http:/h
    assert isinstance(location("runs/ds"), Path)
    with pytest.raises(DataError, match="nosuchproto://x: cannot open this URL with fsspec"):
        location("nosuchproto://x")
    with pytest.raises(DataError, match="memory://nothing/manifest.json: not found or not reachable"):
        read_dataset_info("memory://nothing")


def test_http_streams_files_larger_than_a_block(served, tmp_path):
    """Python's server answers no range requests: a shard is read as one stream, not 4 MiB blocks."""
    data = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "big.tar").write_bytes(data)
    url = served(tmp_path) + "/big.tar"
    assert file_size(url) == len(data)
    with open_binary(url) as f:
        assert f.read() == data


def test_metadata_and_batches_equal_the_local_copy(dataset, remote):
    local, far = read_dataset_info(dataset / "data"), read_dataset_info(remote)
    assert far.stats.fingerprint == local.stats.fingerprint and far.text_encoder == local.text_encoder
    for split in ("train", "validation"):
        assert [Path(p).name for p in far.splits[split].shards] == [Path(p).name for p in local.splits[split].shards]
        assert far.splits[split].samples == local.splits[split].samples
        assert all(p.startswith(remote) for p in far.splits[split].shards)
    loaders = []
    for data in (dataset / "data", remote):
        dm = CosmosDataModule(str(data), batch_size=BATCH, num_workers=0, shuffle_buffer=16, seed=3)
        dm.setup("fit")
        loaders.append(dm)
    for kind in ("train_dataloader", "val_dataloader"):
        got = [[b for _, b in zip(range(3), getattr(dm, kind)())] for dm in loaders]
        assert len(got[0]) == len(got[1]) > 0
        for a, b in zip(*got):
            assert a.keys() == b.keys()
            for key in a:
                same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
                assert same, (kind, key)


def test_training_and_resume_see_the_batches_of_the_local_copy(dataset, remote, tmp_path):
    straight_local = _fit(str(dataset / "data"), tmp_path / "l", 2 * HALF)
    assert _fit(remote, tmp_path / "r", 2 * HALF) == straight_local
    # stop after HALF steps and resume from the checkpoint, remote and local: the same continued stream
    halves = {}
    for name, data in (("local", str(dataset / "data")), ("remote", remote)):
        first = _fit(data, tmp_path / name, HALF, save_every=HALF)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            second = _fit(data, tmp_path / name, 2 * HALF, ckpt_path=str(tmp_path / name / "ckpt" / "last.ckpt"))
        halves[name] = (first, second)
    assert halves["remote"] == halves["local"]
    assert len(halves["remote"][1]) == HALF and not set(halves["remote"][1]) & set(halves["remote"][0])


def test_damaged_remote_shards_are_named(dataset, served, tmp_path):
    """Sizes are checked at set-up (an HTTP HEAD each), the SHA-256 as the shard streams."""
    copy = tmp_path / "served"
    shutil.copytree(dataset / "data", copy / "data")
    manifest = json.loads((copy / "data" / "manifest.json").read_text())
    for entry in manifest["shards"]:  # sizes and checksums as the converter records them
        found = scan_shard(copy / "data" / entry["name"])
        entry.update(bytes=found["bytes"], sha256=found["sha256"])
    (copy / "data" / "manifest.json").write_text(json.dumps(manifest))
    url = served(copy) + "/data"
    shard = sorted((copy / "data").glob("train-*.tar"))[0]
    good = shard.read_bytes()

    shard.write_bytes(good[: len(good) // 2])
    dm = CosmosDataModule(url, batch_size=BATCH, num_workers=0, shuffle_buffer=16, seed=3)
    with pytest.raises(DataError, match=rf"{shard.name}: truncated: expected {len(good)} bytes, got {len(good) // 2}"):
        dm.setup("fit")

    bad = bytearray(good)
    bad[700] ^= 0xFF  # inside the first member's data (after its 512-byte header): same size, other bytes
    shard.write_bytes(bytes(bad))
    dm = CosmosDataModule(url, batch_size=BATCH, num_workers=0, shuffle_buffer=16, seed=3, check_sha256=True)
    dm.setup("fit")
    with pytest.raises(DataError, match=rf"{shard.name}: checksum mismatch: .*the shard is corrupt"):
        for _ in dm.train_dataloader():
            pass


def test_cli_fits_and_tests_from_a_served_dataset_and_latent_cache(toy_data, served, tmp_path, capsys):
    """LightningCLI with ``data.data_dir: http://...``: the latent cache built beside the local copy is read
    over HTTP too, and training gives the local run's weights."""
    root = tmp_path / "served"
    shutil.copytree(toy_data / "data", root / "data")
    url = served(root) + "/data"
    runs = {}
    for name, data_dir in (("local", str(root / "data")), ("remote", url)):
        (tmp_path / name).mkdir()
        over = cli_override(tmp_path / name, toy_data, max_steps=3)
        cfg = yaml.safe_load(over.read_text())
        cfg["data"]["init_args"].update(data_dir=data_dir, latent_cache=True, latent_views=0)
        over.write_text(yaml.safe_dump(cfg))
        assert main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]) == 0
        runs[name] = torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=False)["state_dict"]
        if name == "local":  # the local run built the cache in <data_dir>/latents: now it is served too
            assert (root / "data" / "latents" / "manifest.json").is_file()
    assert runs["local"].keys() == runs["remote"].keys()
    assert all(torch.equal(runs["local"][k], runs["remote"][k]) for k in runs["local"])
    capsys.readouterr()
    assert main(["test", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over),
                 "--ckpt_path", "last", "--model.init_args.test_num_steps", "2"]) == 0
    assert "test/action_skill" in capsys.readouterr().out


def test_remote_datasets_are_not_converted_or_cached_into(toy_data, served, tmp_path, capsys):
    """No finished conversion at the URL / no cache there: one line saying what to do, before any step."""
    empty = tmp_path / "empty"
    (empty / "ds").mkdir(parents=True)
    url = served(empty) + "/ds"
    over = cli_override(tmp_path, toy_data, max_steps=1)
    cfg = yaml.safe_load(over.read_text())
    cfg["data"]["init_args"].update(data_dir=url, convert_from={"source": str(tmp_path), "format": "episode_hdf5"})
    over.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no finished conversion at this URL" in err and "push-dataset" in err

    root = tmp_path / "nocache"
    shutil.copytree(toy_data / "data", root / "data", ignore=shutil.ignore_patterns("latents"))
    cfg["data"]["init_args"].update(data_dir=served(root) + "/data", convert_from=None, latent_cache=True)
    over.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(over)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a latent cache is built into a local folder" in err and "data.latent_dir" in err


def test_push_dataset_to_a_url_then_train_from_it(dataset, tmp_path, capsys):
    """``push-dataset`` to fsspec URLs (a file:// folder, memory://): manifest last, the same batches after."""
    fs = fsspec.filesystem("memory")
    for dest in (f"file://{tmp_path}/pushed", "memory://pushed_ds"):
        assert main(["push-dataset", str(dataset / "data"), dest]) == 0
        out = capsys.readouterr().out
        assert f"--data.init_args.data_dir {dest}" in out
        local, far = read_dataset_info(dataset / "data"), read_dataset_info(dest)
        assert far.stats.fingerprint == local.stats.fingerprint
        assert [Path(p).name for p in far.splits["train"].shards] == [Path(p).name for p in local.splits["train"].shards]
    names = sorted(str(p.relative_to(dataset / "data")) for p in (dataset / "data").rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(tmp_path / "pushed")) for p in (tmp_path / "pushed").rglob("*")
                  if p.is_file()) == names
    assert _fit("memory://pushed_ds", tmp_path / "m", 3) == _fit(str(dataset / "data"), tmp_path / "l", 3)
    fs.rm("/pushed_ds", recursive=True)


def test_push_dataset_errors_are_one_line(dataset, tmp_path, capsys, monkeypatch):
    assert main(["push-dataset", str(tmp_path / "nothing"), "memory://x"]) == 2
    assert "dataset directory not found" in capsys.readouterr().err
    assert main(["push-dataset", str(dataset / "data"), "not-a-repo"]) == 2
    assert "destination must be <org>/<name>" in capsys.readouterr().err
    # the Hub unreachable (no network here): the upload's failure in one line, nothing half-said
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["push-dataset", str(dataset / "data"), "someone/toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "push-dataset someone/toy: upload failed" in err[0]
