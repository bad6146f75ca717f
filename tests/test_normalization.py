"""Statistics and normalisation to [-1, 1] (docs/method.md §4), with the zero-range guard and fingerprints."""

import json
import warnings

import numpy as np
import pytest
import torch

from cosmos_policy_lightning.normalization import DatasetStats, Normalizer, Stats, fingerprint


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(500, 3)) * np.array([1.0, 5.0, 0.1]) + np.array([0.0, 10.0, -2.0])


def test_stats_against_numpy():
    x = _data()
    s = Stats.compute(x, names=["a", "b", "c"])
    np.testing.assert_allclose(s.min, x.min(0))
    np.testing.assert_allclose(s.max, x.max(0))
    np.testing.assert_allclose(s.mean, x.mean(0))
    np.testing.assert_allclose(s.std, x.std(0))
    np.testing.assert_allclose(s.q01, np.quantile(x, 0.01, axis=0))
    np.testing.assert_allclose(s.q99, np.quantile(x, 0.99, axis=0))
    assert s.count == 500 and s.dim == 3


def test_minmax_round_trip_numpy_and_torch():
    x = _data()
    n = Normalizer(Stats.compute(x))
    y = n.normalize(x)
    assert y.min() == pytest.approx(-1.0) and y.max() == pytest.approx(1.0)
    np.testing.assert_allclose(y.min(0), -1.0) and np.testing.assert_allclose(y.max(0), 1.0)
    np.testing.assert_allclose(n.unnormalize(y), x, atol=1e-12)
    # the reference formula: 2 (x - min) / (max - min) - 1
    np.testing.assert_allclose(y, 2 * (x - x.min(0)) / (x.max(0) - x.min(0)) - 1, atol=1e-12)
    t = torch.tensor(x, dtype=torch.float32)
    yt = n.normalize(t)
    assert yt.dtype == torch.float32
    torch.testing.assert_close(n.unnormalize(yt), t, atol=1e-4, rtol=1e-5)


def test_constant_dimension_maps_to_zero_and_warns_once():
    x = _data()
    x[:, 1] = 3.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = Normalizer(Stats.compute(x, names=["a", "gripper", "c"]), name="action")
        y = n.normalize(x)
        back = n.unnormalize(y)
        n.normalize(torch.tensor(x))
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "action" in msgs[0] and "gripper" in msgs[0]
    assert np.isfinite(y).all() and np.all(y[:, 1] == 0.0)
    np.testing.assert_allclose(back[:, 1], 3.0)
    yt = n.normalize(torch.tensor(x))
    assert torch.isfinite(yt).all() and torch.all(yt[:, 1] == 0)


def test_quantile_mode_clips_outliers():
    x = _data()
    x[0, 0] = 1000.0
    n = Normalizer(Stats.compute(x), mode="quantile")
    y = n.normalize(x)
    assert y.max() <= 1.0 and y.min() >= -1.0 and y[0, 0] == 1.0
    inside = (x > n.low) & (x < n.high)
    np.testing.assert_allclose(n.unnormalize(y)[inside], x[inside])


def test_optional_clipping_and_none_mode():
    s = Stats.compute(np.array([[0.0], [1.0]]))
    assert Normalizer(s).normalize(np.array([[2.0]]))[0, 0] == pytest.approx(3.0)
    assert Normalizer(s, clip=True).normalize(np.array([[2.0]]))[0, 0] == 1.0
    assert Normalizer(s, mode="none").normalize(np.array([[2.0]]))[0, 0] == 2.0
    with pytest.raises(ValueError, match="unknown normalisation mode 'zscore'"):
        Normalizer(s, mode="zscore")


def test_bad_input_refused():
    with pytest.raises(ValueError, match="non-empty \\(N, D\\)"):
        Stats.compute(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        Stats.compute(np.array([[0.0], [np.nan]]))


def test_dataset_stats_json_round_trip(tmp_path):
    fp = fingerprint(7, 9, 16, ["ep2", "ep1"])
    assert fp == fingerprint(7, 9, 16, ["ep1", "ep2"]) and len(fp) == 16
    assert fp != fingerprint(7, 9, 32, ["ep1", "ep2"]) and fp != fingerprint(7, 9, 16, ["ep1"])
    ds = DatasetStats(fp, {"action": Stats.compute(_data(1))}, {"action": Stats.compute(_data(2))})
    path = tmp_path / "stats.json"
    ds.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    back = DatasetStats.load(path)
    assert back.fingerprint == fp
    np.testing.assert_allclose(back.successful["action"].q99, ds.successful["action"].q99)
    np.testing.assert_allclose(back.normalizer("action").low, ds.successful["action"].min)
    path.write_text(json.dumps({"fingerprint": "x"}))
    with pytest.raises(ValueError, match="stats.json: malformed statistics"):
        DatasetStats.load(path)
