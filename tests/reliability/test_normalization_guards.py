"""Statistics that would scale silently wrong (issue 14, item 6): near-constant dimensions are treated as
constant (relative threshold), inference inputs far outside the training range are warned about, and a
range dominated by outliers is warned about at conversion and when normalising."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cosmos_policy_lightning.data.convert import convert
from cosmos_policy_lightning.errors import DataError
from cosmos_policy_lightning.processor import normalize_proprio
from cosmos_policy_lightning.normalization import Normalizer, Stats, near_constant, outlier_dimensions

from ..fixtures.factories import EpisodeSpec, episode_arrays, write_embodiment, write_robomimic


def _proprio_stats() -> Stats:
    """Three dims: a joint angle (range ~2), a gripper stuck at 0.04 with float noise (range ~1e-7) and
    a dimension at 0 with noise of 5e-8."""
    rng = np.random.default_rng(0)
    n = 200
    data = np.stack([rng.uniform(-1, 1, n), 0.04 + rng.uniform(-5e-8, 5e-8, n), rng.uniform(-5e-8, 5e-8, n)], axis=1)
    return Stats.compute(data, names=["joint", "gripper", "flat"])


def test_near_constant_dimensions_are_constant():
    stats = _proprio_stats()
    with pytest.warns(UserWarning, match="constant dimension\\(s\\) gripper, flat"):
        norm = Normalizer(stats)
    assert norm.constant.tolist() == [False, True, True]
    obs = np.array([[0.5, 0.0401, 0.001]])  # slightly off the stuck values: no longer -2.9e6
    y = norm.normalize(obs)
    assert np.abs(y).max() <= 1.0 and y[0, 1] == 0.0 and y[0, 2] == 0.0
    np.testing.assert_allclose(norm.unnormalize(y)[0, 1:], [0.04, 0.0], atol=1e-6)
    # varying dimensions keep their scale, whatever their magnitude
    assert not near_constant(np.array([3.0, 1e-3]), np.array([3.01, 2e-3])).any()


def test_inference_inputs_far_outside_the_training_range_are_warned_once_per_dimension():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm = Normalizer(_proprio_stats(), name="proprio")
    with pytest.warns(UserWarning) as record:
        normalize_proprio([[5.0, 0.04, 0.0], [0.0, 0.5, 0.0]], norm, 3)
    messages = [str(w.message) for w in record]
    assert any("proprio dimension joint: 5 is far outside the training range [-0.99" in m for m in messages)
    assert any("proprio dimension gripper: 0.5 is far outside the training range" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same dimensions again: no second warning, and in range: none
        normalize_proprio([[6.0, 0.5, 0.0], [0.2, 0.04, 0.0]], norm, 3)


def test_outlier_dominated_range_is_warned():
    rng = np.random.default_rng(1)
    actions = rng.uniform(-1, 1, (300, 2))
    actions[17, 1] = 1e38
    stats = Stats.compute(actions, names=["x", "y"])
    assert outlier_dimensions(stats) == [1]
    with pytest.warns(UserWarning, match=r"action: range dominated by outliers in dimension\(s\) y: min/max"):
        Normalizer(stats, name="action")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Normalizer(stats, mode="quantile", name="action")  # quantile bounds are the remedy: no warning


def test_convert_reports_an_outlier_dominated_action(tmp_path, capsys):
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(40, i) for i in range(4)]  # 160 rows: one outlier stays beyond q99
    big = episode_arrays(specs[2])["actions"].copy()
    big[5, 2] = 1000.0  # far from the others (0..3), still normalisable: warned (1e38 is refused, below)
    specs[2].override = {"actions": big}
    src = write_robomimic(tmp_path / "d.hdf5", specs)
    convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), val_fraction=0.0, text_encoder="none",
            progress=False)
    err = capsys.readouterr().err
    assert "stats.json: action: range dominated by outliers in dimension(s) 2: min/max [0, 1000]" in err
    assert "stats.json: action dimension 2: 1 value(s) far from the others (median 1.5), worst 1000 at episode " \
           "demo_2 step 5" in err


@pytest.mark.parametrize("rows", [1, 12])
def test_a_cluster_of_outliers_cannot_defeat_the_range_check(tmp_path, rows):
    """Finding 4: the guard ``max - min > 10 (q99 - q01)`` missed an action of 1e38 once the outliers were
    more than 1 % of the values (12 of 160 rows here: q99 is then 1e38 itself). The robust check (median
    absolute deviation) finds them however many there are, and values that cannot be normalised are refused
    in one line naming the episode and step of the worst."""
    emb = write_embodiment(tmp_path)
    specs = [EpisodeSpec(40, i) for i in range(4)]
    big = episode_arrays(specs[1])["actions"].copy()
    big[3:3 + rows, 2] = 1e38
    specs[1].override = {"actions": big}
    src = write_robomimic(tmp_path / "d.hdf5", specs)
    with pytest.raises(DataError, match=rf"stats.json: action dimension 2: {rows} value\(s\) cannot be normalised, "
                                        rf"worst 1e\+38 at episode demo_1 step 3"):
        convert(str(src), output=str(tmp_path / "out"), embodiment=str(emb), val_fraction=0.0, text_encoder="none",
                progress=False)
