"""One set of sampling and planning options (issue 23 item 1): ``serve`` and ``evaluate`` take the fields of
``PolicyOptions`` with the same names, types, defaults and help; planning is on with ``--planning true`` or a
``--planning_checkpoint`` in both; ``build_policy`` builds the policy and planner for both and for Python."""

from __future__ import annotations

import inspect

import pytest

from cosmos_policy_lightning.cli import main
from cosmos_policy_lightning.errors import CosmosPolicyError
from cosmos_policy_lightning.inference.options import OPTION_NAMES, PolicyOptions, build_policy
from cosmos_policy_lightning.inference.server import serve
from cosmos_policy_lightning.sim.evaluate import evaluate

from ..fixtures.checkpoint_factory import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("options"))


def _options(fn) -> dict[str, tuple]:
    params = inspect.signature(fn).parameters
    return {n: (params[n].kind, params[n].default, params[n].annotation) for n in OPTION_NAMES}


def test_serve_and_evaluate_take_the_same_options_with_the_same_defaults():
    assert _options(serve) == _options(evaluate)
    assert {n: d for n, (_, d, _) in _options(serve).items()} == {n: getattr(PolicyOptions(), n) for n in OPTION_NAMES}
    assert "options" not in inspect.signature(serve).parameters
    for name in ("num_steps", "planning", "planning_checkpoint", "num_proposals", "ensemble_steps", "device"):
        line = next(x.strip() for x in serve.__doc__.splitlines() if x.strip().startswith(f"{name}:"))
        assert line in evaluate.__doc__  # the help text too comes from one place


@pytest.mark.parametrize("command", [["serve", "CKPT"], ["evaluate", "metaworld", "--checkpoint", "CKPT"]])
def test_the_cli_options_parse_the_same_in_both_commands(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--planning", "--num-proposals", "4", "--num_steps", "2", "--planning_checkpoint", "P",
              "--print_config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in ("planning: true", "num_proposals: 4", "num_steps: 2", "planning_checkpoint: P", "num_values: 5",
                 "aggregation: majority_mean", "device: cpu"):
        assert line in out.splitlines(), (line, out)


def test_a_planning_checkpoint_turns_planning_on():
    assert not PolicyOptions().plans
    assert PolicyOptions(planning=True).plans
    assert PolicyOptions(planning_checkpoint="judge.ckpt").plans
    assert PolicyOptions(planning=True, planning_checkpoint="judge.ckpt").plans
    with pytest.raises(CosmosPolicyError, match="--planning false with --planning_checkpoint"):
        PolicyOptions(planning=False, planning_checkpoint="judge.ckpt")


@pytest.mark.parametrize("command", [["serve", "missing.ckpt"],
                                     ["evaluate", "metaworld", "--checkpoint", "missing.ckpt"]])
def test_both_commands_refuse_contradicting_or_bad_options_in_one_line(command, tmp_path, capsys):
    assert main([*command, "--planning", "false", "--planning_checkpoint", "judge.ckpt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--planning false with --planning_checkpoint judge.ckpt" in err
    assert main([*command, "--num_steps", "0"]) == 2
    assert "--num_steps must be a positive integer, got 0" in capsys.readouterr().err


def test_evaluate_applies_the_rule_before_loading_anything(tmp_path, capsys):
    # a planning checkpoint alone asks for planning: refused with a baseline and with a server, as --planning is
    base = ["evaluate", "metaworld", "--tasks", "reach-v3", "--output", str(tmp_path),
            "--planning_checkpoint", "j.ckpt"]
    assert main([*base, "--policy", "expert"]) == 2
    assert "--planning (or --planning_checkpoint) needs --policy model" in capsys.readouterr().err
    assert main([*base, "--server", "ws://127.0.0.1:1"]) == 2
    assert "--server runs the server's policy" in capsys.readouterr().err


def test_build_policy_builds_the_planner_the_options_ask_for(ckpt):
    direct = build_policy(ckpt, PolicyOptions(num_steps=2))
    assert direct.planner is None and direct.judge is direct.policy
    built = build_policy(ckpt, PolicyOptions(planning_checkpoint=ckpt, num_steps=2, num_proposals=3, value_steps=1))
    planner = built.planner
    assert planner is not None and built.judge is not built.policy  # the planning checkpoint, loaded on its own
    assert (planner.num_proposals, planner.policy_steps, planner.world_model_steps, planner.value_steps) == (3, 2, 2, 1)
    itself = build_policy(ckpt, PolicyOptions(planning=True))
    assert itself.planner is not None and itself.judge is itself.policy  # no planning checkpoint: it judges itself


@pytest.mark.parametrize(("args", "plans"), [([], False), (["--planning"], True),
                                             (["--planning_checkpoint", "CKPT"], True)])
def test_serve_plans_by_the_same_rule(ckpt, args, plans, monkeypatch):
    import cosmos_policy_lightning.inference.server as server_module

    services = []

    class NoNetwork:  # the server is built, then returns at once instead of listening
        def __init__(self, service, **kwargs):
            services.append(service)

        async def serve(self, handle_signals=False):
            return None

    monkeypatch.setattr(server_module, "PolicyServer", NoNetwork)
    assert main(["serve", str(ckpt), "--num_steps", "2", "--num_proposals", "2",
                 *[str(ckpt) if a == "CKPT" else a for a in args]]) == 0
    (service,) = services
    assert (service.planner is not None) == plans and service.num_steps == 2
    if plans:
        assert service.planner.num_proposals == 2 and service.metadata()["planning"]["policy_steps"] == 2
