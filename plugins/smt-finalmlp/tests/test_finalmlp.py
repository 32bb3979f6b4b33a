"""Tests of the finalmlp technique: the math, the parameters, the host's view."""

from __future__ import annotations

import doctest
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import smt_finalmlp
import torch
from smt_finalmlp import BilinearFusion, FeatureGate, FinalMLPBranch
from torch import nn

from smt_host import ConfigError, Host, example_batch
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def with_params(spec, value):
    return attrs.evolve(spec, techniques={**spec.techniques, "finalmlp": value})


# ------------------------------------------------------------------ the math


def test_docstring_examples_run():
    result = doctest.testmod(smt_finalmlp, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6
    assert result.failed == 0


def test_one_head_fusion_by_hand():
    """z = b + w1 o1 + w2 o2 + o1 W o2 with scalars: 0.25 + 0.5*2 - 1*3 + 2*4*3 = 22.25."""
    fuse = BilinearFusion(1, 1, out_dim=1, num_heads=1)
    with torch.no_grad():
        fuse.linear1.weight.fill_(0.5)
        fuse.linear1.bias.fill_(0.25)
        fuse.linear2.weight.fill_(-1.0)
        fuse.weight.fill_(4.0)
    out = fuse(torch.tensor([[2.0]]), torch.tensor([[3.0]]))
    torch.testing.assert_close(out, torch.tensor([[22.25]]))


def test_multi_head_fusion_sums_per_head_bilinear_forms():
    """Heads are contiguous chunks; each head is a bilinear form; heads add up."""
    torch.manual_seed(0)
    h, d1, d2, out = 3, 6, 9, 4
    fuse = BilinearFusion(d1, d2, out_dim=out, num_heads=h)
    o1, o2 = torch.randn(5, d1), torch.randn(5, d2)
    w = fuse.weight.view(h, d1 // h, out, d2 // h)
    expected = fuse.linear1(o1) + o2 @ fuse.linear2.weight.T
    for j in range(h):
        a = o1[:, j * (d1 // h) : (j + 1) * (d1 // h)]
        c = o2[:, j * (d2 // h) : (j + 1) * (d2 // h)]
        expected = expected + torch.einsum("bi,iok,bk->bo", a, w[j], c)
    torch.testing.assert_close(fuse(o1, o2), expected)
    assert fuse.weight.shape == (h, d1 // h, out * (d2 // h))


def test_gate_is_twice_a_sigmoid():
    gate = FeatureGate(2, 2, 3)
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])
    with torch.no_grad():
        last = gate.mlp.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 100.0, -100.0, 0.0]))
    # gates: 2 sigmoid(0) = 1, 2 sigmoid(100) = 2, 2 sigmoid(-100) = 0
    torch.testing.assert_close(gate(x), torch.tensor([[1.0, -4.0, 0.0, 0.5]]))


def test_gate_reads_only_its_context_features():
    torch.manual_seed(0)
    gate = FeatureGate(3, 2, 4, context=[2, 0])
    assert gate.mlp.in_dim == 4  # two context features of D=2
    x = torch.randn(5, 3, 2)
    expected = x.flatten(1) * 2 * torch.sigmoid(gate.mlp(torch.cat([x[:, 2], x[:, 0]], dim=1)))
    torch.testing.assert_close(gate(x), expected)
    y = x.clone()
    y[:, 1] += 1.0  # not in the context: the gate values stay, only the gated input changes
    torch.testing.assert_close(gate(y)[:, :2], gate(x)[:, :2])
    torch.testing.assert_close(gate(y)[:, 4:], gate(x)[:, 4:])


def test_branch_composes_gates_streams_and_fusion():
    torch.manual_seed(0)
    branch = FinalMLPBranch(3, 4, stream1_widths=[8, 4], stream2_widths=[6], num_heads=2, fusion_dim=5)
    x = torch.randn(7, 3, 4)
    flat = x.flatten(1)
    g1 = flat * 2 * torch.sigmoid(branch.gate1.mlp(flat))
    g2 = flat * 2 * torch.sigmoid(branch.gate2.mlp(flat))
    expected = branch.fusion(branch.stream1(g1), branch.stream2(g2))
    torch.testing.assert_close(branch(x), expected)
    # the two gates are stream-specific: different parameters, different outputs
    assert not torch.allclose(g1, g2)


def test_gating_off_reads_the_flat_embeddings():
    torch.manual_seed(0)
    branch = FinalMLPBranch(3, 4, stream1_widths=[8], stream2_widths=[6], num_heads=2, fusion_dim=5, gating=False)
    assert not any(isinstance(m, FeatureGate) for m in branch.modules())
    x = torch.randn(7, 3, 4)
    flat = x.flatten(1)
    torch.testing.assert_close(branch(x), branch.fusion(branch.stream1(flat), branch.stream2(flat)))


def test_shapes_and_dropout():
    torch.manual_seed(0)
    branch = FinalMLPBranch(5, 4, stream1_widths=[16, 8], stream2_widths=[12], num_heads=4, fusion_dim=3, dropout=0.5)
    x = torch.randn(9, 5, 4)
    assert branch.out_dim == 3
    assert branch(x).shape == (9, 3)
    assert sum(isinstance(m, nn.Dropout) for m in branch.modules()) == 3
    branch.eval()
    torch.testing.assert_close(branch(x), branch(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 3}, "num_heads=3 must be >= 1 and divide dim1=8 and dim2=6"),
        ({"fusion_dim": 0}, "out_dim must be >= 1, got 0"),
    ],
)
def test_branch_refuses_bad_arguments(kwargs, message):
    args = {"stream1_widths": [8], "stream2_widths": [6], "num_heads": 2, "fusion_dim": 5} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        FinalMLPBranch(3, 4, **args)


# --------------------------------------------------------------- parameters

P = "$.models.feed_ctr.techniques.finalmlp"


@pytest.mark.parametrize(
    "value, message",
    [
        (
            {"num_heads": 3},
            "must divide the output width of both streams, got num_heads=3 and stream1_widths[-1]=64"
            f" and stream2_widths[-1]=128 @ {P}.num_heads",
        ),
        (
            {"stream2_widths": [100], "num_heads": 8},
            f"must divide the output width of both streams, got num_heads=8 and stream2_widths[-1]=100 @ {P}.num_heads",
        ),
        ({"num_heads": 0}, f"must be >= 1, got 0 @ {P}.num_heads"),
        ({"stream1_widths": []}, f"must list at least one width, got [] @ {P}.stream1_widths"),
        ({"stream2_widths": [64, 0]}, f"every width must be >= 1, got 0 at [1] @ {P}.stream2_widths"),
        ({"fusion_dim": 0}, f"must be >= 1, got 0 @ {P}.fusion_dim"),
        ({"gate_hidden": -1}, f"must be >= 1, got -1 @ {P}.gate_hidden"),
        ({"dropout": 0.95}, f"must be in [0.0, 0.9], got 0.95 @ {P}.dropout"),
        (
            {"heads": 2},
            f"unknown key 'heads' (did you mean 'num_heads'?); valid keys: stream1_widths, stream2_widths, num_heads, fusion_dim, to_logits, gating, gate_hidden, gate1_context, gate2_context, dropout, batch_norm @ {P}",
        ),
    ],
)
def test_bad_params_name_the_path(host, eco, value, message):
    with pytest.raises(ConfigError) as info:
        host.plan(with_params(eco.model("feed_ctr"), value))
    assert str(info.value) == message


def test_params_reach_the_branch(host, eco):
    value = {
        "stream1_widths": [64, 32],
        "stream2_widths": [48],
        "num_heads": 8,
        "fusion_dim": 16,
        "gating": False,
        "dropout": 0.1,
        "batch_norm": True,
    }
    spec = with_params(eco.model("feed_ctr"), value)
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "finalmlp"]
    assert entry.out_dim == 16
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in entry.params.items()} == value | {
        "gate_hidden": 64,
        "gate1_context": [],
        "gate2_context": [],
        "to_logits": False,
    }
    branch = host.build(plan, spec).members[0].branches["finalmlp"]
    assert (branch.stream1.out_dim, branch.stream2.out_dim, branch.fusion.num_heads) == (32, 48, 8)
    assert not any(isinstance(m, FeatureGate) for m in branch.modules())
    assert sum(isinstance(m, nn.Dropout) for m in branch.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in branch.modules()) == 3


def test_gate_context_names_features(host, eco):
    model = eco.model("feed_ctr")
    names = [f.name for f in model.features.sparse]
    spec = with_params(model, {"gate1_context": [names[2]], "gate2_context": [names[0], names[1]]})
    branch = host.build(host.plan(spec), spec).members[0].branches["finalmlp"]
    assert (branch.gate1.context, branch.gate2.context) == ([2], [0, 1])
    assert branch.gate1.mlp.in_dim == model.embedding_dim


def test_gate_context_unknown_feature_names_the_path(host, eco):
    model = eco.model("feed_ctr")
    names = [f.name for f in model.features.sparse]
    spec = with_params(model, {"gate2_context": ["nope"]})
    with pytest.raises(ConfigError) as err:
        host.build(host.plan(spec), spec).members[0]
    assert str(err.value) == (
        f"names no sparse feature of the model: ['nope']; the model has {names} "
        "@ $.models.feed_ctr.techniques.finalmlp.gate2_context"
    )


def _readme_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_examples_plan(host):
    """Every TOML example of the README, appended to the default ecosystem, plans."""
    blocks = _readme_toml_blocks()
    assert len(blocks) >= 2
    base = default_ecosystem_path().read_text(encoding="utf-8")
    seen = []
    for block in blocks:
        eco = ecosystem_from_dict(tomllib.loads(base + "\n" + block), conv=host.conv)
        seen.append("finalmlp" in host.plan(eco.model("feed_ctr")).techniques())
    assert True in seen and False in seen, "the README shows an override and an opt-out"


# ----------------------------------------------------------------- the host


def test_plan_counts_the_branch_flops(host, eco):
    spec = eco.model("feed_ctr")
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "finalmlp"]
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (entry.slot, entry.dist, entry.version, entry.out_dim) == ("interaction", "smt-finalmlp", "0.2.0", 32)
    # defaults: gates N-64-N, streams N-128-64 and N-128, 4 heads, fusion 32
    gates = 2 * 2 * (n * 64 + 64 * n)
    streams = 2 * (n * 128 + 128 * 64) + 2 * n * 128
    fusion = 2 * 64 * 32 + 2 * 128 * 32 + 2 * 4 * 16 * 32 * 32 + 2 * 4 * 32 * 32
    assert entry.flops == gates + streams + fusion
    branch = host.build(plan, spec).members[0].branches["finalmlp"]
    weights = (
        2 * (n * 64 + 64 + 64 * n + n)
        + (n * 128 + 128 + 128 * 64 + 64)
        + (n * 128 + 128)
        + (64 * 32 + 32 + 128 * 32 + 4 * 16 * 32 * 32)
    )
    assert sum(p.numel() for p in branch.parameters()) == weights
    base = host.plan(spec, without=frozenset({"finalmlp"}))
    assert plan.widths["interaction"] == base.widths["interaction"] + 32


def test_opt_out_and_disable(host, eco):
    plan = host.plan(with_params(eco.model("feed_ctr"), False))
    assert "finalmlp" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "finalmlp"] == ["opted out"]
    blocked = Host.create(disable="smt-finalmlp")
    assert "finalmlp" not in blocked.spm.techniques
    assert "finalmlp" not in blocked.plan(eco.model("feed_ctr")).techniques()


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr", "video_install"])
@pytest.mark.parametrize("value", [True, {"gating": False}, {"num_heads": 1, "dropout": 0.2}])
def test_gradients_reach_every_branch_parameter(host, eco, model, value):
    spec = with_params(eco.model(model), value)
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = net(batch.dense, batch.sparse)
    assert logits.shape == (8, len(spec.tasks))
    logits.sum().backward()
    params = dict(net.branches["finalmlp"].named_parameters())
    assert params
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert [n for n, p in params.items() if not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize(
    "value",
    [True, {"gating": False}, {"stream1_widths": [16, 8], "stream2_widths": [12], "num_heads": 2, "fusion_dim": 4}],
)
def test_conformance(smt_check, smt_tiny_ecosystem, value):
    eco = smt_tiny_ecosystem
    eco = attrs.evolve(eco, models={n: with_params(m, value) for n, m in eco.models.items()})
    assert smt_check("finalmlp", ecosystem=eco) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_conformance_defaults(smt_check):
    assert smt_check("finalmlp") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_to_logits_gives_one_logit_per_task_added_to_the_logits(host, eco, model):
    base = eco.model(model)
    spec = with_params(base, {"to_logits": True, "fusion_dim": 99})
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "finalmlp"]
    assert entry.out_dim == len(base.tasks)
    built = host.build(plan, spec).members[0].eval()
    assert built.logit_branches == ["finalmlp"] and "finalmlp" not in built.deep_branches
    assert plan.widths["interaction"] == sum(built.branches[n].out_dim for n in built.deep_branches)
    batch = example_batch(spec, 4)
    with torch.no_grad():
        wide = built.branches["finalmlp"](built.features(batch.dense, batch.sparse))
        assert wide.shape == (4, len(base.tasks))
        with_wide = built(batch.dense, batch.sparse)
        built.branches["finalmlp"].fusion.linear1.bias.add_(1.5)
        torch.testing.assert_close(built(batch.dense, batch.sparse), with_wide + 1.5)
