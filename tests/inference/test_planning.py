"""Best-of-N planning (docs/method.md §3, §5): aggregation edge cases, choice of the best proposal with a planning
model of known values, and the real batched pipeline on tiny checkpoints (same model and dual deployment)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.ensemble import member_seeds, member_steps
from cosmos_policy_lightning.inference.planning import Planner, aggregate, majority_mean
from cosmos_policy_lightning.inference.policy import CosmosPolicy
from cosmos_policy_lightning.model.sequence import read_vectors

from ..fixtures.checkpoint_factory import make_checkpoint

K, A, P = 4, 2, 3


# ----------------------------------------------------------------------------- aggregation
def test_majority_mean_all_below_threshold_is_zero():
    assert majority_mean(torch.tensor([[0.01, 0.05, 0.0, 0.049]])).tolist() == [0.0]  # 0.05 itself does not count


def test_majority_mean_exactly_half_counts_as_majority():
    assert majority_mean(torch.tensor([[0.9, 0.5, 0.0, 0.01]])).tolist() == pytest.approx([0.7])
    # odd count: 2 of 5 is not half -> 0; 3 of 5 is -> mean of the three
    assert majority_mean(torch.tensor([[0.9, 0.5, 0.0, 0.01, 0.02]])).tolist() == [0.0]
    assert majority_mean(torch.tensor([[0.9, 0.5, 0.4, 0.01, 0.02]])).tolist() == pytest.approx([0.6])


def test_majority_mean_of_all_above_is_the_plain_mean_and_respects_threshold():
    v = torch.tensor([[0.2, 0.4, 0.6], [0.3, 0.3, 0.3]])
    torch.testing.assert_close(majority_mean(v), v.double().mean(dim=1))
    assert majority_mean(v, threshold=0.35).tolist() == pytest.approx([0.5, 0.0])


def test_aggregate_mean_and_lower_confidence_bound_over_futures_and_values():
    v = np.array([[[0.2, 0.4], [0.6, 0.8]], [[0.5, 0.5], [0.5, 0.5]]])   # (N=2, F=2, V=2)
    np.testing.assert_allclose(aggregate(v, "mean").numpy(), [0.5, 0.5])
    std0 = np.std([0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(aggregate(v, "lcb", lcb_k=2.0).numpy(), [0.5 - 2 * std0, 0.5])
    with pytest.raises(CosmosPolicyError, match="unknown aggregation"):
        aggregate(v, "median")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("planning_a"), seed=0)


@pytest.fixture(scope="module")
def policy(ckpt_a):
    return CosmosPolicy.from_checkpoint(ckpt_a)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    # Another checkpoint trained on other data: other statistics (dual deployment).
    return CosmosPolicy.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("planning_b"), seed=5),
                                        value_objective="value_future_state")


def observation(seed=0):
    rng = np.random.default_rng(seed)
    return {"images": {"wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       "front": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)},
            "proprio": rng.uniform(-2, 3, P), "instruction": "push the block"}


class KnownValues:
    """The value source of a planning model whose values are known in advance: a table per proposal,
    looked up by the proposal's rank in the order the real policy proposed them. This test needs a
    planning model with known values, which no trained checkpoint can provide; everything else is real."""

    def __init__(self, table: np.ndarray):
        self.table = table          # (N, F, V)
        self.seen = None

    def evaluate_actions(self, observation, actions, num_futures, num_values, world_model_steps, value_steps, seed,
                         ensemble_steps="linspace"):
        self.seen = np.asarray(actions)
        assert self.table.shape == (len(actions), num_futures, num_values)
        return SimpleNamespace(values=self.table, future_proprio=None)


# ----------------------------------------------------------------------------- choosing
def test_planner_picks_the_proposal_with_the_highest_majority_mean(policy):
    # proposal 1 has the highest plain mean but most of its values below 0.05 -> majority mean 0;
    # proposal 3 wins by majority mean; proposal 0 is second.
    table = np.zeros((4, 3, 5))
    table[0] = 0.5
    table[1, 0] = 1.0            # 5 of 15 values at 1.0, the rest 0 -> mean 0.33, majority mean 0
    table[2] = 0.02
    table[3] = 0.6
    table[3, 2, :2] = 0.0        # 13 of 15 above -> mean of those 0.6
    judge = KnownValues(table)
    planner = Planner(policy, judge, num_proposals=4, num_futures=3, num_values=5, policy_steps=2)
    plan = planner.plan(observation(1), seed=4)
    assert plan.best_index == 3 and plan.value == pytest.approx(0.6)
    np.testing.assert_allclose(plan.scores, [0.5, 0.0, 0.0, 0.6])
    np.testing.assert_array_equal(plan.actions, plan.proposals[3])
    np.testing.assert_array_equal(judge.seen, plan.proposals)        # the judge saw the real proposals
    assert plan.proposals.shape == (4, K, A) and len(np.unique(plan.proposals[:, 0, 0])) == 4
    mean_planner = Planner(policy, judge, num_proposals=4, num_futures=3, num_values=5, policy_steps=2,
                           aggregation="mean")
    assert mean_planner.plan(observation(1), seed=4).best_index == 3  # 0.6 * 13/15 = 0.52 > 0.5 > 0.33


def test_ties_go_to_the_lowest_index(policy):
    table = np.full((3, 1, 2), 0.01)   # everything below threshold: all scores 0
    plan = Planner(policy, KnownValues(table), num_proposals=3, num_futures=1, num_values=2, policy_steps=1).plan(
        observation(2), seed=0)
    assert plan.best_index == 0 and plan.scores.tolist() == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- the real pipeline
def test_real_planning_batches_every_stage_on_one_device(policy):
    sizes, encodes = [], []
    handle = policy.module.dit.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    policy.encode = lambda batch, _encode=policy.encode: encodes.append(batch.size) or _encode(batch)
    try:
        planner = Planner(policy, num_proposals=4, num_futures=2, num_values=3, policy_steps=2,
                          world_model_steps=2, value_steps=1, ensemble_steps="equal")
        plan = planner.plan(observation(3), seed=9)
    finally:
        handle.remove()
        del policy.encode
    assert sizes == [4, 4, 8, 8, 24]       # N proposals x 2 steps, N*F x 2 steps, N*F*V x 1 step
    assert encodes == [1]                  # one model: the observation is VAE-encoded once
    assert plan.values.shape == (4, 2, 3) and np.all((plan.values >= 0) & (plan.values <= 1))
    assert plan.future_proprio.shape == (4, 2, P)
    assert plan.best_index == int(np.argmax(plan.scores))
    again = planner.plan(observation(3), seed=9)
    np.testing.assert_array_equal(again.actions, plan.actions)
    np.testing.assert_array_equal(again.values, plan.values)


@pytest.mark.parametrize("steps, members, expected", [
    (5, 3, [1, 3, 5]), (5, 5, [1, 2, 3, 4, 5]), (10, 3, [1, 5, 10]), (5, 4, [1, 2, 3, 5]), (5, 1, [5]),
    (1, 3, [1, 1, 1])])
def test_ensemble_members_get_the_reference_linspace_step_counts(steps, members, expected):
    assert member_steps(steps, members) == expected                      # np.linspace(1, steps, n).astype(int)
    assert member_steps(steps, members, "equal") == [steps] * members
    assert member_seeds(7, members) == [7 + i for i in range(members)]


def test_default_planning_spreads_steps_batches_equal_counts_and_seeds_each_member(policy):
    """F = 3 futures at 5 steps -> members with 1, 3, 5 steps; V = 5 values at 5 steps -> 1 .. 5: one
    batched call per step count and member, and each member's result is the one it gets alone with its
    own seed (seed + i) and step count."""
    calls = []
    handle = policy.module.dit.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    acts = np.random.default_rng(0).uniform(-1, 1, (2, K, A))
    try:
        ev = policy.evaluate_actions(observation(5), acts, num_futures=3, num_values=5, world_model_steps=5,
                                     value_steps=5, seed=11)
    finally:
        handle.remove()
    # futures: N=2 rows per member, 1 + 3 + 5 network calls; values: N*F=6 rows per member, 1+2+3+4+5 calls
    assert calls == [2] * (1 + 3 + 5) + [6] * (1 + 2 + 3 + 4 + 5)
    assert ev.values.shape == (2, 3, 5) and ev.future_proprio.shape == (2, 3, P)
    # future member 2 (5 steps, seed 11 + 2) alone: the same future proprio as inside the ensemble
    alone = policy.evaluate_actions(observation(5), acts, num_futures=1, num_values=1, world_model_steps=5,
                                    value_steps=1, seed=13)
    np.testing.assert_allclose(alone.future_proprio[:, 0], ev.future_proprio[:, 2], rtol=1e-4, atol=1e-5)
    # micro-batches of max_batch rows give the same ensemble
    policy.max_batch = 4
    try:
        small = policy.evaluate_actions(observation(5), acts, num_futures=3, num_values=5, world_model_steps=5,
                                        value_steps=5, seed=11)
    finally:
        policy.max_batch = None
    np.testing.assert_allclose(small.values, ev.values, rtol=1e-4, atol=1e-5)
    # the equal-steps option: all members at 5 steps, one call per step for all 2 x 3 rows
    calls.clear()
    handle = policy.module.dit.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        policy.evaluate_actions(observation(5), acts, num_futures=3, num_values=2, world_model_steps=5,
                                value_steps=2, seed=11, ensemble_steps="equal")
    finally:
        handle.remove()
    assert calls == [6] * 5 + [12] * 2


def test_planner_defaults_to_the_checkpoints_policy_steps_and_linspace(policy):
    planner = Planner(policy)
    assert planner.policy_steps == policy.module.hparams.test_num_steps
    assert planner.ensemble_steps == "linspace" and (planner.world_model_steps, planner.value_steps) == (5, 5)
    with pytest.raises(CosmosPolicyError, match="ensemble_steps must be one of linspace, equal"):
        Planner(policy, ensemble_steps="random")


def test_dual_deployment_renormalises_proposals_and_uses_the_v_of_s_prime_mask(policy, other_model):
    seen = []
    handle = other_model.module.dit.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].clone(), args[2].clone())))
    try:
        plan = Planner(policy, other_model, num_proposals=2, num_futures=2, num_values=2, policy_steps=1,
                       world_model_steps=1, value_steps=1).plan(observation(4), seed=1)
    finally:
        handle.remove()
    lay = other_model.layout
    (x_wm, cond_wm), (x_v, cond_v) = seen
    assert torch.equal(cond_wm[0], torch.tensor(lay.conditioning_mask("world_model")))
    assert torch.equal(cond_v[0], torch.tensor(lay.conditioning_mask("value_future_state")))
    # the planning model's world-model stage sees the proposals in ITS normalisation, F copies of each
    own = other_model.action_normalizer.normalize(torch.as_tensor(plan.proposals, dtype=torch.float64))
    injected = read_vectors(x_wm, lay, P, K, A)["actions"]
    # one batched call for both future members (1 step each), member-major: member 0's N rows, then member 1's
    torch.testing.assert_close(injected, own.float().repeat(2, 1, 1), atol=1e-4, rtol=1e-4)
    theirs = policy.action_normalizer.normalize(torch.as_tensor(plan.proposals, dtype=torch.float64))
    assert (own - theirs).abs().max() > 1e-3   # the two checkpoints really normalise differently
    assert x_v.shape[0] == 2 * 2 * 2


def test_planner_refuses_bad_sizes(policy):
    with pytest.raises(CosmosPolicyError, match="num_proposals"):
        Planner(policy, num_proposals=0)


def test_planner_refuses_a_planning_model_of_another_robot(policy):
    """The planner uses the embodiment's "inference" rule: image size counts (both models see the same
    encoded observation), the discount does not."""
    import dataclasses

    class Judge:  # a planning model only needs .embodiment and evaluate_actions (inference/planning.py)
        def __init__(self, embodiment):
            self.embodiment = embodiment

    emb = policy.embodiment
    with pytest.raises(CosmosPolicyError, match="planning model was trained for embodiment .* with image_size"):
        Planner(policy, Judge(dataclasses.replace(emb, image_size=(emb.image_size[0] * 2, emb.image_size[1]))))
    Planner(policy, Judge(dataclasses.replace(emb, value=dataclasses.replace(emb.value, gamma=0.5))))


# ----------------------------------------------------------------------------- the planning fine-tune's start
def test_init_from_checkpoint_copies_the_dit_weights_only(ckpt_a, policy):
    from cosmos_policy_lightning.model.module import CosmosPolicyModule

    emb = policy.embodiment.to_dict()
    fresh = CosmosPolicyModule(embodiment=emb, text_dim=0, vae=str(ckpt_a.parent / "tiny_vae"),
                               init_from_checkpoint=str(ckpt_a))
    fresh.configure_model()
    trained = policy.module.dit.state_dict()
    for key, value in fresh.dit.state_dict().items():
        torch.testing.assert_close(value, trained[key].to(value.dtype), rtol=0, atol=0)
    assert fresh.stats is None  # statistics come from the fine-tune's own data module
    wrong = CosmosPolicyModule(embodiment=emb, text_dim=16, vae=str(ckpt_a.parent / "tiny_vae"),
                               init_from_checkpoint=str(ckpt_a))
    with pytest.raises(CosmosPolicyError, match="different transformer config or text width"):
        wrong.configure_model()
