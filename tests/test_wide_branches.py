"""Interaction branches that add to the logits (``to_logits``): the wide part
of Wide & Deep / DeepFM, FinalMLP's fusion logit."""

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


class LinearLogits(nn.Module):
    """A logistic-regression wide part: (B, F, D) -> (B, T)."""

    to_logits = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def wide_host(extra_width: int = 0) -> Host:
    @technique(name="lr_wide", slot="interaction")
    class LRWide:
        @hookimpl
        def smt_interaction(self, ctx):
            return LinearLogits(ctx.num_features * ctx.embedding_dim, len(ctx.tasks) + extra_width)

    mod = types.ModuleType("lr_wide_plugin")
    mod.smt_techniques = hookimpl(lambda: [LRWide()])
    return Host.create(load="", extra=[(mod, "lr_wide")])


def test_a_wide_branch_passes_the_kit():
    assert check_technique("lr_wide", host=wide_host()) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


@pytest.mark.parametrize("model", ["tiny_ctr", "tiny_multi"])
def test_wide_output_is_added_to_the_heads_logits(smt_tiny_ecosystem, model):
    host = wide_host()
    spec = smt_tiny_ecosystem.model(model)
    plan = host.plan(spec)
    m = host.build(plan, spec).members[0].eval()
    assert (m.deep_branches, m.logit_branches) == (["flat"], ["lr_wide"])
    assert plan.widths["interaction"] == m.branches["flat"].out_dim  # the wide part does not widen the over-arch
    (entry,) = [e for e in plan.entries if e.technique == "lr_wide"]
    assert entry.out_dim == len(spec.tasks) and entry.flops > 0
    batch = example_batch(spec, 8)
    with torch.no_grad():
        feats = m.features(batch.dense, batch.sparse)
        towers = m.task_arch(m.over_arch(m.branches["flat"](feats)))
        deep = torch.stack([h(t) for h, t in zip(m.heads.values(), towers)], dim=1)
        wide = m.branches["lr_wide"](feats)
        assert wide.abs().min() > 0
        torch.testing.assert_close(m(batch.dense, batch.sparse), deep + wide)


def test_a_wide_branch_must_give_one_logit_per_task(smt_tiny_ecosystem):
    with pytest.raises(PluginError) as err:
        wide_host(extra_width=2).plan(smt_tiny_ecosystem.model("tiny_ctr"))
    assert str(err.value) == (
        "technique 'lr_wide' (<extra> 0): its interaction branch adds to the logits "
        "(to_logits) so its out_dim must be T=1, got 3"
    )


def test_a_model_needs_a_branch_feeding_the_over_arch(smt_tiny_ecosystem):
    spec = smt_tiny_ecosystem.model("tiny_ctr")
    spec = attrs.evolve(spec, techniques={"flat": False})
    with pytest.raises(ConfigError) as err:
        wide_host().plan(spec)
    assert str(err.value) == (
        "slot 'interaction' of model 'tiny_ctr' has no branch feeding the over-arch "
        "(every branch adds to the logits: ['lr_wide']) @ $.models.tiny_ctr.techniques"
    )
