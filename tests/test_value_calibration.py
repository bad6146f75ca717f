"""Reliability curves and the expected calibration error, on hand-made values with known answers."""

import numpy as np
import pytest

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.model.value_report import TaskValueReport, task_key
from cosmos_policy_lightning.value_calibration import reliability_curve, reliability_figure


def test_calibrated_and_overconfident_values():
    good = reliability_curve([0.05, 0.05, 0.95, 0.95], [0.0, 0.1, 1.0, 0.9])
    assert good.ece == pytest.approx(0.0) and good.counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert np.isnan(good.mean_predicted[1]) and good.to_json()["mean_return"][1] is None
    # always 0.9 where half the states return 0 and half 1: off by 0.4
    over = reliability_curve([0.9] * 4, [0, 0, 1, 1])
    assert over.ece == pytest.approx(0.4) and over.mean_return[9] == pytest.approx(0.5)
    # 1.0 falls into the last bin, a slightly negative prediction into the first
    edge = reliability_curve([1.0, -1e-7], [1.0, 0.0], num_bins=2)
    assert edge.counts.tolist() == [1, 1] and edge.ece == pytest.approx(0.0, abs=1e-6)
    assert reliability_curve([], []) is None
    with pytest.raises(CosmosPolicyError, match="3 predictions but 2 returns"):
        reliability_curve([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(CosmosPolicyError, match="finite"):
        reliability_curve([float("nan")], [0.0])


def test_the_diagram_draws_every_curve(tmp_path):
    fig = reliability_figure({"a": reliability_curve([0.1, 0.9], [0, 1]),
                              "b": reliability_curve([0.5], [0.2])}, "t")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and "ECE 0.300" in ax.get_legend().get_texts()[2].get_text()
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_held_out_report_is_per_task():
    import torch

    report = TaskValueReport()
    # task "open the door": the value separates its successes from its failures; "close it": one class only
    report.update(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([1.0, 0.8, 0.0, 0.0]),
                  torch.tensor([True, True, False, False]), ["Open the door!"] * 4)
    report.update(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.7]), torch.tensor([True, True]),
                  ["close it", "close it"])
    metrics, curves = report.compute()
    assert metrics["value_auroc/open_the_door"] == 1.0 and "value_auroc/close_it" not in metrics
    assert metrics["value_ece/close_it"] == pytest.approx(0.1)
    assert metrics["value_ece/open_the_door"] == pytest.approx(0.1)   # bins 9, 8, 2, 1: .1, 0, .2, .1 over 4
    assert metrics["value_auroc_per_task_mean"] == 1.0 and set(curves) == {"open_the_door", "close_it"}
    assert report.compute() == ({}, {})   # emptied
    assert task_key("") == "all" and len(task_key("x " * 60)) <= 40
