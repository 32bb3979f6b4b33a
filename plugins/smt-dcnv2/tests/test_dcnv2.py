"""Tests of the dcnv2 technique: the math, the parameters, the host's view."""

from __future__ import annotations

import doctest
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import smt_dcnv2
import torch
from smt_dcnv2 import DCNv2Branch

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
    return attrs.evolve(spec, techniques={**spec.techniques, "dcnv2": value})


# ------------------------------------------------------------------ the math


def test_docstring_examples_run():
    result = doctest.testmod(smt_dcnv2, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4
    assert result.failed == 0


@pytest.mark.parametrize(
    "kwargs, cross",
    [
        ({}, "CrossNet"),
        ({"low_rank": 8}, "LowRankCrossNet"),
        ({"low_rank": 8, "num_experts": 3}, "LowRankMixtureCrossNet"),
    ],
)
def test_shapes_and_form(kwargs, cross):
    torch.manual_seed(0)
    branch = DCNv2Branch(5, 4, num_layers=2, **kwargs)
    assert type(branch.cross).__name__ == cross
    assert branch.out_dim == 20
    out = branch(torch.randn(7, 5, 4))
    assert out.shape == (7, 20)
    assert torch.isfinite(out).all()


def test_one_full_rank_layer_by_hand():
    """x1 = x0 * (W x0 + b) + x0, computed on paper."""
    branch = DCNv2Branch(2, 2, num_layers=1)
    w = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, -1]])
    b = torch.tensor([1.0, 0, -1, 0.5])
    with torch.no_grad():
        branch.cross.kernels[0].copy_(w)
        branch.cross.bias[0].copy_(b.unsqueeze(1))
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, F=2, D=2), flat [1, 2, 3, 4]
    # W x = [1, 4, 3, -4]; + b = [2, 4, 2, -3.5]; x0 * that = [2, 8, 6, -14]; + x = [3, 10, 9, -10]
    torch.testing.assert_close(branch(x), torch.tensor([[3.0, 10.0, 9.0, -10.0]]))


def test_one_low_rank_layer_by_hand():
    """x1 = x0 * (U (V x0) + b) + x0 with U (N, 1), V (1, N)."""
    branch = DCNv2Branch(2, 2, num_layers=1, low_rank=1)
    with torch.no_grad():
        branch.cross.V_kernels[0].copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
        branch.cross.W_kernels[0].copy_(torch.tensor([[1.0], [0.0], [-1.0], [0.1]]))
        branch.cross.bias[0].zero_()
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # V x = 10; U (V x) = [10, 0, -10, 1]; x0 * that = [10, 0, -30, 4]; + x = [11, 2, -27, 8]
    torch.testing.assert_close(branch(x), torch.tensor([[11.0, 2.0, -27.0, 8.0]]))


def test_stacked_full_rank_layers_follow_the_recursion():
    torch.manual_seed(0)
    branch = DCNv2Branch(3, 2, num_layers=3)
    x = torch.randn(4, 3, 2)
    x0 = x.flatten(1)
    xl = x0
    for w, b in zip(branch.cross.kernels, branch.cross.bias):
        xl = x0 * (xl @ w.T + b.squeeze(1)) + xl
    torch.testing.assert_close(branch(x), xl)


def test_mixture_of_low_rank_experts_follows_the_paper():
    """DCN-Mix (eq. 4): x_{l+1} = sum_i softmax(g(x_l))_i x0 * (U_i relu(C_i relu(V_i x_l)) + b) + x_l."""
    torch.manual_seed(0)
    k, r = 3, 2
    branch = DCNv2Branch(3, 2, num_layers=2, low_rank=r, num_experts=k)
    m = branch.cross
    with torch.no_grad():  # non-zero biases so they are checked too
        for b in m.bias:
            b.normal_()
    x = torch.randn(5, 3, 2)
    x0 = x.flatten(1)
    xl = x0
    for layer in range(2):
        gate = torch.softmax(torch.cat([g(xl) for g in m.gates], dim=1), dim=1)  # (B, K)
        mixed = torch.zeros_like(xl)
        for i in range(k):
            h = torch.relu(xl @ m.V_kernels[layer][i].T)
            h = torch.relu(h @ m.C_kernels[layer][i].T)
            expert = x0 * (h @ m.U_kernels[layer][i].T + m.bias[layer].squeeze(1))
            mixed = mixed + gate[:, i : i + 1] * expert
        xl = mixed + xl
    torch.testing.assert_close(branch(x), xl)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_layers": 0}, "num_layers must be >= 1, got 0"),
        ({"low_rank": 0}, "low_rank must be None or >= 1, got 0"),
        ({"num_experts": 2}, "num_experts=2 needs low_rank (the mixture's experts are low rank), got None"),
        ({"structure": "serial"}, "structure must be one of 'stacked', 'parallel', got 'serial'"),
    ],
)
def test_branch_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DCNv2Branch(3, 2, **kwargs)


# --------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "value, message",
    [
        ({"num_layers": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dcnv2.num_layers"),
        ({"low_rank": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dcnv2.low_rank"),
        ({"num_experts": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dcnv2.num_experts"),
        (
            {"num_experts": 4},
            "a mixture of 4 experts needs low_rank (the experts are low rank), got low_rank=None"
            " @ $.models.feed_ctr.techniques.dcnv2.num_experts",
        ),
        (
            {"lowrank": 8},
            "unknown key 'lowrank' (did you mean 'low_rank'?); valid keys: num_layers, low_rank, num_experts, structure @ $.models.feed_ctr.techniques.dcnv2",
        ),
        (
            {"structure": "serial"},
            "must be one of 'stacked', 'parallel', got 'serial' @ $.models.feed_ctr.techniques.dcnv2.structure",
        ),
        (
            {"num_layers": "three"},
            "expected an integer, got the string 'three' @ $.models.feed_ctr.techniques.dcnv2.num_layers",
        ),
    ],
)
def test_bad_params_name_the_path(host, eco, value, message):
    with pytest.raises(ConfigError) as info:
        host.plan(with_params(eco.model("feed_ctr"), value))
    assert str(info.value) == message


def test_params_reach_the_branch(host, eco):
    spec = with_params(eco.model("feed_ctr"), {"num_layers": 2, "low_rank": 16, "num_experts": 2})
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "dcnv2"]
    assert entry.params == {"num_layers": 2, "low_rank": 16, "num_experts": 2, "structure": "stacked"}
    model = host.build(plan, spec).members[0]
    cross = model.branches["dcnv2"].cross
    assert type(cross).__name__ == "LowRankMixtureCrossNet"
    assert (cross._num_layers, cross._low_rank, cross._num_experts) == (2, 16, 2)


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
        spec = eco.model("feed_ctr")
        plan = host.plan(spec)
        seen.append("dcnv2" in plan.techniques())
    assert True in seen and False in seen, "the README shows an override and an opt-out"


# ----------------------------------------------------------------- the host


def test_plan_counts_the_cross_flops(host, eco):
    spec = eco.model("feed_ctr")
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "dcnv2"]
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (entry.slot, entry.dist, entry.version, entry.out_dim) == ("interaction", "smt-dcnv2", "0.2.0", n)
    # three full-rank layers: an (N, N) matrix-vector product each, 2 N^2 FLOPs
    assert entry.flops == 3 * 2 * n * n
    branch = host.build(plan, spec).members[0].branches["dcnv2"]
    assert sum(p.numel() for p in branch.parameters()) == 3 * (n * n + n)
    base = host.plan(spec, without=frozenset({"dcnv2"}))
    assert plan.widths["interaction"] == base.widths["interaction"] + n


def test_opt_out_and_disable(host, eco):
    spec = with_params(eco.model("feed_ctr"), False)
    plan = host.plan(spec)
    assert "dcnv2" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "dcnv2"] == ["opted out"]
    blocked = Host.create(disable="smt-dcnv2")
    assert "dcnv2" not in blocked.spm.techniques
    assert "dcnv2" not in blocked.plan(eco.model("feed_ctr")).techniques()


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr", "video_install"])
@pytest.mark.parametrize(
    "value",
    [
        True,
        {"low_rank": 16},
        {"low_rank": 8, "num_experts": 3, "num_layers": 2},
        {"structure": "parallel", "low_rank": 8},
    ],
)
def test_gradients_reach_every_branch_parameter(host, eco, model, value):
    spec = with_params(eco.model(model), value)
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = net(batch.dense, batch.sparse)
    assert logits.shape == (8, len(spec.tasks))
    logits.sum().backward()
    params = dict(net.branches["dcnv2"].named_parameters())
    assert params
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # every kernel, bias and gate is used: some gradient entry is non-zero
    assert [n for n, p in params.items() if not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize(
    "value",
    [
        True,
        {"low_rank": 4},
        {"low_rank": 4, "num_experts": 2, "num_layers": 2},
        {"structure": "parallel"},
    ],
)
def test_conformance(smt_check, smt_tiny_ecosystem, value):
    eco = smt_tiny_ecosystem
    eco = attrs.evolve(eco, models={n: with_params(m, value) for n, m in eco.models.items()})
    assert smt_check("dcnv2", ecosystem=eco) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_conformance_defaults(smt_check):
    assert smt_check("dcnv2") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


# --------------------------------------------------------------- structures

RECIPE = Path(__file__).resolve().parents[3] / "benchmarks" / "recipes" / "frappe_dcnv2.toml"


def _manual_logits(net, feats, *, parallel: bool):
    """The logits of the paper's structures, from the parts' own modules:
    parallel head(tower([MLP(x_0), x_L])), stacked (no flat branch) head(tower(MLP(x_L)))."""
    cross = net.branches["dcnv2"](feats)
    if parallel:
        joined = torch.cat([net.over_arch(net.branches["flat"](feats)), cross], dim=1)
    else:
        joined = net.over_arch(cross)
    towers = net.task_arch(joined)
    return torch.stack([head(t) for head, t in zip(net.heads.values(), towers)], dim=1)


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_parallel_puts_the_cross_output_beside_the_deep_network(host, eco, model):
    spec = with_params(eco.model(model), {"structure": "parallel", "num_layers": 2})
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0].eval()
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (net.deep_branches, net.task_branches) == (["flat"], ["dcnv2"])
    assert plan.widths["interaction"] == net.branches["flat"].out_dim  # the over-arch reads x_0 alone
    hidden = net.over_arch.out_dim
    assert [t.in_dim for t in net.task_arch.towers] == [hidden + n] * len(spec.tasks)
    batch = example_batch(spec, 6)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        torch.testing.assert_close(net(batch.dense, batch.sparse), _manual_logits(net, feats, parallel=True))


def test_stacked_without_flat_is_the_papers_stacked_form(host, eco):
    base = eco.model("feed_ctr")
    spec = attrs.evolve(base, techniques={**base.techniques, "flat": False, "dcnv2": {"structure": "stacked"}})
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0].eval()
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (net.deep_branches, net.task_branches) == (["dcnv2"], [])
    assert plan.widths["interaction"] == n  # the over-arch reads x_L alone
    batch = example_batch(spec, 6)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        torch.testing.assert_close(net(batch.dense, batch.sparse), _manual_logits(net, feats, parallel=False))


def test_the_default_stays_the_0_1_form(host, eco):
    """structure unset: the cross output feeds the over-arch beside the flat branch, as in 0.1."""
    spec = eco.model("feed_ctr")
    net = host.build(host.plan(spec), spec).members[0]
    assert net.branches["dcnv2"].structure == "stacked"
    assert (net.deep_branches, net.task_branches) == (["flat", "dcnv2"], [])


@pytest.mark.skipif(not RECIPE.exists(), reason="the benchmark recipe lives in the smt repository")
def test_the_frappe_recipe_builds_the_bars_network_exactly(host):
    """benchmarks/recipes/frappe_dcnv2.toml is the DCNv2 of BARS/FuxiCTR:
    cross network (4 full-rank layers) || DNN 400x3 with BatchNorm -> concat ->
    one linear logit, with 404,501 dense parameters (FuxiCTR's log: 458,391
    in all, 53,890 of them its embedding rows)."""
    spec = host.load_ecosystem(str(RECIPE)).model("frappe")
    plan = host.plan(spec, only=frozenset({"dcnv2"}))
    net = host.build(plan, spec).members[0].eval()
    n, h = 10 * 10, 400
    assert (net.deep_branches, net.task_branches, net.logit_branches) == (["flat"], ["dcnv2"], [])
    assert type(net.branches["dcnv2"].cross).__name__ == "CrossNet" and len(net.branches["dcnv2"].cross.kernels) == 4
    assert list(net.task_arch.out_dims) == [h + n] and sum(p.numel() for p in net.task_arch.parameters()) == 0
    cross = 4 * (n * n + n)
    dnn = (n * h + h) + 2 * (h * h + h) + 3 * 2 * h  # linear layers, and BatchNorm's scale and shift
    logit = (h + n) + 1
    assert cross + dnn + logit == 404_501
    assert plan.cost.dense_params == 404_501
    assert plan.cost.flops == 4 * 2 * n * n + 2 * (n * h + 2 * h * h) + 2 * (h + n)  # 801,000
    batch = example_batch(spec, 5)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        x0 = feats.flatten(1)
        xl = x0
        for w, b in zip(net.branches["dcnv2"].cross.kernels, net.branches["dcnv2"].cross.bias):
            xl = x0 * (xl @ w.T + b.squeeze(1)) + xl  # x_{l+1} = x_0 * (W x_l + b) + x_l
        deep = net.over_arch(x0)
        head = net.heads["click"].linear
        want = (torch.cat([deep, xl], dim=1) @ head.weight.T + head.bias)[:, 0]
        torch.testing.assert_close(net(batch.dense, batch.sparse)[:, 0], want)
