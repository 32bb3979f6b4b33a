"""Capacity of a model without task towers (``arch.task_tower = false``):
the FLOPs and parameters the towers cost are gone, and nothing else moves."""

import attrs
import pytest

from smt_host.host import Host

pytest_plugins = ["smt_host.testing"]


@pytest.mark.parametrize("model", ["tiny_ctr", "tiny_multi"])
def test_no_tower_removes_exactly_the_towers_cost(smt_tiny_ecosystem, model):
    host = Host.create(load="")
    spec = smt_tiny_ecosystem.model(model)
    bare = attrs.evolve(spec, arch=attrs.evolve(spec.arch, task_tower=False))
    with_towers, without = host.plan(spec), host.plan(bare)
    t, h, w = len(spec.tasks), with_towers.widths["over_arch"], spec.arch.task_width
    assert without.widths["over_arch"] == h and without.widths["task_arch"] == [h] * t
    # per task, a tower is an (H, W) linear layer (2 H W FLOPs, H W + W parameters) and its
    # head reads W instead of H (2 W vs 2 H FLOPs, W + 1 vs H + 1 parameters)
    assert with_towers.cost.flops - without.cost.flops == t * (2 * h * w + 2 * w - 2 * h)
    assert with_towers.cost.dense_params - without.cost.dense_params == t * (h * w + w + w - h)
    parts = without.cost.parts
    assert parts["task_arch:shared_bottom"] == 0
    assert parts["heads:linear_head"] == t * 2 * h
    assert without.cost.embedding_params == with_towers.cost.embedding_params


def test_neutral_capacity_without_towers_meets_the_budget(smt_tiny_ecosystem):
    host = Host.create(load="")
    spec = smt_tiny_ecosystem.model("tiny_ctr")
    bare = attrs.evolve(spec, arch=attrs.evolve(spec.arch, task_tower=False))
    budget = host.plan(spec).cost.flops  # the towers' FLOPs go to a wider over-arch
    plan = host.plan(attrs.evolve(bare, capacity=attrs.evolve(bare.capacity, budget=budget)))
    assert plan.capacity.scale > 1
    assert abs(plan.cost.flops - budget) <= bare.capacity.tolerance * budget
