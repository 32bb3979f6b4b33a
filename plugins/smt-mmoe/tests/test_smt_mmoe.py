"""Tests of the smt-mmoe plugin (run with the plugin installed)."""

from __future__ import annotations

import attrs
import pytest
import smt_mmoe
import torch
from smt_mmoe import MMoE, MMoEParams

from smt_host import ConfigError, Host, LossInputs, example_batch
from smt_host.testing import listed_techniques

pytest_plugins = ["smt_host.testing"]

DIST = "smt-mmoe"


@pytest.fixture(scope="module")
def host() -> Host:
    # this distribution alone: another task-arch plugin (smt-ple) would shadow mmoe
    return Host.create(load=DIST)


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def test_smt_plugins_lists_the_distribution():
    (t,) = listed_techniques(DIST, load_only=True).values()  # alone: nothing shadows it
    assert t["version"] == "0.1.0"
    assert (t["name"], t["slot"], t["priority"]) == ("mmoe", "task_arch", 10)
    assert t["applies_to"] == ["feed_ctr_cvr"]
    assert t["skipped"]["feed_ctr"] == "not applicable: needs 2+ tasks"


def test_multi_task_model_uses_mmoe_single_task_models_do_not(host, eco):
    plan = host.plan(eco.model("feed_ctr_cvr"))
    assert [e.technique for e in plan.slot("task_arch")] == ["mmoe"]
    assert ("shared_bottom", "shadowed by mmoe") in [(s.name, s.reason) for s in plan.skipped]
    assert plan.slot("task_arch")[0].params == {"num_experts": 4, "expert_widths": [64], "tower_width": None}
    for name in ("feed_ctr", "shop_cvr", "video_ctr", "video_install"):
        plan = host.plan(eco.model(name))
        assert [e.technique for e in plan.slot("task_arch")] == ["shared_bottom"], name


def test_enabling_mmoe_on_a_single_task_model_is_an_error(host, eco):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"mmoe": True})
    with pytest.raises(ConfigError) as exc:
        host.plan(spec)
    assert str(exc.value) == (
        "technique 'mmoe' is enabled but does not apply to this model: needs 2+ tasks @ $.models.feed_ctr.techniques.mmoe"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_experts": 0}, "must be >= 1, got 0 @ $.models.feed_ctr_cvr.techniques.mmoe.num_experts"),
        (
            {"expert_widths": [32, 0]},
            "every width must be >= 1, got 0 at [1] @ $.models.feed_ctr_cvr.techniques.mmoe.expert_widths",
        ),
        (
            {"experts": 3},
            "unknown key 'experts' (did you mean 'num_experts'?); valid keys: num_experts, expert_widths, tower_width @ $.models.feed_ctr_cvr.techniques.mmoe",
        ),
    ],
)
def test_parameter_validation_names_the_path(eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr_cvr"), techniques={"mmoe": override})
    with pytest.raises(ConfigError) as exc:
        Host.create().plan(spec)
    assert str(exc.value) == message


def test_overrides_reach_the_module(host, eco):
    spec = attrs.evolve(
        eco.model("feed_ctr_cvr"), techniques={"mmoe": {"num_experts": 3, "expert_widths": [32, 24], "tower_width": 16}}
    )
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    assert isinstance(model.task_arch, MMoE)
    assert len(model.task_arch.experts) == 3
    assert model.task_arch.out_dims == (16, 16)
    assert plan.widths["task_arch"] == [16, 16]


def test_shapes_and_gates_sum_to_one():
    torch.manual_seed(0)
    m = MMoE(8, num_tasks=3, num_experts=5, expert_widths=[12, 6], tower_width=4)
    x = torch.randn(7, 8)
    outs = m(x)
    assert [tuple(o.shape) for o in outs] == [(7, 4)] * 3
    assert m.out_dims == (4, 4, 4)
    g = m.gates(x)
    assert g.shape == (7, 3, 5)
    assert (g > 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(7, 3))


def test_uniform_gates_average_the_experts():
    torch.manual_seed(0)
    m = MMoE(8, num_tasks=2, num_experts=4, expert_widths=[6], tower_width=3)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.zero_()
    x = torch.randn(5, 8)
    mean = torch.stack([e(x) for e in m.experts]).mean(0)
    for t, out in enumerate(m(x)):
        torch.testing.assert_close(out, m.towers[t](mean))


def test_gates_differ_per_task_and_route_to_one_expert():
    torch.manual_seed(0)
    m = MMoE(4, num_tasks=2, num_experts=2, expert_widths=[3], tower_width=2)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 50.0]))  # task 0 -> expert 0, task 1 -> expert 1
    x = torch.randn(6, 4)
    out0, out1 = m(x)
    torch.testing.assert_close(out0, m.towers[0](m.experts[0](x)))
    torch.testing.assert_close(out1, m.towers[1](m.experts[1](x)))


def test_bad_constructor_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_experts >= 1, got 2 and 0"):
        MMoE(4, num_tasks=2, num_experts=0, expert_widths=[3], tower_width=2)


def test_build_forward_backward(host, eco):
    spec = eco.model("feed_ctr_cvr")
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = model(batch.dense, batch.sparse)
    assert logits.shape == (8, 2)
    labels = torch.tensor([[1.0, 0.0]] * 8)
    loss = host.build(plan, spec).loss(LossInputs(logits=logits, labels=labels, batch=batch, model=model))
    loss.backward()
    for name, p in model.task_arch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert plan.slot("task_arch")[0].flops > 0


def test_params_defaults():
    assert MMoEParams() == MMoEParams(num_experts=4, expert_widths=(64,), tower_width=None)
    assert smt_mmoe.smt_techniques()[0].smt_technique.name == "mmoe"


def test_conformance(smt_check):
    assert smt_check("mmoe") == ["tiny_multi"]


@pytest.mark.slow
def test_short_training_learns_clicks(host, eco, tmp_path):
    from smt_host.testing import train_model

    small = attrs.evolve(
        eco, synthetic=attrs.evolve(eco.synthetic, train_examples=20000, valid_examples=5000, test_examples=5000)
    )
    spec = small.model("feed_ctr_cvr")
    # 1 epoch of 20k examples: batches of 128 give enough steps (1024 give 20, too few for any arch)
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, batch_size=128))
    result = train_model(host, spec, small, tmp_path)
    assert result.plan.slot("task_arch")[0].technique == "mmoe"
    # 5000 test rows (~170 clicks): an AUC standard error of about 0.02, so 0.57 is 3 of them above chance
    assert result.test["click"]["auc"] > 0.57, result.test


def test_docstring_examples_run():
    import doctest

    import smt_mmoe

    result = doctest.testmod(smt_mmoe)
    assert result.attempted > 0 and result.failed == 0
