"""Closed-loop value AUROC per task at fixed horizons, on small hand-made rollouts with known answers."""

import pytest

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.sim.value_metrics import auroc, closed_loop_value_auroc, early_value


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
