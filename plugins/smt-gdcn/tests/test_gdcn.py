"""Tests of the gdcn technique: the gated cross math, the parameters, the structures, the host's view."""

from __future__ import annotations

import doctest
import math
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import smt_gdcn
import torch
from smt_gdcn import GatedCrossNet, GDCNBranch, GDCNParams

from smt_host import ConfigError, Host, example_batch
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPE = Path(__file__).resolve().parents[3] / "benchmarks" / "recipes" / "frappe_gdcn.toml"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def with_params(spec, value):
    return attrs.evolve(spec, techniques={**spec.techniques, "gdcn": value})


def paper_gcn(gcn: GatedCrossNet, x0: torch.Tensor) -> torch.Tensor:
    """The paper's recursion, written out from the module's own weights:
    c_{l+1} = c_0 * (W^c_l c_l + b_l) * sigmoid(W^g_l c_l) + c_l."""
    c = x0
    for layer in range(gcn.num_layers):
        w_c = gcn.cross[layer].weight  # (N, N)
        b = gcn.cross[layer].bias  # (N,)
        w_g = gcn.gate[layer].weight  # (N, N)
        crossed = c @ w_c.T + b  # W^c c_l + b, (B, N)
        gate = 1.0 / (1.0 + torch.exp(-(c @ w_g.T)))  # sigma(W^g c_l), (B, N)
        c = x0 * crossed * gate + c
    return c


# ------------------------------------------------------------------ the math


def test_docstring_examples_run():
    result = doctest.testmod(smt_gdcn, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6
    assert result.failed == 0


def test_one_layer_by_hand():
    """c1 = c0 * (W^c c0 + b) * sigmoid(W^g c0) + c0, computed on paper."""
    branch = GDCNBranch(2, 2, num_layers=1)
    gcn = branch.gcn
    w_c = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, -1]])
    b = torch.tensor([1.0, 0, -1, 0.5])
    ln3 = math.log(3.0)
    # gate logits on c0 = [1, 2, 3, 4]: [ln 3, 0, -ln 3, 0] -> gates [0.75, 0.5, 0.25, 0.5]
    w_g = torch.tensor([[ln3, 0, 0, 0], [0, 0, 0, 0], [-ln3, 0, 0, 0], [0, 0, 0, 0]])
    with torch.no_grad():
        gcn.cross[0].weight.copy_(w_c)
        gcn.cross[0].bias.copy_(b)
        gcn.gate[0].weight.copy_(w_g)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, F=2, D=2), flat [1, 2, 3, 4]
    # W^c c0 = [1, 4, 3, -4]; + b = [2, 4, 2, -3.5]; c0 * that = [2, 8, 6, -14]
    # * gates = [1.5, 4, 1.5, -7]; + c0 = [2.5, 6, 4.5, -3]
    torch.testing.assert_close(branch(x), torch.tensor([[2.5, 6.0, 4.5, -3.0]]))
    torch.testing.assert_close(gcn.gates(x.flatten(1))[0], torch.tensor([[0.75, 0.5, 0.25, 0.5]]))


def test_a_zero_gate_matrix_halves_the_dcnv2_cross():
    """W^g = 0: every gate is 1/2, so c_{l+1} = c_0 * (W^c c_l + b) / 2 + c_l, two layers by hand."""
    gcn = GatedCrossNet(2, num_layers=2)
    with torch.no_grad():
        for layer, (w, b) in enumerate(
            [([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), ([[0.0, 1.0], [1.0, 0.0]], [1.0, -1.0])]
        ):
            gcn.cross[layer].weight.copy_(torch.tensor(w))
            gcn.cross[layer].bias.copy_(torch.tensor(b))
            gcn.gate[layer].weight.zero_()
    x0 = torch.tensor([[2.0, -1.0]])
    # layer 0: W c0 + b = [2, -1]; c0 * that = [4, 1]; / 2 = [2, 0.5]; + c0 -> c1 = [4, -0.5]
    # layer 1: W c1 + b = [-0.5 + 1, 4 - 1] = [0.5, 3]; c0 * that = [1, -3]; / 2 = [0.5, -1.5]; + c1 = [4.5, -2]
    torch.testing.assert_close(gcn(x0), torch.tensor([[4.5, -2.0]]))


@pytest.mark.parametrize("num_layers", [1, 3, 5])
def test_deep_stack_follows_the_papers_recursion(num_layers):
    """Several layers deep, with the module's own randomised weights (biases U[0, 1))."""
    torch.manual_seed(num_layers)
    branch = GDCNBranch(4, 3, num_layers=num_layers)
    x = torch.randn(6, 4, 3)
    with torch.no_grad():
        want = paper_gcn(branch.gcn, x.flatten(1))
        torch.testing.assert_close(branch(x), want)
    # the gate matters: the same weights without it (DCNv2's layer) give another output
    assert len(branch.gcn.cross) == len(branch.gcn.gate) == num_layers
    with torch.no_grad():
        c0 = c = x.flatten(1)
        for cross in branch.gcn.cross:
            c = c0 * cross(c) + c
        assert not torch.allclose(c, want, atol=1e-3)


def test_gates_are_the_recursions_sigmoids():
    torch.manual_seed(1)
    gcn = GatedCrossNet(10, num_layers=3)
    x0 = torch.randn(5, 10)
    gates = gcn.gates(x0)
    assert gates.shape == (3, 5, 10)
    assert ((gates > 0) & (gates < 1)).all()
    with torch.no_grad():
        c = x0
        for layer in range(3):
            torch.testing.assert_close(gates[layer], torch.sigmoid(c @ gcn.gate[layer].weight.T))
            c = x0 * gcn.cross[layer](c) * gates[layer] + c
        torch.testing.assert_close(gcn(x0), c)


def test_initialisation_is_fuxictrs():
    """W^c, W^g Xavier normal (std sqrt(2 / (N + N)) = 1/sqrt(N)); b uniform on [0, 1)."""
    torch.manual_seed(0)
    n = 256
    gcn = GatedCrossNet(n, num_layers=2)
    for layer in range(2):
        for w in (gcn.cross[layer].weight, gcn.gate[layer].weight):
            assert abs(w.std().item() * math.sqrt(n) - 1.0) < 0.02
            assert abs(w.mean().item()) < 0.01
        b = gcn.cross[layer].bias
        assert b.min().item() >= 0.0 and b.max().item() < 1.0
        assert abs(b.mean().item() - 0.5) < 0.06
    assert gcn.gate[0].bias is None  # the gate has no bias, as in the paper


@pytest.mark.parametrize("batch, f, d, layers", [(1, 1, 1, 1), (7, 5, 4, 2), (3, 11, 16, 4)])
def test_shapes(batch, f, d, layers):
    torch.manual_seed(0)
    branch = GDCNBranch(f, d, num_layers=layers)
    assert branch.out_dim == branch.in_features == f * d
    out = branch(torch.randn(batch, f, d))
    assert out.shape == (batch, f * d)
    assert torch.isfinite(out).all()
    assert branch.gcn.gates(torch.randn(batch, f * d)).shape == (layers, batch, f * d)
    assert sum(p.numel() for p in branch.parameters()) == layers * (2 * (f * d) ** 2 + f * d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_layers": 0}, "num_layers must be >= 1, got 0"),
        ({"structure": "serial"}, "structure must be one of 'stacked', 'parallel', got 'serial'"),
    ],
)
def test_branch_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GDCNBranch(3, 2, **kwargs)


def test_branch_refuses_empty_inputs():
    with pytest.raises(ValueError, match=re.escape("num_features and embedding_dim must be >= 1, got 0 and 4")):
        GDCNBranch(0, 4)
    with pytest.raises(ValueError, match=re.escape("in_features must be >= 1, got 0")):
        GatedCrossNet(0)


# --------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "value, message",
    [
        ({"num_layers": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.gdcn.num_layers"),
        (
            {"structure": "serial"},
            "must be one of 'stacked', 'parallel', got 'serial' @ $.models.feed_ctr.techniques.gdcn.structure",
        ),
        (
            {"num_layer": 3},
            "unknown key 'num_layer' (did you mean 'num_layers'?); valid keys: num_layers, structure"
            " @ $.models.feed_ctr.techniques.gdcn",
        ),
        (
            {"num_layers": "three"},
            "expected an integer, got the string 'three' @ $.models.feed_ctr.techniques.gdcn.num_layers",
        ),
    ],
)
def test_bad_params_name_the_path(host, eco, value, message):
    with pytest.raises(ConfigError) as info:
        host.plan(with_params(eco.model("feed_ctr"), value))
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_search_space_values_are_valid():
    """What `smt ecosystem tune gdcn` tries: the layers and both structures, each a valid value."""
    space = {f.name: f.metadata["search"] for f in attrs.fields(GDCNParams) if "search" in f.metadata}
    assert space == {"num_layers": [2, 3, 4], "structure": ["stacked", "parallel"]}
    default = GDCNParams()
    for name, values in space.items():
        assert getattr(default, name) in values, f"the default {name} is not among the values tuned"
        for value in values:
            assert getattr(GDCNParams(**{name: value}), name) == value


def test_params_reach_the_branch(host, eco):
    spec = with_params(eco.model("feed_ctr"), {"num_layers": 2, "structure": "parallel"})
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "gdcn"]
    assert entry.params == {"num_layers": 2, "structure": "parallel"}
    branch = host.build(plan, spec).members[0].branches["gdcn"]
    assert (branch.gcn.num_layers, branch.structure, branch.to_task_arch) == (2, "parallel", True)


def _readme_toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_examples_plan(host):
    """Every TOML example of the README, appended to the default ecosystem, plans."""
    blocks = _readme_toml_blocks()
    assert len(blocks) >= 3
    base = default_ecosystem_path().read_text(encoding="utf-8")
    seen = []
    for block in blocks:
        eco = ecosystem_from_dict(tomllib.loads(base + "\n" + block), conv=host.conv)
        spec = eco.model("feed_ctr")
        plan = host.plan(spec)
        seen.append("gdcn" in plan.techniques())
    assert True in seen and False in seen, "the README shows an override and an opt-out"


# ----------------------------------------------------------------- the host


def test_plan_counts_the_gated_cross_flops(host, eco):
    spec = eco.model("feed_ctr")
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "gdcn"]
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (entry.slot, entry.dist, entry.version, entry.out_dim) == ("interaction", "smt-gdcn", "0.1.0", n)
    # three layers, two (N, N) matrix-vector products each (W^c and W^g): 2 * 2 N^2 FLOPs a layer
    assert entry.flops == 3 * 2 * 2 * n * n
    branch = host.build(plan, spec).members[0].branches["gdcn"]
    assert sum(p.numel() for p in branch.parameters()) == 3 * (2 * n * n + n)
    base = host.plan(spec, without=frozenset({"gdcn"}))
    assert plan.widths["interaction"] == base.widths["interaction"] + n


def test_opt_out_and_disable(host, eco):
    spec = with_params(eco.model("feed_ctr"), False)
    plan = host.plan(spec)
    assert "gdcn" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "gdcn"] == ["opted out"]
    blocked = Host.create(disable="smt-gdcn")
    assert "gdcn" not in blocked.spm.techniques
    assert "gdcn" not in blocked.plan(eco.model("feed_ctr")).techniques()


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr", "video_install"])
@pytest.mark.parametrize("value", [True, {"num_layers": 1}, {"structure": "parallel", "num_layers": 2}])
def test_gradients_reach_every_branch_parameter(host, eco, model, value):
    spec = with_params(eco.model(model), value)
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = net(batch.dense, batch.sparse)
    assert logits.shape == (8, len(spec.tasks))
    logits.sum().backward()
    params = dict(net.branches["gdcn"].named_parameters())
    assert len(params) == 3 * net.branches["gdcn"].gcn.num_layers  # W^c, b, W^g per layer
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # every cross matrix, bias and gate is used: some gradient entry is non-zero
    assert [n for n, p in params.items() if not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize(
    "value", [True, {"num_layers": 1}, {"structure": "parallel"}, {"structure": "parallel", "num_layers": 4}]
)
def test_conformance(smt_check, smt_tiny_ecosystem, value):
    eco = smt_tiny_ecosystem
    eco = attrs.evolve(eco, models={n: with_params(m, value) for n, m in eco.models.items()})
    assert smt_check("gdcn", ecosystem=eco) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_conformance_defaults(smt_check):
    assert smt_check("gdcn") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


# --------------------------------------------------------------- structures


def _manual_logits(net, feats, *, parallel: bool):
    """The logits of the paper's structures, from the parts' own modules:
    GDCN-P head(tower([MLP(c_0), c_L])), GDCN-S (no flat branch) head(tower(MLP(c_L)))."""
    cross = net.branches["gdcn"](feats)
    if parallel:
        joined = torch.cat([net.over_arch(net.branches["flat"](feats)), cross], dim=1)
    else:
        joined = net.over_arch(cross)
    towers = net.task_arch(joined)
    return torch.stack([head(t) for head, t in zip(net.heads.values(), towers)], dim=1)


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_parallel_puts_the_gated_cross_beside_the_deep_network(host, eco, model):
    spec = with_params(eco.model(model), {"structure": "parallel", "num_layers": 2})
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0].eval()
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (net.deep_branches, net.task_branches) == (["flat"], ["gdcn"])
    assert plan.widths["interaction"] == net.branches["flat"].out_dim  # the over-arch reads c_0 alone
    hidden = net.over_arch.out_dim
    assert [t.in_dim for t in net.task_arch.towers] == [hidden + n] * len(spec.tasks)
    batch = example_batch(spec, 6)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        torch.testing.assert_close(net(batch.dense, batch.sparse), _manual_logits(net, feats, parallel=True))


def test_stacked_without_flat_is_gdcn_s(host, eco):
    base = eco.model("feed_ctr")
    spec = attrs.evolve(base, techniques={**base.techniques, "flat": False, "gdcn": {"structure": "stacked"}})
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0].eval()
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    assert (net.deep_branches, net.task_branches) == (["gdcn"], [])
    assert plan.widths["interaction"] == n  # the over-arch reads c_L alone
    batch = example_batch(spec, 6)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        torch.testing.assert_close(net(batch.dense, batch.sparse), _manual_logits(net, feats, parallel=False))
        # and c_L is the paper's recursion on the flat embeddings
        torch.testing.assert_close(net.branches["gdcn"](feats), paper_gcn(net.branches["gdcn"].gcn, feats.flatten(1)))


def test_the_default_is_stacked_beside_flat(host, eco):
    """structure unset: c_L feeds the over-arch beside the flat branch."""
    spec = eco.model("feed_ctr")
    net = host.build(host.plan(spec), spec).members[0]
    assert net.branches["gdcn"].structure == "stacked"
    assert (net.deep_branches, net.task_branches) == (["flat", "gdcn"], [])


@pytest.mark.skipif(not RECIPE.exists(), reason="the benchmark recipe lives in the smt repository")
def test_the_frappe_recipe_builds_gdcn_p_exactly(host):
    """benchmarks/recipes/frappe_gdcn.toml is the paper's GDCN-P (the authors'
    GDCNP, FuxiCTR's GDCNP): gated cross network (3 layers) || DNN 400x3 with
    BatchNorm -> concat -> one linear logit, on Frappe's 10 x 10 embeddings."""
    spec = host.load_ecosystem(str(RECIPE)).model("frappe")
    plan = host.plan(spec, only=frozenset({"gdcn"}))
    net = host.build(plan, spec).members[0].eval()
    n, h, layers = 10 * 10, 400, 3
    assert (net.deep_branches, net.task_branches, net.logit_branches) == (["flat"], ["gdcn"], [])
    gcn = net.branches["gdcn"].gcn
    assert gcn.num_layers == layers
    assert list(net.task_arch.out_dims) == [h + n] and sum(p.numel() for p in net.task_arch.parameters()) == 0
    cross = layers * (2 * n * n + n)
    dnn = (n * h + h) + 2 * (h * h + h) + 3 * 2 * h  # linear layers, and BatchNorm's scale and shift
    logit = (h + n) + 1
    assert cross + dnn + logit == 424_401
    assert plan.cost.dense_params == 424_401
    assert plan.cost.flops == layers * 2 * 2 * n * n + 2 * (n * h + 2 * h * h) + 2 * (h + n)  # 841,000
    batch = example_batch(spec, 5)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        x0 = feats.flatten(1)
        deep = net.over_arch(x0)
        head = net.heads["click"].linear
        want = (torch.cat([deep, paper_gcn(gcn, x0)], dim=1) @ head.weight.T + head.bias)[:, 0]
        torch.testing.assert_close(net(batch.dense, batch.sparse)[:, 0], want)
