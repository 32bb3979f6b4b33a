"""Tests of the smt-ple plugin (run with the plugin installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import attrs
import pytest
import torch
from smt_ple import PLE, ExtractionLayer, PLEParams

from smt_host import MLP, ConfigError, Host, LossInputs, example_batch, hookimpl, technique
from smt_host.testing import default_ecosystem_path, listed_techniques, load_ecosystem

pytest_plugins = ["smt_host.testing"]

DIST = "smt-ple"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(load=DIST)


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def _fake_task_arch_plugin(priority: int) -> types.ModuleType:
    """A plugin module with one task-arch technique ``other_arch`` (a shared bottom)."""

    class SharedBottom(torch.nn.Module):
        """(B, H) -> T x (B, width): one linear layer shared by every task."""

        def __init__(self, in_dim: int, tasks: int, width: int) -> None:
            super().__init__()
            self.shared = MLP(in_dim, [width])
            self.out_dims = (width,) * tasks

        def forward(self, x):
            h = self.shared(x)
            return [h for _ in self.out_dims]

    @technique(
        name="other_arch", slot="task_arch", priority=priority, applies=lambda m: len(m.tasks) >= 2 or "needs 2+ tasks"
    )
    class OtherArch:
        @hookimpl
        def smt_task_arch(self, ctx):
            return SharedBottom(ctx.in_dim, len(ctx.tasks), 8)

    mod = types.ModuleType(f"fake_task_arch_{priority}")

    @hookimpl
    def smt_techniques():
        return [OtherArch()]

    mod.smt_techniques = smt_techniques
    return mod


def test_smt_plugins_lists_the_distribution():
    (t,) = listed_techniques(DIST, load_only=True).values()  # alone: nothing shadows it
    assert t["version"] == "0.1.0"
    assert (t["name"], t["slot"], t["priority"]) == ("ple", "task_arch", 20)
    assert t["applies_to"] == ["feed_ctr_cvr"]
    assert t["skipped"]["video_install"] == "not applicable: needs 2+ tasks"


def test_ple_fills_the_multi_task_model_only(host, eco):
    plan = host.plan(eco.model("feed_ctr_cvr"))
    assert [e.technique for e in plan.slot("task_arch")] == ["ple"]
    assert plan.slot("task_arch")[0].params == {
        "num_levels": 2,
        "num_shared_experts": 2,
        "num_task_experts": 1,
        "expert_widths": [64],
        "tower_width": None,
    }
    for name in ("feed_ctr", "shop_cvr", "video_ctr", "video_install"):
        assert [e.technique for e in host.plan(eco.model(name)).slot("task_arch")] == ["shared_bottom"], name


def test_ple_wins_over_a_lower_priority_task_arch_in_any_registration_order(eco):
    spec = eco.model("feed_ctr_cvr")
    for priority in (10, 19):
        h = Host.create(load=DIST, extra=[(_fake_task_arch_plugin(priority), "fake")])
        plan = h.plan(spec)
        assert [e.technique for e in plan.slot("task_arch")] == ["ple"]
        reasons = {s.name: s.reason for s in plan.skipped}
        assert reasons["other_arch"] == "shadowed by ple"
        assert reasons["shared_bottom"] == "shadowed by ple"
    # a higher priority beats PLE: priority, not registration order, decides
    h = Host.create(load=DIST, extra=[(_fake_task_arch_plugin(21), "fake")])
    plan = h.plan(spec)
    assert [e.technique for e in plan.slot("task_arch")] == ["other_arch"]
    assert {s.name: s.reason for s in plan.skipped}["ple"] == "shadowed by other_arch"


def test_a_spec_can_pick_the_shadowed_technique(eco):
    h = Host.create(load=DIST, extra=[(_fake_task_arch_plugin(10), "fake")])
    spec = attrs.evolve(eco.model("feed_ctr_cvr"), techniques={"other_arch": True})
    plan = h.plan(spec)
    assert [e.technique for e in plan.slot("task_arch")] == ["other_arch"]
    assert {s.name: s.reason for s in plan.skipped}["ple"] == "shadowed by other_arch"


def _with_mmoe() -> Host:
    pytest.importorskip("smt_mmoe", reason="smt-mmoe is not installed (tox -e all installs it)")
    return Host.create(load="smt-mmoe,smt-ple")


def test_with_mmoe_installed_ple_wins_and_mmoe_is_shadowed(eco):
    h = _with_mmoe()
    plan = h.plan(eco.model("feed_ctr_cvr"))
    assert [e.technique for e in plan.slot("task_arch")] == ["ple"]
    assert {s.name: s.reason for s in plan.skipped}["mmoe"] == "shadowed by ple"


def test_with_mmoe_installed_smt_plan_shows_mmoe_shadowed():
    pytest.importorskip("smt_mmoe", reason="smt-mmoe is not installed")
    env = {**os.environ, "SMT_LOAD_PLUGINS": "smt-mmoe,smt-ple", "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plan", "feed_ctr_cvr"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "mmoe (smt-mmoe): shadowed by ple" in out


@pytest.mark.parametrize(
    "toml",
    [
        "[models.feed_ctr_cvr.techniques.mmoe]\nnum_experts = 3\n",
        "[models.feed_ctr_cvr.techniques]\nmmoe = true\n",
    ],
)
def test_a_spec_can_choose_mmoe_explicitly(tmp_path, toml):
    h = _with_mmoe()
    path = tmp_path / "eco.toml"
    path.write_text(default_ecosystem_path().read_text() + "\n" + toml)
    spec = load_ecosystem(path).model("feed_ctr_cvr")
    plan = h.plan(spec)
    assert [e.technique for e in plan.slot("task_arch")] == ["mmoe"]
    assert {s.name: s.reason for s in plan.skipped}["ple"] == "shadowed by mmoe"
    if "num_experts" in toml:
        assert plan.slot("task_arch")[0].params["num_experts"] == 3


def test_opting_out_of_ple_falls_back(host, eco):
    spec = attrs.evolve(eco.model("feed_ctr_cvr"), techniques={"ple": False})
    plan = host.plan(spec)
    assert [e.technique for e in plan.slot("task_arch")] == ["shared_bottom"]
    assert {s.name: s.reason for s in plan.skipped}["ple"] == "opted out"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_levels": 0}, "must be >= 1, got 0 @ $.models.feed_ctr_cvr.techniques.ple.num_levels"),
        ({"num_shared_experts": -1}, "must be >= 1, got -1 @ $.models.feed_ctr_cvr.techniques.ple.num_shared_experts"),
        ({"tower_width": 0}, "must be >= 1, got 0 @ $.models.feed_ctr_cvr.techniques.ple.tower_width"),
    ],
)
def test_parameter_validation_names_the_path(eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr_cvr"), techniques={"ple": override})
    with pytest.raises(ConfigError) as exc:
        Host.create().plan(spec)
    assert str(exc.value) == message


def test_shapes_levels_and_gates():
    torch.manual_seed(0)
    m = PLE(8, num_tasks=3, num_levels=3, num_shared=2, num_per_task=2, expert_widths=[10, 6], tower_width=4)
    x = torch.randn(5, 8)
    assert [tuple(o.shape) for o in m(x)] == [(5, 4)] * 3
    assert m.out_dims == (4, 4, 4)
    assert len(m.levels) == 3
    assert [lv.shared_gate is None for lv in m.levels] == [False, False, True]  # no shared gate on top
    gates = m.levels[0].gates([x, x, x], x)
    assert [tuple(g.shape) for g in gates] == [(5, 4)] * 3 + [(5, 3 * 2 + 2)]
    for g in gates:
        torch.testing.assert_close(g.sum(-1), torch.ones(5))


def test_one_level_with_uniform_gates_averages_own_and_shared_experts():
    torch.manual_seed(0)
    layer = ExtractionLayer(4, num_tasks=2, num_shared=1, num_per_task=2, expert_widths=[3], shared_gate=True)
    for lin in [*layer.task_gates, layer.shared_gate]:
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
    x0, x1, s = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    (o0, o1), shared = layer([x0, x1], s)
    sh = layer.shared_experts[0](s)
    own0 = [e(x0) for e in layer.task_experts[0]]
    own1 = [e(x1) for e in layer.task_experts[1]]
    torch.testing.assert_close(o0, (own0[0] + own0[1] + sh) / 3)
    torch.testing.assert_close(o1, (own1[0] + own1[1] + sh) / 3)
    torch.testing.assert_close(shared, (sum(own0) + sum(own1) + sh) / 5)


def test_a_task_never_reads_another_tasks_experts():
    torch.manual_seed(0)
    layer = ExtractionLayer(4, num_tasks=2, num_shared=1, num_per_task=1, expert_widths=[3], shared_gate=False)
    x0 = torch.randn(6, 4)
    x1 = torch.randn(6, 4, requires_grad=True)
    (o0, _), _ = layer([x0, x1], torch.randn(6, 4))
    o0.sum().backward()
    assert x1.grad is None or x1.grad.abs().sum() == 0
    assert all(p.grad is None for p in layer.task_experts[1].parameters())


def test_bad_constructor_arguments_raise_value_error():
    with pytest.raises(ValueError, match="got 2, 0, 1, 1"):
        PLE(4, num_tasks=2, num_levels=0, num_shared=1, num_per_task=1, expert_widths=[3], tower_width=2)


def test_build_forward_backward(host, eco):
    spec = eco.model("feed_ctr_cvr")
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    assert isinstance(model.task_arch, PLE)
    batch = example_batch(spec, batch_size=8)
    logits = model(batch.dense, batch.sparse)
    assert logits.shape == (8, 2)
    loss = host.build(plan, spec).loss(LossInputs(logits=logits, labels=torch.ones(8, 2), batch=batch, model=model))
    loss.backward()
    for name, p in model.task_arch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert plan.slot("task_arch")[0].flops > 0


def test_params_defaults():
    assert PLEParams() == PLEParams(
        num_levels=2, num_shared_experts=2, num_task_experts=1, expert_widths=(64,), tower_width=None
    )


def test_conformance(smt_check):
    assert smt_check("ple") == ["tiny_multi"]


def test_docstring_examples_run():
    import doctest

    import smt_ple

    result = doctest.testmod(smt_ple)
    assert result.attempted > 0 and result.failed == 0
