"""Closed-loop value AUROC per task at fixed horizons, on small hand-made rollouts with known answers."""

import pytest

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim.value_metrics import (auroc, closed_loop_calibration, closed_loop_value_auroc,
                                                        early_value, ranking_accuracy, realised_returns)


def test_auroc_known_values():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    # 3 of the 4 success/failure pairs are ordered right
    assert auroc([0.9, 0.4, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    assert auroc([0.5, 0.6], [True, True]) is None
    with pytest.raises(CosmosPolicyError):
        auroc([0.1, float("nan")], [True, False])


def test_per_task_horizons():
    episodes = [  # task a: the value separates early; late it is inverted
        {"task": "a", "success": True, "values": [[0, 0.9], [40, 0.9], [80, 0.1]]},
        {"task": "a", "success": False, "values": [[0, 0.2], [40, 0.2], [80, 0.99]]},
        {"task": "b", "success": True, "values": [[0, 0.5]]},   # one class only: undefined
    ]
    report = closed_loop_value_auroc(episodes, max_steps=100, horizons=(0.25, 0.5, 1.0))
    assert report["a"]["auroc"] == {"25%": 1.0, "50%": 1.0, "100%": pytest.approx(1.0)}
    assert report["b"] == {"episodes": 1, "successes": 1, "auroc": {"25%": None, "50%": None, "100%": None}}
    late = closed_loop_value_auroc(episodes[:2], max_steps=100, horizons=(1.0,))
    assert late["a"]["auroc"]["100%"] == 1.0    # means 0.633 vs 0.463
    inverted = [dict(e, values=[[0, v] for _, v in e["values"][2:]]) for e in episodes[:2]]
    assert closed_loop_value_auroc(inverted, max_steps=100)["a"]["auroc"]["25%"] == 0.0
    assert early_value([[0, 0.2], [30, 0.4]], 30) == 0.2 and early_value([[50, 0.2]], 30) is None
    with pytest.raises(CosmosPolicyError):
        closed_loop_value_auroc(episodes, max_steps=100, horizons=(0.0,))


def test_realised_returns_follow_the_trained_target():
    # a success of 3 steps with gamma 0.5: the return from step t is 0.5^(2-t); a failure returns 0
    success = {"task": "a", "success": True, "length": 3, "values": [[0, 0.3], [2, 0.9]]}
    failure = {"task": "a", "success": False, "length": 5, "values": [[0, 0.6], [4, 0.2]]}
    assert realised_returns(success, 0.5) == [(0.3, pytest.approx(0.25)), (0.9, pytest.approx(1.0))]
    assert realised_returns(failure, 0.5) == [(0.6, 0.0), (0.2, 0.0)]
    curves = closed_loop_calibration([success, failure], gamma=0.5)
    # bins: 0.2 -> 0 (|0.2|), 0.3 -> 0.25 (|0.05|), 0.6 -> 0 (|0.6|), 0.9 -> 1 (|0.1|): ECE = 0.95 / 4
    assert curves["a"].ece == pytest.approx(0.2375) and curves["a"].samples == 4
    with pytest.raises(CosmosPolicyError, match="outside an episode of 3 steps"):
        realised_returns(dict(success, values=[[3, 0.5]]), 0.5)


def test_ranking_is_matched_in_time():
    # a value that only tracks time into the episode: the failure runs longer and climbs higher, so the
    # mean value over the whole episode ranks it above the success, but at equal chunk indices the two are
    # tied: chance, not "inverted"
    clock = [
        {"task": "a", "success": True, "length": 20, "values": [[0, 0.2], [10, 0.5]]},
        {"task": "a", "success": False, "length": 40, "values": [[0, 0.2], [10, 0.5], [20, 0.8], [30, 0.9]]},
    ]
    assert closed_loop_value_auroc(clock, max_steps=40)["a"]["auroc"]["100%"] == 0.0
    assert ranking_accuracy(clock)["a"] == {"accuracy": 0.5, "pairs": 2}
    # 3 of 4 comparisons right: two successes against one failure over two chunk indices
    eps = [
        {"task": "b", "success": True, "values": [[0, 0.6], [8, 0.7]]},
        {"task": "b", "success": True, "values": [[0, 0.55], [8, 0.9]]},
        {"task": "b", "success": False, "values": [[0, 0.5], [8, 0.8]]},
        {"task": "c", "success": True, "values": [[0, 0.5]]},
    ]
    report = ranking_accuracy(eps)
    assert report["b"] == {"accuracy": 0.75, "pairs": 4}
    assert report["c"] == {"accuracy": None, "pairs": 0}
