"""Tests of the smt-dhen plugin: installed, math, shapes, parameters, conformance."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import attrs
import pytest
import torch
from smt_dhen import (
    MODULES,
    CrossModule,
    DHENInteraction,
    DHENLayer,
    DHENParams,
    DotProductModule,
    FeatureProjection,
    MLPModule,
    SelfAttentionModule,
)
from torch.nn import functional as F

from smt_host import ConfigError, Host, LossInputs, example_batch
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict, listed_techniques

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"
ALLOWED = "'self_attention', 'dcn', 'dot', 'linear', 'mlp'"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


# ------------------------------------------------------------------ installed


def test_host_lists_the_plugin():
    techniques = listed_techniques("smt-dhen")
    assert [t["version"] for t in techniques.values()] == ["0.2.0"]
    assert list(techniques) == ["dhen"]
    assert techniques["dhen"]["slot"] == "interaction"
    assert techniques["dhen"]["applies_to"], "dhen applies to no model of the default ecosystem"


# ----------------------------------------------------------------------- math


def test_dot_products_are_the_upper_triangle_of_x_xt():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # (B=1, n=3, D=2)
    dot = DotProductModule(3, 2, 1)
    # X X^T = [[1, 0, 1], [0, 4, 2], [1, 2, 2]]; upper triangle with diagonal, row by row
    torch.testing.assert_close(dot.dot_products(x), torch.tensor([[1.0, 0.0, 1.0, 4.0, 2.0, 2.0]]))
    expected = dot.out(torch.tensor([[1.0, 0.0, 1.0, 4.0, 2.0, 2.0]])).view(1, 1, 2)
    torch.testing.assert_close(dot(x), expected)


def test_feature_projection_is_a_matmul_with_its_weight():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3)
    proj = FeatureProjection(5, 2)
    assert proj.weight.shape == (2, 5)
    torch.testing.assert_close(proj(x), torch.stack([proj.weight @ x[b] for b in range(4)]))


def test_cross_module_follows_the_dcnv2_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 2)  # flat width 4
    cross = CrossModule(2, 2, 1, layers=2, rank=2)
    x0 = x.flatten(1)
    xi = x0
    for i in range(2):
        u, v, b = cross.up[i].weight, cross.down[i].weight, cross.up[i].bias
        xi = x0 * (xi @ v.T @ u.T + b) + xi
    expected = (xi @ cross.out.weight.T + cross.out.bias).view(3, 1, 2)
    torch.testing.assert_close(cross(x), expected)


def test_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    mod = SelfAttentionModule(5, 8, 5, heads=2)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mod.qkv.weight)
        ref.in_proj_bias.copy_(mod.qkv.bias)
        ref.out_proj.weight.copy_(mod.attn_out.weight)
        ref.out_proj.bias.copy_(mod.attn_out.bias)
    expected, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(mod.attention(x), expected)
    # post-norm transformer block, then the identity (n == m)
    h = F.layer_norm(x + expected, (8,))
    torch.testing.assert_close(mod(x), F.layer_norm(h + mod.ffn(h), (8,)))


def test_attention_mixes_features():
    torch.manual_seed(0)
    mod = SelfAttentionModule(4, 8, 4, heads=1)
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[0, 3] += 1.0  # change one feature: every feature's output changes
    changed = (mod(x) - mod(y)).abs().sum(-1)[0]
    assert (changed > 1e-6).all(), changed


@pytest.mark.parametrize("ensemble", ["concat", "sum"])
def test_layer_ensembles_modules_then_adds_shortcut_and_normalizes(ensemble):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    layer = DHENLayer(5, 4, DHENParams(modules=("dot", "linear", "mlp"), ensemble=ensemble, num_embeddings=3))
    outs = [m(x) for m in layer.interactions]
    assert [type(m) for m in layer.interactions] == [DotProductModule, FeatureProjection, MLPModule]
    mixed = torch.cat(outs, 1) if ensemble == "concat" else outs[0] + outs[1] + outs[2]
    n_out = 9 if ensemble == "concat" else 3
    assert layer.num_outputs == n_out and layer.shortcut.weight.shape == (n_out, 5)
    torch.testing.assert_close(layer(x), F.layer_norm(mixed + layer.shortcut.weight @ x, (4,)))


def test_layer_shortcut_is_identity_when_counts_match():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    layer = DHENLayer(6, 4, DHENParams(modules=("dcn", "linear"), ensemble="concat", num_embeddings=3))
    assert isinstance(layer.shortcut, torch.nn.Identity)
    torch.testing.assert_close(layer(x), F.layer_norm(torch.cat([m(x) for m in layer.interactions], 1) + x, (4,)))


def _ln(x, norm):
    """LayerNorm over the last axis from its definition, with the module's gamma, beta and eps."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _lin(x, lin):
    return x @ lin.weight.T + lin.bias


def _mlp(x, mlp):
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = _lin(x, lin)
        x = torch.clamp(x, min=0.0) if i < len(linears) - 1 else x
    return x


def _module_by_hand(name, mod, x):
    """One DHEN interaction module, (B, n, D) -> (B, m, D), from the module's weights."""
    b, n, d = x.shape
    if name == "linear":
        return torch.einsum("mi,bid->bmd", mod.weight, x)  # W X
    if name == "dot":
        rows, cols = torch.triu_indices(n, n)
        gram = torch.einsum("bid,bjd->bij", x, x)
        return _lin(gram[:, rows, cols], mod.out).view(b, -1, d)
    if name == "dcn":
        x0 = xi = x.reshape(b, n * d)
        for down, up in zip(mod.down, mod.up):
            xi = x0 * ((xi @ down.weight.T) @ up.weight.T + up.bias) + xi  # x0 * (U V x_i + b) + x_i
        return _lin(xi, mod.out).view(b, -1, d)
    if name == "mlp":
        return _mlp(x.reshape(b, n * d), mod.mlp).view(b, -1, d)
    assert name == "self_attention"
    h, dh = mod.heads, d // mod.heads
    q, k, v = _lin(x, mod.qkv).split(d, dim=-1)  # each (B, n, D)
    heads = []
    for j in range(h):
        sl = slice(j * dh, (j + 1) * dh)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5, dim=-1)  # (B, n, n)
        heads.append(w @ v[..., sl])
    z = _ln(x + _lin(torch.cat(heads, -1), mod.attn_out), mod.norm1)
    z = _ln(z + _mlp(z, mod.ffn), mod.norm2)
    proj = mod.project
    return z if isinstance(proj, torch.nn.Identity) else torch.einsum("mi,bid->bmd", proj.weight, z)


@pytest.mark.parametrize("ensemble", ["concat", "sum"])
def test_branch_is_the_papers_equations_computed_by_hand(ensemble):
    """X_0 = LN(E); per layer Y = LN(Ensemble(M_1(X), ..., M_k(X)) + ShortCut(X)) with
    Ensemble = concat or sum and ShortCut = identity or W X (DHEN, Zhang et al. 2022,
    section 3); every module and norm written out from the module's own weights."""
    torch.manual_seed(0)
    b, n, d = 3, 5, 4
    params = DHENParams(
        num_layers=2, modules=MODULES, ensemble=ensemble, num_embeddings=3, attention_heads=2, mlp_widths=(6,)
    )
    branch = DHENInteraction(n, d, params)
    with torch.no_grad():  # random gamma/beta/biases, so each term matters
        for prm in branch.parameters():
            prm.copy_(torch.randn_like(prm) * 0.3 + (1.0 if prm.dim() == 1 else 0.0))
    e = torch.randn(b, n, d) * 1e-3  # the BARS recipe's embedding scale: the input norm must undo it
    x = _ln(e, branch.input_norm)
    for layer in branch.layers:
        outs = [_module_by_hand(name, mod, x) for name, mod in zip(MODULES, layer.interactions)]
        mixed = torch.cat(outs, 1) if ensemble == "concat" else sum(outs)
        short = (
            x
            if isinstance(layer.shortcut, torch.nn.Identity)
            else torch.einsum("oi,bid->bod", layer.shortcut.weight, x)
        )
        x = _ln(mixed + short, layer.norm)
    torch.testing.assert_close(branch(e), x.reshape(b, -1), rtol=1e-4, atol=1e-4)


def test_input_norm_makes_the_branch_blind_to_the_embedding_scale():
    """At the BARS recipe's embedding scale the raw-input layer outputs a constant
    (biases and LayerNorm epsilon dominate); with the input norm the branch computes
    the same function at any scale."""
    torch.manual_seed(0)
    e = torch.randn(256, 10, 8)
    on = DHENInteraction(10, 8, DHENParams())
    torch.testing.assert_close(on(e * 1e-3), on(e), rtol=1e-3, atol=2e-3)
    off = DHENInteraction(10, 8, DHENParams(input_norm=False))
    assert isinstance(off.input_norm, torch.nn.Identity)
    out = off.layers[0](e * 1e-3)
    assert out.var(0).mean() / out.mean(0).pow(2).mean() < 1e-3, "the raw-scale layer is not constant: premise wrong"
    out_on = on.layers[0](on.input_norm(e * 1e-3))
    assert out_on.var(0).mean() / out_on.mean(0).pow(2).mean() > 0.1


# --------------------------------------------------------------------- shapes


@pytest.mark.parametrize("module", MODULES)
def test_every_module_maps_n_to_m_embeddings(module):
    torch.manual_seed(0)
    layer = DHENLayer(7, 8, DHENParams(modules=(module,), num_embeddings=3, attention_heads=4))
    out = layer.interactions[0](torch.randn(5, 7, 8))
    assert out.shape == (5, 3, 8)


@pytest.mark.parametrize(
    "params, num_features, dim, out_dim",
    [
        (DHENParams(), 11, 16, 4 * 4 * 16),
        (DHENParams(ensemble="sum", num_embeddings=6), 11, 16, 6 * 16),
        (DHENParams(num_layers=3, modules=("self_attention",), attention_heads=1, num_embeddings=2), 1, 3, 2 * 3),
        (DHENParams(num_layers=1, modules=MODULES, num_embeddings=2, mlp_widths=()), 5, 8, 5 * 2 * 8),
        (DHENParams(num_layers=2, modules=("dot", "dot"), num_embeddings=1), 2, 4, 2 * 4),
    ],
)
def test_branch_shapes(params, num_features, dim, out_dim):
    torch.manual_seed(0)
    branch = DHENInteraction(num_features, dim, params)
    assert branch.out_dim == out_dim
    out = branch(torch.randn(6, num_features, dim))
    assert out.shape == (6, out_dim)
    assert torch.isfinite(out).all()
    assert len(branch.layers) == params.num_layers


def test_branch_is_deterministic_per_seed_and_differs_across_seeds():
    x = torch.randn(3, 6, 8)

    def build(seed):
        torch.manual_seed(seed)
        return DHENInteraction(6, 8, DHENParams())

    torch.testing.assert_close(build(0)(x), build(0)(x))
    assert not torch.allclose(build(0)(x), build(1)(x))


def test_bad_module_arguments_name_the_values():
    with pytest.raises(ValueError, match=r"attention heads \(3\) must divide the embedding dim D=8"):
        SelfAttentionModule(4, 8, 4, heads=3)
    with pytest.raises(ValueError, match=r"must be ints >= 1: rank=0"):
        CrossModule(4, 8, 4, layers=1, rank=0)


# ----------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_layers": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dhen.num_layers"),
        (
            {"modules": ["dot", "conv"]},
            f"unknown module 'conv' at [1]; allowed: {ALLOWED} @ $.models.feed_ctr.techniques.dhen.modules",
        ),
        (
            {"modules": []},
            f"must name at least one module; allowed: {ALLOWED} @ $.models.feed_ctr.techniques.dhen.modules",
        ),
        (
            {"ensemble": "mean"},
            "must be one of 'concat', 'sum', got 'mean' @ $.models.feed_ctr.techniques.dhen.ensemble",
        ),
        ({"num_embeddings": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dhen.num_embeddings"),
        ({"attention_heads": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dhen.attention_heads"),
        (
            {"attention_heads": 3},
            "must divide the embedding dim D=16, got 3 @ $.models.feed_ctr.techniques.dhen.attention_heads",
        ),
        ({"cross_layers": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dhen.cross_layers"),
        ({"cross_rank": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.dhen.cross_rank"),
        ({"mlp_widths": [0]}, "every width must be >= 1, got 0 at [0] @ $.models.feed_ctr.techniques.dhen.mlp_widths"),
        (
            {"heads": 2},
            "unknown key 'heads'; valid keys: num_layers, modules, ensemble, num_embeddings, attention_heads, cross_layers, cross_rank, mlp_widths, input_norm @ $.models.feed_ctr.techniques.dhen",
        ),
    ],
)
def test_bad_parameters_are_refused_with_their_path(host, eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"dhen": override})
    with pytest.raises(ConfigError) as info:
        host.plan(spec)
    assert str(info.value) == message


def test_heads_that_do_not_divide_d_are_fine_without_attention(host, eco):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"dhen": {"attention_heads": 3, "modules": ["dot", "dcn"]}})
    assert "dhen" in host.plan(spec).techniques()


def test_parameters_are_structured_from_a_table(host):
    params = host.conv.structure({"modules": ["dot", "linear"], "ensemble": "sum", "mlp_widths": [32]}, DHENParams)
    assert params == DHENParams(modules=("dot", "linear"), ensemble="sum", mlp_widths=(32,))
    assert host.conv.structure(host.conv.unstructure(params), DHENParams) == params


def _readme_toml(marker: str) -> str:
    """The README's ```toml block that contains ``marker``."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README should have one ```toml block with {marker!r}, has {len(found)}"
    return found[0]


def test_readme_override_example_plans(host):
    text = (
        default_ecosystem_path().read_text(encoding="utf-8") + "\n" + _readme_toml("[models.feed_ctr.techniques.dhen]")
    )
    eco = ecosystem_from_dict(tomllib.loads(text), conv=host.conv)
    plan = host.plan(eco.model("feed_ctr"))
    (entry,) = [e for e in plan.entries if e.technique == "dhen"]
    assert entry.params["num_layers"] == 3 and entry.params["ensemble"] == "sum"
    assert list(entry.params["modules"]) == ["self_attention", "dot", "linear"]
    assert entry.out_dim == entry.params["num_embeddings"] * 16


def test_readme_opt_out_example_removes_the_branch(host):
    text = default_ecosystem_path().read_text(encoding="utf-8") + "\n" + _readme_toml("dhen = false")
    eco = ecosystem_from_dict(tomllib.loads(text), conv=host.conv)
    plan = host.plan(eco.model("video_ctr"))
    assert "dhen" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "dhen"] == ["opted out"]
    assert "dhen" in host.plan(eco.model("feed_ctr")).techniques()


# ---------------------------------------------------------------- conformance


def test_conformance(smt_check):
    assert smt_check("dhen") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_default_ecosystem_model_trains_through_the_branch(host, eco, model):
    spec = eco.model(model)
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "dhen"]
    assert entry.slot == "interaction" and entry.dist == "smt-dhen" and entry.version == "0.2.0"
    assert entry.out_dim == 4 * 4 * spec.embedding_dim
    assert entry.flops > 0 and plan.cost.parts["interaction:dhen"] == entry.flops

    model_ = host.build(plan, spec).members[0]
    branch = model_.branches["dhen"]
    assert isinstance(branch, DHENInteraction) and branch.out_dim == entry.out_dim
    batch = example_batch(spec, batch_size=8)
    logits = model_(batch.dense, batch.sparse)
    assert logits.shape == (8, len(spec.tasks))
    labels = torch.bernoulli(torch.full((8, len(spec.tasks)), 0.5), generator=torch.Generator().manual_seed(0))
    host.build(plan, spec).loss(LossInputs(logits=logits, labels=labels, batch=batch, model=model_)).backward()
    named = dict(branch.named_parameters())
    assert named, "the branch has no parameters"
    no_grad = [n for n, p in named.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"no gradient reaches {no_grad}"
    zero = [n for n, p in named.items() if not p.grad.abs().sum() > 0]
    assert not zero, f"zero gradient at {zero}"


def test_default_ecosystem_model_exports(host, eco):
    spec = eco.model("feed_ctr")
    model = host.build(host.plan(spec), spec).members[0].eval()
    batch = example_batch(spec, batch_size=4)
    exported = torch.export.export(model, (batch.dense, batch.sparse), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(batch.dense, batch.sparse), model(batch.dense, batch.sparse))
