"""Where an interaction branch's output goes (smt_host.model.template): into
the over-arch (the default), beside it (``to_task_arch``: concatenated after
the over-arch's output, DCNv2's parallel form), or onto the logits
(``to_logits``); and a model without task towers (``arch.task_tower = false``)."""

import types

import attrs
import pytest
import torch
from torch import nn

from smt_host import hookimpl, technique
from smt_host.errors import ConfigError, PluginError
from smt_host.host import Host
from smt_host.model.template import example_batch
from smt_host.testing import check_technique

pytest_plugins = ["smt_host.testing"]


class Beside(nn.Module):
    """(B, F, D) -> (B, width), routed beside the over-arch."""

    def __init__(self, in_dim: int, width: int, *, to_task_arch: bool = True, to_logits: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, width)
        self.out_dim = width
        self.to_task_arch = to_task_arch
        self.to_logits = to_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def beside_host(width: int = 5, **flags) -> Host:
    @technique(name="beside", slot="interaction")
    class BesideTechnique:
        @hookimpl
        def smt_interaction(self, ctx):
            return Beside(ctx.num_features * ctx.embedding_dim, width, **flags)

    mod = types.ModuleType("beside_plugin")
    mod.smt_techniques = hookimpl(lambda: [BesideTechnique()])
    return Host.create(load="", extra=[(mod, "beside")])


def no_tower(spec):
    return attrs.evolve(spec, arch=attrs.evolve(spec.arch, task_tower=False))


def test_a_branch_beside_the_over_arch_passes_the_kit():
    assert check_technique("beside", host=beside_host()) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


@pytest.mark.parametrize("model", ["tiny_ctr", "tiny_multi"])
@pytest.mark.parametrize("tower", [True, False])
def test_a_to_task_arch_branch_is_concatenated_after_the_over_arch(smt_tiny_ecosystem, model, tower):
    host = beside_host(width=5)
    spec = smt_tiny_ecosystem.model(model)
    spec = spec if tower else no_tower(spec)
    plan = host.plan(spec)
    m = host.build(plan, spec).members[0].eval()
    assert (m.deep_branches, m.task_branches, m.logit_branches) == (["flat"], ["beside"], [])
    # the over-arch reads the flat branch alone; the task arch reads H + 5
    assert plan.widths["interaction"] == m.branches["flat"].out_dim
    hidden = m.over_arch.out_dim
    want = [spec.arch.task_width if tower else hidden + 5] * len(spec.tasks)
    assert list(m.task_arch.out_dims) == want
    if tower:
        assert m.task_arch.towers[0].in_dim == hidden + 5
    batch = example_batch(spec, 8)
    with torch.no_grad():
        feats = m.features(batch.dense, batch.sparse)
        side = m.branches["beside"](feats)
        assert side.abs().min() > 0
        joined = torch.cat([m.over_arch(m.branches["flat"](feats)), side], dim=1)
        towers = m.task_arch(joined)
        want_logits = torch.stack([h(t) for h, t in zip(m.heads.values(), towers)], dim=1)
        torch.testing.assert_close(m(batch.dense, batch.sparse), want_logits)
        if not tower:  # no tower: each head is a linear logit on [over-arch output, branch output]
            head = m.heads[spec.task_names[0]].linear
            torch.testing.assert_close(m(batch.dense, batch.sparse)[:, 0], (joined @ head.weight.T + head.bias)[:, 0])


def test_a_model_needs_a_branch_feeding_the_over_arch(smt_tiny_ecosystem):
    spec = attrs.evolve(smt_tiny_ecosystem.model("tiny_ctr"), techniques={"flat": False})
    with pytest.raises(ConfigError) as err:
        beside_host().plan(spec)
    assert str(err.value) == (
        "slot 'interaction' of model 'tiny_ctr' has no branch feeding the over-arch "
        "(every branch adds to the logits or skips the over-arch (to_task_arch): ['beside']) "
        "@ $.models.tiny_ctr.techniques"
    )


def test_a_branch_goes_to_one_place(smt_tiny_ecosystem):
    with pytest.raises(PluginError) as err:
        beside_host(width=1, to_logits=True).plan(smt_tiny_ecosystem.model("tiny_ctr"))
    assert str(err.value) == (
        "technique 'beside' (<extra> 0): its interaction branch declares both to_logits and to_task_arch; "
        "it goes to one place"
    )


def test_only_true_routes_a_branch(smt_tiny_ecosystem):
    """``to_task_arch`` must be the bool True: a truthy value is no routing."""
    host = beside_host(to_task_arch=1)
    spec = smt_tiny_ecosystem.model("tiny_ctr")
    m = host.build(host.plan(spec), spec).members[0]
    assert m.task_branches == [] and m.deep_branches == ["flat", "beside"]


@pytest.mark.parametrize("model", ["tiny_ctr", "tiny_multi", "tiny_nodense"])
def test_without_task_towers_each_head_reads_the_over_arch(smt_tiny_ecosystem, model):
    host = Host.create(load="")
    spec = no_tower(smt_tiny_ecosystem.model(model))
    plan = host.plan(spec)
    m = host.build(plan, spec).members[0].eval()
    hidden = m.over_arch.out_dim
    assert plan.widths["task_arch"] == [hidden] * len(spec.tasks)
    assert sum(p.numel() for p in m.task_arch.parameters()) == 0
    assert [h.linear.in_features for h in m.heads.values()] == [hidden] * len(spec.tasks)
    batch = example_batch(spec, 4)
    with torch.no_grad():
        feats = m.features(batch.dense, batch.sparse)
        h = m.over_arch(m.over_arch_input(feats))
        want = torch.stack([head(h) for head in m.heads.values()], dim=1)
        torch.testing.assert_close(m(batch.dense, batch.sparse), want)


def test_task_tower_must_be_a_bool(smt_tiny_ecosystem):
    from smt_host.spec.loading import ecosystem_from_dict

    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(
            {
                "model": {
                    "name": "m",
                    "tasks": [{"name": "click"}],
                    "features": {"sparse": [{"name": "a", "vocab_size": 5}]},
                    "arch": {"task_tower": "no"},
                }
            }
        )
    assert "@ $.models.m.arch.task_tower" in str(err.value)
