"""No silent image corruption (issue 14, item 4): uint8 frames pass, float frames only in [0, 1] (checked),
anything else is refused with one line naming the key and the observed range -- in ``convert`` and at
inference."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import CosmosPolicyError, DataError
from cosmos_policy_lightning.inference.observation import prepare_image

from ..fixtures.factories import EpisodeSpec, episode_arrays, read_split, write_embodiment, write_robomimic
from .faults import one_line_error


def _source(tmp_path, frames: np.ndarray | None, name: str = "d.hdf5"):
    """Two robomimic episodes; the wrist frames of the second replaced by ``frames`` (written as given)."""
    emb = write_embodiment(tmp_path)
    src = write_robomimic(tmp_path / name, [EpisodeSpec(5, 1), EpisodeSpec(5, 2)])
    if frames is not None:
        with h5py.File(src, "r+") as f:
            del f["data/demo_1/obs/wrist_rgb"]
            f.create_dataset("data/demo_1/obs/wrist_rgb", data=frames)
    return src, emb


def _convert(src, emb, out):
    return convert(str(src), output=str(out), embodiment=str(emb), val_fraction=0.0, text_encoder="none",
                   progress=False)


WRIST = episode_arrays(EpisodeSpec(5, 2))["wrist"]


def _nan_frames():
    frames = WRIST.astype(np.float32) / 255.0
    frames[2, 3, 4, 1] = np.nan
    return frames


@pytest.mark.parametrize("frames, fragment", [
    (WRIST.astype(np.float32), r"float image values must be in \[0, 1\], observed range \[\d+, 2\d\d\]"),
    (_nan_frames(), r"float image values must be in \[0, 1\], .*1 NaN"),
    (WRIST.astype(np.float64) / 255.0 - 0.5, r"observed range \[-0.5, 0.5\]"),
    (np.zeros((5, 0, 0, 3), np.uint8), r"expected an \(H, W, 3\) RGB image with H, W >= 1, got shape \(0, 0, 3\)"),
    (WRIST.astype(np.uint16) * 256, r"expected uint8 or float images, got dtype uint16"),
], ids=["float 0..255", "NaN", "negative floats", "0x0", "uint16"])
def test_convert_refuses_frames_it_would_corrupt(tmp_path, frames, fragment):
    src, emb = _source(tmp_path, frames)
    with pytest.raises(DataError, match=rf"demo_1.*obs/wrist_rgb.*{fragment}") as err:
        _convert(src, emb, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_convert_cli_prints_the_range_in_one_line(tmp_path, capsys):
    src, emb = _source(tmp_path, WRIST.astype(np.float32))
    assert main(["convert", str(src), "--output", str(tmp_path / "out"), "--embodiment", str(emb),
                 "--text_encoder", "none", "--progress", "false"]) == 2
    one_line_error(capsys.readouterr().err, "obs/wrist_rgb", "observed range", "looks like 0..255: pass uint8")


def test_float_frames_in_unit_range_equal_their_uint8_version(tmp_path):
    src_u8, emb = _source(tmp_path / "a", None)
    src_f, _ = _source(tmp_path / "b", WRIST.astype(np.float32) / 255.0)
    _convert(src_u8, emb, tmp_path / "u8")
    _convert(src_f, emb, tmp_path / "f")
    a, b = read_split(tmp_path / "u8", "train"), read_split(tmp_path / "f", "train")
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
    for x, y in zip(a, b):
        assert x["image.wrist.jpg"] == y["image.wrist.jpg"]


@pytest.mark.parametrize("frame, fragment", [
    (np.full((40, 48, 3), 200.0, np.float32), r"observed range \[200, 200\]"),
    (np.full((40, 48, 3), 1000, np.int64), r"image dtype int64 is not accepted, observed range \[1000, 1000\]"),
    (np.full((40, 48, 3), 40000, np.uint16), r"image dtype uint16 is not accepted"),
    (np.full((40, 48, 3), np.nan, np.float32), r"5760 NaN"),
    (np.zeros((0, 0, 3), np.uint8), r"expected an \(H, W, 3\) RGB image"),
], ids=["float 0..255", "int64", "uint16", "NaN", "0x0"])
def test_inference_refuses_frames_it_would_corrupt(frame, fragment):
    with pytest.raises(CosmosPolicyError, match=rf"camera 'wrist'.*{fragment}") as err:
        prepare_image(frame, (32, 32), "observation 0: camera 'wrist'")
    assert "\n" not in str(err.value)


def test_inference_accepts_uint8_and_unit_floats_alike():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    a = prepare_image(u8, (32, 32), "cam")
    b = prepare_image(u8.astype(np.float32) / 255.0, (32, 32), "cam")
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
