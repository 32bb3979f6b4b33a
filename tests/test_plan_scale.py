"""Planning at scale: the fast neutral-capacity bisection (smt_host.model.plan,
``make_plan(fast=True)``) gives the same plans as whole builds at every
scale, and falls back to them when its prediction is off."""

from __future__ import annotations

import attrs
import pytest
import torch

from smt_host import Host
from smt_host.errors import CapacityError
from smt_host.model import plan as plan_mod


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()  # the installed plugins too: their plans must match as well


@pytest.fixture(scope="module")
def specs(host: Host) -> list:
    eco = host.default_ecosystem()
    return [attrs.evolve(s, capacity=attrs.evolve(s.capacity, budget="baseline")) for s in eco.models.values()]


def same(a, b) -> None:
    assert a.capacity == b.capacity
    assert a.cost == b.cost
    assert a.entries == b.entries and a.widths == b.widths


def plan_or_error(host: Host, spec, **kw):
    """The plan, or the message of the CapacityError (a baseline budget is
    out of reach where many techniques are installed)."""
    try:
        return host.plan(spec, **kw)
    except CapacityError as exc:
        return str(exc)


def test_fast_plans_equal_whole_builds_at_baseline(host: Host, specs: list) -> None:
    for spec in specs:
        fast, slow = plan_or_error(host, spec), plan_or_error(host, spec, fast=False)
        if isinstance(fast, str):
            assert fast == slow
        else:
            same(fast, slow)


@pytest.mark.parametrize("factor", [0.55, 1.8])
def test_fast_bisection_equals_whole_builds(host: Host, specs: list, factor: float) -> None:
    spec = specs[1]  # two tasks: two towers and heads behind the over-arch
    budget = factor * host.plan(spec, budget=None).cost.flops
    fast, slow = host.plan(spec, budget=budget), host.plan(spec, budget=budget, fast=False)
    assert fast.capacity.scale != 1.0  # it bisected
    assert abs(fast.capacity.achieved - budget) <= spec.capacity.tolerance * budget
    same(fast, slow)


def test_a_wrong_prediction_falls_back_to_whole_builds(
    host: Host, specs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = specs[0]
    budget = 0.6 * host.plan(spec, budget=None).cost.flops
    slow = host.plan(spec, budget=budget, fast=False)
    real = plan_mod._tail_flops

    def off(spec, res, spm, member, scale):
        return real(spec, res, spm, member, scale) * (1.0 if scale == 1.0 else 0.9)

    monkeypatch.setattr(plan_mod, "_tail_flops", off)
    same(host.plan(spec, budget=budget), slow)


def test_budget_out_of_reach_is_the_same_error(host: Host, specs: list) -> None:
    messages = []
    for fast in (True, False):
        with pytest.raises(CapacityError) as err:
            host.plan(specs[0], budget=10.0, fast=fast)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert "cannot meet its capacity budget" in messages[0]


def test_planning_leaves_the_thread_count(host: Host, specs: list) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        host.plan(specs[0], budget=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
