"""The shard writer's tar records match what :mod:`tarfile` writes and read back with tarfile, GNU
tar and webdataset, long member names included."""

import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from cosmos_policy_lightning.data.shards import interleave_order, member_header, write_samples, write_shard

from ..fixtures.factories import read_split


@pytest.mark.parametrize("name,size", [("demo_0_000000.image.wrist.jpg", 0), ("e_000001.meta.json", 511),
                                       ("x" * 100, 512), ("ep_000002.actions.npy", 123_456_789)])
def test_header_equals_tarfile_gnu_header(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "bigdata"
    assert member_header(name, size) == info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def test_interleave_order_is_a_seeded_permutation_of_counts():
    order = interleave_order([3, 1, 4], seed=7)
    assert sorted(order.tolist()) == [0, 0, 0, 1, 2, 2, 2, 2]
    np.testing.assert_array_equal(order, interleave_order([3, 1, 4], seed=7))
    assert len({tuple(interleave_order([3, 1, 4], seed=s)) for s in range(10)}) > 1


def test_shard_reads_back_everywhere_including_long_names(tmp_path):
    long_id = "KITCHEN_SCENE10_put_the_butter_at_the_back_in_the_top_drawer_of_the_cabinet_and_close_it_demo-demo_12"
    samples = {f"{eid}_{t:06d}": {"image.front.jpg": bytes([t]) * (700 + t), "meta.json": b'{"step": %d}' % t}
               for eid in (long_id, "short") for t in range(3)}
    spills = []
    for eid in (long_id, "short"):
        path = tmp_path / f"{eid[:10]}.spill"
        with open(path, "wb") as f:
            write_samples(f, ((k, m) for k, m in samples.items() if k.startswith(eid + "_")))
        spills.append(path)
    size = write_shard(tmp_path / "train-000000.tar", spills, [3, 3], seed=1)
    assert size % tarfile.RECORDSIZE == 0 and not list(tmp_path.glob(".*.tmp"))
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
        assert len(names) == 12 and f"{long_id}_000002.image.front.jpg" in names
        assert tar.extractfile(f"{long_id}_000001.image.front.jpg").read() == bytes([1]) * 701
    read = {s["__key__"]: s for s in read_split(tmp_path, "train")}
    assert set(read) == set(samples)
    for key, members in samples.items():
        assert read[key]["image.front.jpg"] == members["image.front.jpg"]
        assert read[key]["meta.json"] == members["meta.json"]
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert sorted(listing) == sorted(names)
