"""Tests of the dcnv3 technique: the math, the parameters, the host's view."""

from __future__ import annotations

import doctest
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import smt_dcnv3
import torch
from smt_dcnv3 import CrossNetwork, DCNv3Branch, DCNv3Params, SelfMaskLayer, head_layout

from smt_host import ConfigError, Host, example_batch
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict, tiny_ecosystem

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPE = Path(__file__).resolve().parents[3] / "benchmarks" / "recipes" / "frappe_dcnv3.toml"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def with_params(spec, value):
    return attrs.evolve(spec, techniques={**spec.techniques, "dcnv3": value})


def randomise(module: torch.nn.Module) -> None:
    """Non-trivial values for every bias, LayerNorm and BatchNorm affine, so the golden tests check them."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, SelfMaskLayer):
                layer.b.normal_()
                for norm in (layer.norm, layer.bn):
                    if norm is not None:
                        norm.weight.normal_(1.0, 0.5)
                        norm.bias.normal_()


# --------------------------------------------------- the paper's equations, by hand


def reference_layout(e: torch.Tensor, h: int) -> torch.Tensor:
    """FuxiCTR's MultiHeadFeatureEmbedding.forward, written as it is there."""
    heads = torch.stack(torch.tensor_split(e, h, dim=-1), dim=1)  # B x h x F x D/h
    a, b = torch.tensor_split(heads, 2, dim=-1)
    return torch.cat([a.flatten(start_dim=2), b.flatten(start_dim=2)], dim=-1)


def manual_c(layer: SelfMaskLayer, x: torch.Tensor, *, training: bool = True) -> torch.Tensor:
    """c_l = [H, H * max(0, LN(H))] + b with H = W x (BatchNorm_h(W x) when on), from first principles."""
    hidden = torch.einsum("bhn,mn->bhm", x, layer.w.weight)  # (B, h, N/2)
    if layer.bn is not None:  # train mode: statistics over the batch and the N/2 entries, per head
        mu = hidden.mean(dim=(0, 2), keepdim=True)
        var = hidden.var(dim=(0, 2), unbiased=False, keepdim=True)
        gamma, beta = layer.bn.weight.view(1, -1, 1), layer.bn.bias.view(1, -1, 1)
        hidden = (hidden - mu) / torch.sqrt(var + layer.bn.eps) * gamma + beta
    if layer.norm is not None:
        mu = hidden.mean(dim=-1, keepdim=True)
        var = hidden.var(dim=-1, unbiased=False, keepdim=True)
        normed = (hidden - mu) / torch.sqrt(var + layer.norm.eps) * layer.norm.weight + layer.norm.bias
    else:
        normed = hidden
    mask = torch.clamp(normed, min=0.0)
    return torch.cat([hidden, hidden * mask], dim=-1) + layer.b


def manual_ecn(net: CrossNetwork, x1: torch.Tensor) -> torch.Tensor:
    """x_{2^l} = x_{2^{l-1}} * c(x_{2^{l-1}}) + x_{2^{l-1}}."""
    x = x1
    for layer in net.layers:
        x = x * manual_c(layer, x) + x
    return x


def manual_lcn(net: CrossNetwork, x1: torch.Tensor) -> torch.Tensor:
    """x_{l+1} = x_1 * c(x_l) + x_l."""
    x = x1
    for layer in net.layers:
        x = x1 * manual_c(layer, x) + x
    return x


def test_docstring_examples_run():
    result = doctest.testmod(smt_dcnv3, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8
    assert result.failed == 0


@pytest.mark.parametrize("f, d, h", [(3, 4, 1), (3, 4, 2), (2, 6, 2), (5, 3, 1), (4, 6, 3), (2, 4, 4)])
def test_head_layout_is_the_reference_multi_head_embedding(f, d, h):
    e = torch.randn(3, f, d)
    torch.testing.assert_close(head_layout(e, h), reference_layout(e, h))


def test_two_layers_by_hand():
    """Layer 1 with hand-set weights, layer 2 with W = 0 (so c_2 = b_2), computed on paper."""
    branch = DCNv3Branch(2, 2, ecn_layers=2, lcn_layers=2, ecn_dropout=0.0, lcn_dropout=0.0, structure="parallel")
    w1 = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
    b1 = torch.tensor([0.0, 0.5, 1.0, -1.0])
    with torch.no_grad():
        for net in (branch.ecn, branch.lcn):
            net.layers[0].w.weight.copy_(w1)
            net.layers[0].b.copy_(b1)
            net.layers[1].w.weight.zero_()
            net.layers[1].b.fill_(1.0)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, F=2, D=2)
    # x_1 = [first halves, second halves] = [1, 3, 2, 4]
    # H = W x_1 = [1, 4]; LN(H) = [-1, 1]; mask = [0, 1]; c = [H, H * mask] + b = [1, 4, 0, 4] + b = [1, 4.5, 1, 3]
    # x_2 = x_1 * c + x_1 = [2, 16.5, 4, 16]                    (the same in both networks)
    # layer 2: H = 0, LN(0) = 0, mask = 0, c = b = 1
    # ECN: x_3 = x_2 * 1 + x_2 = [4, 33, 8, 32];  LCN: x_3 = x_1 * 1 + x_2 = [3, 19.5, 6, 20]
    want = torch.tensor([[4.0, 33.0, 8.0, 32.0, 3.0, 19.5, 6.0, 20.0]])
    torch.testing.assert_close(branch.eval()(x), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer_norm, batch_norm", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("heads", [1, 2])
def test_self_mask_follows_the_equation(layer_norm, batch_norm, heads):
    torch.manual_seed(0)
    layer = SelfMaskLayer(12, heads, layer_norm=layer_norm, batch_norm=batch_norm)
    randomise(layer)
    x = torch.randn(9, heads, 12)
    torch.testing.assert_close(layer.train()(x), manual_c(layer, x))


def test_self_mask_keeps_about_half_of_the_masked_features():
    """c - b = [H, H * max(0, LN(H))]: the first half is H, the second is zero wherever
    LN(H) < 0, which LayerNorm's centring makes about half of the entries."""
    torch.manual_seed(0)
    layer = SelfMaskLayer(64)
    x = torch.randn(512, 1, 64)
    with torch.no_grad():
        c = layer(x) - layer.b
        hidden = layer.w(x)
        normed = layer.norm(hidden)
    first, second = c[..., :32], c[..., 32:]
    torch.testing.assert_close(first, hidden)  # the first half is H itself, unmasked
    assert bool((second[normed < 0] == 0).all())  # masked where LN(H) < 0
    kept = (second != 0).float().mean().item()
    assert 0.4 < kept < 0.6, f"the mask keeps {kept:.2f} of the features, want about half"
    torch.testing.assert_close(second, hidden * torch.relu(normed))


@pytest.mark.parametrize("layer_norm, batch_norm", [(True, False), (False, True)])
@pytest.mark.parametrize("heads", [1, 2])
def test_ecn_and_lcn_follow_their_recursions(layer_norm, batch_norm, heads):
    torch.manual_seed(1)
    branch = DCNv3Branch(
        3,
        4,
        ecn_layers=3,
        lcn_layers=2,
        ecn_dropout=0.0,
        lcn_dropout=0.0,
        layer_norm=layer_norm,
        batch_norm=batch_norm,
        num_heads=heads,
        structure="stacked",
    )
    randomise(branch)
    feats = torch.randn(6, 3, 4) * 0.5
    x1 = reference_layout(feats, heads)
    xe, xl = manual_ecn(branch.ecn, x1), manual_lcn(branch.lcn, x1)
    assert not torch.allclose(xe, xl)  # the two recursions differ
    torch.testing.assert_close(branch.train()(feats), torch.cat([xe.flatten(1), xl.flatten(1)], dim=1))


@pytest.mark.parametrize("heads, tasks", [(1, 1), (2, 2)])
def test_logit_is_the_mean_of_the_two_networks_logits(heads, tasks):
    """y = 0.5 (mean_h (x_E V_E + a_E) + mean_h (x_L V_L + a_L)), one column per task."""
    torch.manual_seed(2)
    branch = DCNv3Branch(3, 4, tasks, ecn_layers=2, lcn_layers=3, num_heads=heads).eval()
    randomise(branch)
    with torch.no_grad():
        branch.ecn_logit.bias.normal_()
        branch.lcn_logit.bias.normal_()
    feats = torch.randn(5, 3, 4) * 0.5
    x1 = reference_layout(feats, heads)
    xe, xl = manual_ecn(branch.ecn, x1), manual_lcn(branch.lcn, x1)
    ye = (xe @ branch.ecn_logit.weight.T + branch.ecn_logit.bias).mean(dim=1)
    yl = (xl @ branch.lcn_logit.weight.T + branch.lcn_logit.bias).mean(dim=1)
    with torch.no_grad():
        got = branch(feats)
    assert got.shape == (5, tasks)
    torch.testing.assert_close(got, 0.5 * (ye + yl))


def test_dropout_follows_each_layer_in_training_only():
    torch.manual_seed(3)
    branch = DCNv3Branch(3, 4, ecn_dropout=0.5, lcn_dropout=0.5, structure="parallel")
    feats = torch.randn(64, 3, 4)
    with torch.no_grad():
        train_out = branch.train()(feats)
        eval_a, eval_b = branch.eval()(feats), branch(feats)
    torch.testing.assert_close(eval_a, eval_b)
    assert (train_out == 0).float().mean() > 0.2  # the last layer's dropout zeroes entries
    assert (eval_a == 0).float().mean() < 0.05


@pytest.mark.parametrize(
    "structure, out, logits, beside",
    [("logit", 2, True, False), ("parallel", 24, False, True), ("stacked", 24, False, False)],
)
def test_shapes_and_routing(structure, out, logits, beside):
    torch.manual_seed(0)
    branch = DCNv3Branch(3, 4, 2, structure=structure)
    got = branch(torch.randn(7, 3, 4))
    assert got.shape == (7, out) and branch.out_dim == out
    assert torch.isfinite(got).all()
    assert (branch.to_logits, branch.to_task_arch) == (logits, beside)


def test_initialisation_is_the_references():
    """W xavier normal, b ~ U(0, 1), LayerNorm (1, 0), logits xavier with zero bias."""
    torch.manual_seed(0)
    branch = DCNv3Branch(20, 10, ecn_layers=2, lcn_layers=2)
    n = 200
    for layer in [*branch.ecn.layers, *branch.lcn.layers]:
        std = layer.w.weight.std().item()
        assert abs(std - (2.0 / (n + n // 2)) ** 0.5) < 0.01
        assert 0.0 <= layer.b.min().item() and layer.b.max().item() < 1.0 and abs(layer.b.mean().item() - 0.5) < 0.1
        assert torch.equal(layer.norm.weight, torch.ones(n // 2)) and torch.equal(layer.norm.bias, torch.zeros(n // 2))
    assert torch.equal(branch.ecn_logit.bias, torch.zeros(1))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((3, 4), {"ecn_layers": 0}, "num_layers must be >= 1, got 0"),
        ((3, 4), {"num_heads": 3}, "num_heads must be >= 1 and divide D=4, got 3"),
        ((3, 3), {}, "the Self-Mask halves each head's F*D/h = 3*3/1 = 9, which must be even"),
        ((3, 4), {"structure": "serial"}, "structure must be one of 'logit', 'parallel', 'stacked', got 'serial'"),
        ((3, 4, 0), {}, "num_features, embedding_dim and num_tasks must be >= 1, got 3, 4, 0"),
    ],
)
def test_branch_refuses_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DCNv3Branch(*args, **kwargs)


# --------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "value, message",
    [
        ({"ecn_layers": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dcnv3.ecn_layers"),
        ({"lcn_layers": -1}, "must be >= 1, got -1 @ $.models.feed_ctr.techniques.dcnv3.lcn_layers"),
        ({"ecn_dropout": 1.5}, "must be in [0.0, 0.9], got 1.5 @ $.models.feed_ctr.techniques.dcnv3.ecn_dropout"),
        ({"num_heads": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dcnv3.num_heads"),
        ({"num_heads": 3}, "must divide D=16, got 3 @ $.models.feed_ctr.techniques.dcnv3.num_heads"),
        (
            {"structure": "serial"},
            "must be one of 'logit', 'parallel', 'stacked', got 'serial' @ $.models.feed_ctr.techniques.dcnv3.structure",
        ),
        (
            {"ecn_layer": 2},
            "unknown key 'ecn_layer' (did you mean 'ecn_layers'?); valid keys: ecn_layers, lcn_layers, ecn_dropout,"
            " lcn_dropout, layer_norm, batch_norm, num_heads, structure @ $.models.feed_ctr.techniques.dcnv3",
        ),
        (
            {"ecn_layers": "four"},
            "expected an integer, got the string 'four' @ $.models.feed_ctr.techniques.dcnv3.ecn_layers",
        ),
    ],
)
def test_bad_params_name_the_path(host, eco, value, message):
    with pytest.raises(ConfigError) as info:
        host.plan(with_params(eco.model("feed_ctr"), value))
    assert str(info.value) == message


def test_params_reach_the_branch(host, eco):
    value = {"ecn_layers": 2, "lcn_layers": 3, "num_heads": 2, "batch_norm": True, "structure": "parallel"}
    spec = with_params(eco.model("feed_ctr"), value)
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "dcnv3"]
    assert entry.params == attrs.asdict(DCNv3Params(**value))
    branch = host.build(plan, spec).members[0].branches["dcnv3"]
    assert (len(branch.ecn.layers), len(branch.lcn.layers), branch.num_heads) == (2, 3, 2)
    assert branch.ecn.layers[0].bn is not None and branch.to_task_arch


def test_odd_width_models_are_not_applicable():
    """F*D odd: the Self-Mask cannot halve it, and the plan says why instead of failing."""
    host = Host.create()
    eco = tiny_ecosystem(embedding_dim=7)  # tiny_nodense: F = 5, N = 35; tiny_ctr: F = 8, N = 56
    odd = host.plan(eco.model("tiny_nodense"))
    assert "dcnv3" not in odd.techniques()
    assert [s.reason for s in odd.skipped if s.name == "dcnv3"] == [
        "not applicable: F*D = 5*7 = 35 is odd; the Self-Mask halves it"
    ]
    assert "dcnv3" in host.plan(eco.model("tiny_ctr")).techniques()


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
        plan = host.plan(eco.model("feed_ctr"))
        seen.append("dcnv3" in plan.techniques())
    assert True in seen and False in seen, "the README shows an override and an opt-out"


# ----------------------------------------------------------------- the host


def test_plan_counts_the_cross_flops_and_parameters(host, eco):
    spec = eco.model("feed_ctr")
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "dcnv3"]
    n = plan.widths["num_features"] * plan.widths["embedding_dim"]
    t = len(spec.tasks)
    assert (entry.slot, entry.dist, entry.version, entry.out_dim) == ("interaction", "smt-dcnv3", "0.1.0", t)
    # 8 layers of an (N/2, N) matrix-vector product (N^2 FLOPs each), two (N, T) logits
    assert entry.flops == 8 * n * n + 2 * 2 * n * t
    branch = host.build(plan, spec).members[0].branches["dcnv3"]
    per_layer = n * n // 2 + n + n  # W, b, LayerNorm's scale and shift (N/2 each)
    assert sum(p.numel() for p in branch.parameters()) == 8 * per_layer + 2 * (n * t + t)
    base = host.plan(spec, without=frozenset({"dcnv3"}))
    assert plan.widths["interaction"] == base.widths["interaction"]  # a wide part: the over-arch reads no more


def test_opt_out_and_disable(host, eco):
    spec = with_params(eco.model("feed_ctr"), False)
    plan = host.plan(spec)
    assert "dcnv3" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "dcnv3"] == ["opted out"]
    blocked = Host.create(disable="smt-dcnv3")
    assert "dcnv3" not in blocked.spm.techniques


def _manual_logits(net, feats):
    """head(tower([MLP(x_1) or MLP([x_1, branch]), beside])) + wide, from the parts' own modules."""
    outs = {n: b(feats) for n, b in net.branches.items()}
    hidden = net.over_arch(torch.cat([outs[n] for n in net.deep_branches], dim=1))
    towers = net.task_arch(torch.cat([hidden, *(outs[n] for n in net.task_branches)], dim=1))
    logits = torch.stack([head(t) for head, t in zip(net.heads.values(), towers)], dim=1)
    return logits + sum((outs[n] for n in net.logit_branches), torch.zeros_like(logits))


@pytest.mark.parametrize(
    "structure, routes",
    [
        ("logit", (["flat"], [], ["dcnv3"])),
        ("parallel", (["flat"], ["dcnv3"], [])),
        ("stacked", (["flat", "dcnv3"], [], [])),
    ],
)
@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_each_structure_routes_the_branch(host, eco, model, structure, routes):
    spec = with_params(eco.model(model), {"structure": structure, "ecn_layers": 2, "lcn_layers": 2})
    plan = host.plan(spec)
    net = host.build(plan, spec).members[0].eval()
    assert (net.deep_branches, net.task_branches, net.logit_branches) == routes
    batch = example_batch(spec, 6)
    with torch.no_grad():
        feats = net.features(batch.dense, batch.sparse)
        got = net(batch.dense, batch.sparse)
        torch.testing.assert_close(got, _manual_logits(net, feats))
        if structure == "logit":  # the branch's mean logit is really added: without it the logits differ
            assert not torch.allclose(got, got - net.branches["dcnv3"](feats))


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr", "video_install"])
@pytest.mark.parametrize(
    "value",
    [
        True,
        {"structure": "parallel", "num_heads": 2},
        {"structure": "stacked", "batch_norm": True, "layer_norm": False},
    ],
)
def test_gradients_reach_every_branch_parameter(host, eco, model, value):
    spec = with_params(eco.model(model), value)
    net = host.build(host.plan(spec), spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = net(batch.dense, batch.sparse)
    assert logits.shape == (8, len(spec.tasks))
    logits.sum().backward()
    params = dict(net.branches["dcnv3"].named_parameters())
    assert params
    assert [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()] == []
    assert [n for n, p in params.items() if not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize(
    "value",
    [
        {"structure": "parallel"},
        {"structure": "stacked", "num_heads": 2, "batch_norm": True, "layer_norm": False},
        {"ecn_layers": 1, "lcn_layers": 2, "ecn_dropout": 0.0},
    ],
)
def test_conformance(smt_check, smt_tiny_ecosystem, value):
    eco = smt_tiny_ecosystem
    eco = attrs.evolve(eco, models={n: with_params(m, value) for n, m in eco.models.items()})
    assert smt_check("dcnv3", ecosystem=eco) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_conformance_defaults(smt_check):
    assert smt_check("dcnv3") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_search_space():
    """What `smt ecosystem tune dcnv3` reads: the "search" metadata; every value passes its validator."""
    space = {f.name: f.metadata["search"] for f in attrs.fields(DCNv3Params) if "search" in f.metadata}
    assert space == {"ecn_layers": [2, 3, 4], "lcn_layers": [2, 4]}
    for name, values in space.items():
        for v in values:
            assert getattr(DCNv3Params(**{name: v}), name) == v


@pytest.mark.skipif(not RECIPE.exists(), reason="the benchmark recipe lives in the smt repository")
def test_the_frappe_recipe_plans_the_branch_it_names(host):
    """benchmarks/recipes/frappe_dcnv3.toml: the branch with the recipe's parameters,
    routed as its structure says, costing what the formula says (N = 10 x 10)."""
    spec = host.load_ecosystem(str(RECIPE)).model("frappe")
    plan = host.plan(spec, only=frozenset({"dcnv3"}))
    (entry,) = [e for e in plan.entries if e.technique == "dcnv3"]
    params = DCNv3Params(**entry.params)
    assert attrs.asdict(params) == {**attrs.asdict(DCNv3Params()), **spec.techniques["dcnv3"]}
    n, t = 10 * 10, 1
    cross = (params.ecn_layers + params.lcn_layers) * n * n // params.num_heads
    assert entry.flops == cross + (2 * 2 * n * t if params.structure == "logit" else 0)
    net = host.build(plan, spec).members[0]
    branch = net.branches["dcnv3"]
    assert (branch.to_logits, branch.to_task_arch) == (params.structure == "logit", params.structure == "parallel")
