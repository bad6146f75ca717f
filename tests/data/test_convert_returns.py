"""Values, future index and action-chunk padding (docs/method.md §1, §4)."""

import numpy as np
import pytest

from cosmos_policy_lightning.data.returns import action_chunk, episode_values, future_index


def test_success_curve_ends_at_plus_one_and_follows_gamma():
    v = episode_values(5, 1.0, 0.9)
    assert v.dtype == np.float32 and v.shape == (5,)
    np.testing.assert_allclose(v, [2 * 0.9 ** k - 1 for k in (4, 3, 2, 1, 0)], rtol=1e-6)
    assert v[-1] == pytest.approx(1.0)
    assert np.all(np.diff(v) > 0)


def test_failure_is_minus_one_everywhere():
    np.testing.assert_array_equal(episode_values(7, 0.0, 0.99), -np.ones(7, np.float32))


def test_fractional_score_scales_the_curve():
    full, half = episode_values(6, 1.0, 0.95), episode_values(6, 0.5, 0.95)
    assert half[-1] == pytest.approx(0.0)  # a half success ends at 0, not at +1 (the reference's defect)
    np.testing.assert_allclose((half + 1) / 2, 0.5 * (full + 1) / 2, rtol=1e-6)
    assert episode_values(3, 0.8, 1.0)[-1] == pytest.approx(0.6)


@pytest.mark.parametrize("args", [(0, 1.0, 0.9), (3, 1.5, 0.9), (3, -0.1, 0.9), (3, 1.0, 0.0), (3, 1.0, 1.2)])
def test_invalid_arguments_raise(args):
    with pytest.raises(ValueError):
        episode_values(*args)


def test_future_index_is_clamped_to_last_step():
    assert [future_index(t, 4, 6) for t in range(6)] == [4, 5, 5, 5, 5, 5]


def test_action_chunk_pads_by_repeating_last_action():
    actions = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(action_chunk(actions, 1, 4), actions[1:5])
    tail = action_chunk(actions, 4, 4)
    np.testing.assert_array_equal(tail, [actions[4], actions[5], actions[5], actions[5]])
    assert action_chunk(actions, 5, 3).shape == (3, 2)
