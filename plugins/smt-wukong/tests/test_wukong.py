"""Tests of the smt-wukong plugin: installed, math, shapes, parameters, conformance."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import attrs
import pytest
import torch
from smt_wukong import (
    FactorizationMachineBlock,
    LinearCompressionBlock,
    WukongInteraction,
    WukongLayer,
    WukongParams,
)

from smt_host import ConfigError, Host, LossInputs, example_batch
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict, listed_techniques

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


# ------------------------------------------------------------------ installed


def test_host_lists_the_plugin():
    techniques = listed_techniques("smt-wukong")
    assert [t["version"] for t in techniques.values()] == ["0.2.0"]
    assert list(techniques) == ["wukong"]
    assert techniques["wukong"]["slot"] == "interaction"
    assert techniques["wukong"]["applies_to"], "wukong applies to no model of the default ecosystem"


# ----------------------------------------------------------------------- math


def test_fm_interaction_matrix_is_x_xt_for_a_hand_built_x():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # (B=1, n=3, D=2)
    fmb = FactorizationMachineBlock(3, 2, num_outputs=1, rank=None)
    expected = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 4.0, 2.0], [1.0, 2.0, 2.0]]])
    torch.testing.assert_close(fmb.interaction_matrix(x), expected)


def test_low_rank_fm_is_x_xt_y():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3)
    fmb = FactorizationMachineBlock(5, 3, num_outputs=2, rank=2)
    with torch.no_grad():
        fmb.projection.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [2.0, -1.0]]))
    expected = x @ x.transpose(1, 2) @ fmb.projection
    got = fmb.interaction_matrix(x)
    assert got.shape == (4, 5, 2)
    torch.testing.assert_close(got, expected)


def test_fmb_forward_is_mlp_of_normalized_flat_interactions():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2)
    fmb = FactorizationMachineBlock(4, 2, num_outputs=3, rank=None, mlp_widths=[5])
    flat = (x @ x.transpose(1, 2)).reshape(3, 16)
    expected = fmb.mlp(torch.nn.functional.layer_norm(flat, (16,), fmb.norm.weight, fmb.norm.bias)).reshape(3, 3, 2)
    torch.testing.assert_close(fmb(x), expected)


def test_lcb_is_a_matmul_with_its_weight():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3)
    lcb = LinearCompressionBlock(5, 2)
    assert lcb.weight.shape == (2, 5)
    expected = torch.stack([lcb.weight @ x[b] for b in range(4)])
    torch.testing.assert_close(lcb(x), expected)


def test_layer_is_layernorm_of_concat_plus_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    same = WukongLayer(5, 4, num_fm_embeddings=2, num_lcb_embeddings=3)
    assert isinstance(same.residual, torch.nn.Identity)
    expected = torch.nn.functional.layer_norm(torch.cat([same.fmb(x), same.lcb(x)], 1) + x, (4,))
    torch.testing.assert_close(same(x), expected)  # LayerNorm starts as weight 1, bias 0

    grow = WukongLayer(5, 4, num_fm_embeddings=4, num_lcb_embeddings=3)
    assert isinstance(grow.residual, LinearCompressionBlock) and grow.residual.weight.shape == (7, 5)
    expected = torch.nn.functional.layer_norm(torch.cat([grow.fmb(x), grow.lcb(x)], 1) + grow.residual.weight @ x, (4,))
    torch.testing.assert_close(grow(x), expected)


def _layer_norm_by_hand(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LN over the last axis from its definition: (x - mean) / sqrt(var + eps) * gamma + beta."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # the biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mlp_by_hand(x: torch.Tensor, linears: list[torch.nn.Linear]) -> torch.Tensor:
    for i, lin in enumerate(linears):
        x = x @ lin.weight.T + lin.bias
        if i < len(linears) - 1:
            x = torch.clamp(x, min=0.0)  # ReLU between the layers, none after the last
    return x


def _randomize(module: torch.nn.Module) -> None:
    """Every parameter to random values, so LayerNorm's gamma/beta and each bias matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("rank", [None, 3])
def test_branch_is_the_papers_equations_computed_by_hand(rank):
    """X_0 = LN(E); per layer: FMB(X) = reshape(MLP(LN(flatten(X X^T [Y])))), LCB(X) = W_L X,
    X_{i+1} = LN(concat(FMB(X), LCB(X)) + residual(X)); out = flatten(X_L). Every term is
    written out from the module's own weights (Wukong, Zhang et al. 2024, section 3)."""
    torch.manual_seed(0)
    b, n, d = 4, 6, 5
    params = WukongParams(num_layers=2, num_fm_embeddings=3, num_lcb_embeddings=2, fm_rank=rank, mlp_widths=(7,))
    branch = WukongInteraction(n, d, params)
    _randomize(branch)
    e = torch.randn(b, n, d) * 1e-3  # the BARS recipe's embedding scale: the input norm must undo it
    x = _layer_norm_by_hand(e, branch.input_norm)
    for layer in branch.layers:
        inter = torch.einsum("bid,bjd->bij", x, x)  # (B, n, n), <x_i, x_j>
        if rank is not None:
            inter = torch.einsum("bij,jk->bik", inter, layer.fmb.projection)  # (B, n, k), X X^T Y
        flat = inter.reshape(b, -1)
        linears = [m for m in layer.fmb.mlp.modules() if isinstance(m, torch.nn.Linear)]
        fmb = _mlp_by_hand(_layer_norm_by_hand(flat, layer.fmb.norm), linears).reshape(b, -1, d)
        lcb = torch.einsum("li,bid->bld", layer.lcb.weight, x)  # (B, n_L, d), W_L X
        if isinstance(layer.residual, torch.nn.Identity):
            res = x
        else:
            res = torch.einsum("oi,bid->bod", layer.residual.weight, x)
        x = _layer_norm_by_hand(torch.cat([fmb, lcb], 1) + res, layer.norm)
    expected = x.reshape(b, -1)
    torch.testing.assert_close(branch(e), expected, rtol=1e-4, atol=1e-5)
    assert expected.shape == (b, 5 * d)


def test_input_norm_makes_the_branch_blind_to_the_embedding_scale():
    """The tables' scale (N(0, 1e-4^2) under L2 0.1 in the BARS recipe) must not
    change what the branch computes; without the input norm, the FMB's LayerNorm
    is all epsilon at that scale and its output is a constant."""
    torch.manual_seed(0)
    e = torch.randn(256, 10, 10)
    on = WukongInteraction(10, 10, WukongParams())
    torch.testing.assert_close(on(e * 1e-2), on(e), rtol=1e-3, atol=2e-3)
    off = WukongInteraction(10, 10, WukongParams(input_norm=False))
    assert isinstance(off.input_norm, torch.nn.Identity)
    fmb_out = off.layers[0].fmb(e * 1e-3)  # (B, n_F, D)
    spread = fmb_out.var(0).mean() / fmb_out.mean(0).pow(2).mean()
    assert spread < 1e-3, f"the raw-scale FMB varies across examples ({spread:.2e}); the test's premise is wrong"
    fmb_on = on.layers[0].fmb(on.input_norm(e * 1e-3))
    assert fmb_on.var(0).mean() / fmb_on.mean(0).pow(2).mean() > 0.1


# --------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "params, num_features, dim, out_dim",
    [
        (WukongParams(), 11, 16, 16 * 16),
        (WukongParams(num_layers=1, num_fm_embeddings=3, num_lcb_embeddings=2, fm_rank=4), 7, 8, 5 * 8),
        (WukongParams(num_layers=3, num_fm_embeddings=1, num_lcb_embeddings=1, mlp_widths=()), 2, 4, 2 * 4),
        (WukongParams(num_layers=2, fm_rank=2, mlp_widths=(16, 8)), 1, 3, 16 * 3),
    ],
)
def test_branch_shapes(params, num_features, dim, out_dim):
    torch.manual_seed(0)
    branch = WukongInteraction(num_features, dim, params)
    assert branch.out_dim == out_dim
    out = branch(torch.randn(6, num_features, dim))
    assert out.shape == (6, out_dim)
    assert torch.isfinite(out).all()
    assert len(branch.layers) == params.num_layers


def test_branch_is_deterministic_per_seed_and_differs_across_seeds():
    x = torch.randn(3, 6, 4)

    def build(seed):
        torch.manual_seed(seed)
        return WukongInteraction(6, 4, WukongParams(num_layers=2, num_fm_embeddings=2, num_lcb_embeddings=2))

    torch.testing.assert_close(build(0)(x), build(0)(x))
    assert not torch.allclose(build(0)(x), build(1)(x))


def test_bad_module_arguments_name_the_values():
    with pytest.raises(ValueError, match=r"must be ints >= 1: num_outputs=0"):
        LinearCompressionBlock(3, 0)
    with pytest.raises(ValueError, match=r"must be ints >= 1: rank=0"):
        FactorizationMachineBlock(3, 2, num_outputs=1, rank=0)


# ----------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_layers": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.wukong.num_layers"),
        ({"num_fm_embeddings": -2}, "must be >= 1, got -2 @ $.models.feed_ctr.techniques.wukong.num_fm_embeddings"),
        ({"num_lcb_embeddings": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.wukong.num_lcb_embeddings"),
        ({"fm_rank": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.wukong.fm_rank"),
        (
            {"mlp_widths": [64, 0]},
            "every width must be >= 1, got 0 at [1] @ $.models.feed_ctr.techniques.wukong.mlp_widths",
        ),
        (
            {"rank": 4},
            "unknown key 'rank' (did you mean 'fm_rank'?); valid keys: num_layers, num_fm_embeddings, num_lcb_embeddings, fm_rank, mlp_widths, input_norm @ $.models.feed_ctr.techniques.wukong",
        ),
    ],
)
def test_bad_parameters_are_refused_with_their_path(host, eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"wukong": override})
    with pytest.raises(ConfigError) as info:
        host.plan(spec)
    assert str(info.value) == message


def test_parameters_are_structured_from_a_table(host):
    params = host.conv.structure({"num_layers": 3, "fm_rank": 4, "mlp_widths": [32, 16]}, WukongParams)
    assert params == WukongParams(num_layers=3, fm_rank=4, mlp_widths=(32, 16))
    assert host.conv.structure(host.conv.unstructure(params), WukongParams) == params


def _readme_toml(marker: str) -> str:
    """The README's ```toml block that contains ``marker``."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README should have one ```toml block with {marker!r}, has {len(found)}"
    return found[0]


def test_readme_override_example_plans(host):
    text = (
        default_ecosystem_path().read_text(encoding="utf-8")
        + "\n"
        + _readme_toml("[models.feed_ctr.techniques.wukong]")
    )
    eco = ecosystem_from_dict(tomllib.loads(text), conv=host.conv)
    plan = host.plan(eco.model("feed_ctr"))
    (entry,) = [e for e in plan.entries if e.technique == "wukong"]
    assert entry.params["num_layers"] == 3 and entry.params["fm_rank"] == 4
    assert entry.out_dim == (entry.params["num_fm_embeddings"] + entry.params["num_lcb_embeddings"]) * 16


def test_readme_opt_out_example_removes_the_branch(host):
    text = default_ecosystem_path().read_text(encoding="utf-8") + "\n" + _readme_toml("wukong = false")
    eco = ecosystem_from_dict(tomllib.loads(text), conv=host.conv)
    plan = host.plan(eco.model("video_ctr"))
    assert "wukong" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "wukong"] == ["opted out"]
    assert "wukong" in host.plan(eco.model("feed_ctr")).techniques()


# ---------------------------------------------------------------- conformance


def test_conformance(smt_check):
    assert smt_check("wukong") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_default_ecosystem_model_trains_through_the_branch(host, eco, model):
    spec = eco.model(model)
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "wukong"]
    assert entry.slot == "interaction" and entry.dist == "smt-wukong" and entry.version == "0.2.0"
    assert entry.out_dim == (8 + 8) * spec.embedding_dim
    assert entry.flops > 0 and plan.cost.parts["interaction:wukong"] == entry.flops

    model_ = host.build(plan, spec).members[0]
    branch = model_.branches["wukong"]
    assert isinstance(branch, WukongInteraction) and branch.out_dim == entry.out_dim
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
