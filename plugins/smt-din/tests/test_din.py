"""Tests of the din technique: the paper's equations by hand, the golden
behaviour of target attention, export parity."""

from __future__ import annotations

import doctest
import math
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import smt_din
import torch
from smt_din import ActivationUnit, Dice, PReLU, TargetAttention

from smt_host import ConfigError, Host
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict, tiny_ecosystem

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"
D = 3
#: two real items, one real item then padding, an empty row (L = 3)
MASK = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, D, generator=g), MASK.clone(), torch.randn(3, D, generator=g)


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter and Dice statistic drawn at random (so a bias or an
    alpha the code forgot to use is caught)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, Dice):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _act_by_hand(act: torch.nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The paper's activations of one item's hidden vector s (C,), at inference."""
    if isinstance(act, Dice):  # eq. 9: p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)), running statistics
        p = 1.0 / (1.0 + torch.exp(-(s - act.running_mean) / torch.sqrt(act.running_var + 1e-8)))
        return p * s + (1.0 - p) * act.alpha * s
    if isinstance(act, PReLU):
        return torch.where(s > 0, s, act.alpha * s)
    return 1.0 / (1.0 + torch.exp(-s))


@torch.no_grad()
def _score_by_hand(unit: ActivationUnit, h: torch.Tensor, c: torch.Tensor) -> float:
    """a(h, c) for one item: the MLP over [h, c, h - c, h * c], one matrix-vector product per layer."""
    x = torch.cat([h, c, h - c, h * c]).detach()  # (4D,)
    for linear, act in zip(unit.linears, unit.activations):
        x = _act_by_hand(act, linear.weight @ x + linear.bias)
    return (unit.out.weight[0] @ x + unit.out.bias[0]).item()


def test_docstring_examples_run():
    result = doctest.testmod(smt_din, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8
    assert result.failed == 0


# ------------------------------------------------------------------ the paper's equations


@pytest.mark.parametrize("activation", ["dice", "prelu", "sigmoid"])
def test_weights_and_output_follow_the_paper(activation):
    """w_j = a(h_j, c) unnormalised, 0 on padding; v = sum_j w_j h_j; an empty row gives 0."""
    din = TargetAttention(D, hidden=[5, 4], activation=activation).eval()
    _randomise(din)
    history, mask, candidate = _inputs()
    with torch.no_grad():
        weights = din.attention(history, mask, candidate)
        out = din(history, mask, candidate)
    want_w = torch.zeros(3, 3)
    want_out = torch.zeros(3, D)
    for b in range(3):
        for j in range(3):
            if mask[b, j]:
                want_w[b, j] = _score_by_hand(din.unit, history[b, j], candidate[b])
                want_out[b] += want_w[b, j] * history[b, j]
    torch.testing.assert_close(weights, want_w)
    torch.testing.assert_close(out, want_out)
    assert weights[2].tolist() == [0.0, 0.0, 0.0] and out[2].tolist() == [0.0] * D
    assert not torch.allclose(weights[0].sum(), torch.tensor(1.0)), "the paper's weights are not normalised"


def test_softmax_normalises_over_the_real_items_only():
    din = TargetAttention(D, hidden=[4], activation="prelu", normalize="softmax").eval()
    _randomise(din)
    history, mask, candidate = _inputs()
    with torch.no_grad():
        weights = din.attention(history, mask, candidate)
        out = din(history, mask, candidate)
    raw = [_score_by_hand(din.unit, history[0, j], candidate[0]) for j in range(3)]
    total = sum(math.exp(s) for s in raw)
    torch.testing.assert_close(weights[0], torch.tensor([math.exp(s) / total for s in raw]))
    torch.testing.assert_close(weights[1], torch.tensor([1.0, 0.0, 0.0]))  # one real item takes all the weight
    assert weights[2].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out[1], history[1, 0])
    assert out[2].tolist() == [0.0] * D and torch.isfinite(out).all()


def test_dice_uses_the_batch_statistics_of_the_real_items_in_training():
    """p(s) from the mean and (biased) variance over real items; running
    statistics move by momentum with the unbiased variance."""
    dice = Dice(2)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.3, -0.2]))
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [100.0, 100.0]], [[-2.0, 0.5], [7.0, 7.0], [-50.0, 9.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    real = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]])  # the three real entries
    mean, var = real.mean(0), real.var(0, unbiased=False)
    out = dice(x, mask)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(out, p * x + (1 - p) * dice.alpha * x)
    torch.testing.assert_close(dice.running_mean, 0.1 * mean)
    torch.testing.assert_close(dice.running_var, 0.9 * torch.ones(2) + 0.1 * real.var(0, unbiased=True))
    # an all-empty batch leaves the running statistics alone
    before = dice.running_mean.clone(), dice.running_var.clone()
    assert torch.isfinite(dice(x, torch.zeros(2, 3, dtype=torch.bool))).all()
    torch.testing.assert_close((dice.running_mean, dice.running_var), before)


def test_dice_with_alpha_one_is_the_identity_and_with_alpha_zero_gates_by_p():
    dice = Dice(3).eval()
    s = torch.tensor([[-1.0, 0.0, 2.0]])
    torch.testing.assert_close(dice(s), s * torch.sigmoid(s / math.sqrt(1 + 1e-8)))  # alpha 0, stats (0, 1)
    with torch.no_grad():
        dice.alpha.fill_(1.0)
    torch.testing.assert_close(dice(s), s)


def test_padding_never_reaches_the_output_or_the_statistics():
    """Padded rows of the history may hold anything (even NaN): weights,
    output, gradients and Dice's batch statistics are those of the real items."""
    torch.manual_seed(0)
    din = TargetAttention(D, hidden=[6, 4])
    history, mask, candidate = _inputs()
    dirty = torch.where(mask.unsqueeze(-1), history, torch.full_like(history, float("nan")))
    clean = torch.where(mask.unsqueeze(-1), history, 0.0)
    twin = TargetAttention(D, hidden=[6, 4])
    twin.load_state_dict(din.state_dict())
    out_dirty, out_clean = din(dirty, mask, candidate), twin(clean, mask, candidate)  # training mode
    torch.testing.assert_close(out_dirty, out_clean)
    torch.testing.assert_close(din.unit.activations[0].running_mean, twin.unit.activations[0].running_mean)
    out_dirty.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in din.parameters())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    din = TargetAttention(D)
    history, mask, candidate = _inputs()
    history.requires_grad_(True)
    candidate.requires_grad_(True)
    din(history, mask, candidate).pow(2).sum().backward()
    assert [n for n, p in din.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert candidate.grad.abs().sum() > 0, "the candidate steers the weights"
    assert history.grad[2].abs().sum() == 0, "the empty row's padding gets no gradient"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "relu"}, "activation must be one of 'dice', 'prelu', 'sigmoid', got 'relu'"),
        ({"normalize": "l1"}, "normalize must be 'none' or 'softmax', got 'l1'"),
        ({"hidden": [8, 0]}, "hidden widths must be >= 1, got [8, 0]"),
    ],
)
def test_module_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TargetAttention(4, **kwargs)


# ------------------------------------------------------------------ the golden behaviour


def _dot_product_unit(din: TargetAttention) -> None:
    """Weights such that a(h, c) = h . c exactly: the first layer copies the
    h * c block, the second sums it into one unit, the output reads that
    unit; Dice with alpha = 1 is the identity, whatever its statistics."""
    first, second = din.unit.linears
    with torch.no_grad():
        for p in din.parameters():
            p.zero_()
        first.weight[:D, 3 * D :] = torch.eye(D)  # [h, c, h - c, h * c] -> h * c
        second.weight[0, :D] = 1.0  # -> sum_d h_d c_d
        din.unit.out.weight[0, 0] = 1.0
        for act in din.unit.activations:
            act.alpha.fill_(1.0)


def test_attention_reorders_when_the_candidate_changes():
    """THE golden behaviour of target attention: one fixed history, three
    candidates; each candidate attends most to the item most like it."""
    din = TargetAttention(D).eval()  # the paper's unit: hidden 80, 40, Dice
    _dot_product_unit(din)
    history = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]).repeat(3, 1, 1)
    mask = torch.tensor([[True, True, True, False]]).repeat(3, 1)
    candidates = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.5, 2.0], [0.5, 2.0, 0.5]])
    with torch.no_grad():
        weights = din.attention(history, mask, candidates)  # (3, 4)
        out = din(history, mask, candidates)
    torch.testing.assert_close(weights[:, :3], candidates)  # w_j = h_j . c with one-hot h_j
    assert weights[:, 3].tolist() == [0.0, 0.0, 0.0]
    assert weights.argmax(dim=1).tolist() == [0, 2, 1], "the most attended item follows the candidate"
    orders = [torch.argsort(w[:3], descending=True).tolist() for w in weights]
    assert len({tuple(o) for o in orders}) == 3, f"three candidates, one order: {orders}"
    torch.testing.assert_close(out, candidates)  # sum_j (h_j . c) h_j = c on an orthonormal history
    mean_pool = history[:, :3].mean(1)
    assert torch.allclose(mean_pool[0], mean_pool[1]), "mean pooling cannot tell the candidates apart"


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("activation", ["dice", "prelu", "sigmoid"])
def test_export_matches_eager(activation, normalize):
    din = TargetAttention(D, hidden=[5, 4], activation=activation, normalize=normalize).eval()
    _randomise(din)
    history, mask, candidate = _inputs()
    exported = torch.export.export(din, (history, mask, candidate), strict=False)
    other_history, _, other_candidate = _inputs(seed=7)
    other_mask = torch.tensor([[False, False, False], [True, True, False], [True, True, True]])
    with torch.no_grad():
        for args in ((history, mask, candidate), (other_history, other_mask, other_candidate)):
            torch.testing.assert_close(exported.module()(*args), din(*args))


# ------------------------------------------------------------------ the host


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def tiny():
    return tiny_ecosystem(histories=True).model("tiny_history")


def with_params(spec, value, name="din"):
    return attrs.evolve(spec, techniques={**spec.techniques, name: value})


def test_conformance_defaults(smt_check):
    assert smt_check("din") == ["tiny_history"]


@pytest.mark.parametrize(
    "value",
    [
        {"activation": "prelu", "normalize": "softmax", "dropout": 0.1},
        {"activation": "sigmoid", "hidden": []},
    ],
)
def test_conformance(smt_check, value):
    eco = tiny_ecosystem(histories=True)
    eco = attrs.evolve(eco, models={n: with_params(m, value) for n, m in eco.models.items()})
    assert smt_check("din", ecosystem=eco) == ["tiny_history"]


@pytest.mark.parametrize(
    "value, message",
    [
        (
            {"activation": "relu"},
            "must be one of 'dice', 'prelu', 'sigmoid', got 'relu' @ $.models.tiny_history.techniques.din.activation",
        ),
        (
            {"normalize": "sum"},
            "must be one of 'none', 'softmax', got 'sum' @ $.models.tiny_history.techniques.din.normalize",
        ),
        ({"hidden": [80, 0]}, "every width must be >= 1, got 0 at [1] @ $.models.tiny_history.techniques.din.hidden"),
        ({"dropout": 1.0}, "must be in [0.0, 0.9], got 1.0 @ $.models.tiny_history.techniques.din.dropout"),
        (
            {"hiden": [8]},
            "unknown key 'hiden' (did you mean 'hidden'?); valid keys: hidden, activation, normalize, dropout"
            " @ $.models.tiny_history.techniques.din",
        ),
    ],
)
def test_bad_params_name_the_path(host, tiny, value, message):
    with pytest.raises(ConfigError) as info:
        host.plan(with_params(tiny, value))
    assert str(info.value) == message


def test_params_reach_the_module_and_the_plan_counts_its_flops(host, tiny):
    spec = with_params(tiny, {"hidden": [12, 6], "activation": "prelu", "normalize": "softmax"})
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == "din"]
    assert (entry.slot, entry.dist, entry.version) == ("sequence", "smt-din", "0.1.0")
    assert entry.params == {"hidden": [12, 6], "activation": "prelu", "normalize": "softmax", "dropout": 0.0}
    module = host.build(plan, spec).members[0].sequence["hist_ad_id"]
    assert isinstance(module, TargetAttention) and module.normalize == "softmax"
    assert [(m.in_features, m.out_features) for m in module.unit.linears] == [(32, 12), (12, 6)]
    assert all(isinstance(a, PReLU) for a in module.unit.activations)
    # the activation unit's matrix products, for each of the max_length items: 2 (4D*12 + 12*6 + 6*1)
    (feature,) = spec.features.sequence
    d = spec.embedding_dim
    assert entry.flops == feature.max_length * 2 * (4 * d * 12 + 12 * 6 + 6)


def test_din_wins_the_sequence_slot_over_the_built_in(host, tiny):
    plan = host.plan(tiny)
    assert [e.technique for e in plan.entries if e.slot == "sequence"] == ["din"]
    assert ("mean_pool", "shadowed by din") in [(s.name, s.reason) for s in plan.skipped]
    opted_out = host.plan(with_params(tiny, False))
    assert "din" not in opted_out.techniques()
    assert [s.reason for s in opted_out.skipped if s.name == "din"] == ["opted out"]


def test_models_without_a_history_do_not_take_it(host):
    eco = tiny_ecosystem(histories=True)
    for name in ("tiny_ctr", "tiny_multi", "tiny_nodense"):
        plan = host.plan(eco.model(name))
        assert "din" not in plan.techniques()
        assert [s.reason for s in plan.skipped if s.name == "din"] == ["not applicable: no sequence features"]
    with pytest.raises(ConfigError, match="technique 'din' is enabled but does not apply to this model"):
        host.plan(with_params(eco.model("tiny_ctr"), {"normalize": "softmax"}))


def test_disabling_the_distribution_gives_the_history_back_to_mean_pool(tiny):
    blocked = Host.create(disable="smt-din")
    assert "din" not in blocked.spm.techniques
    assert "din" not in blocked.plan(tiny).techniques()


def test_readme_examples_plan(host):
    """Every TOML example of the README, appended to the default ecosystem, plans."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    base = default_ecosystem_path().read_text(encoding="utf-8")
    seen = []
    for block in blocks:
        eco = ecosystem_from_dict(tomllib.loads(base + "\n" + block), conv=host.conv)
        seen.append("din" in host.plan(eco.model("feed_ctr")).techniques())
    assert True in seen and False in seen, "the README shows an override and an opt-out"


def test_a_built_model_attends_by_candidate(host, tiny):
    """The golden behaviour inside a built model: the history module the host
    built, given its own candidate embeddings, weighs one history differently
    for two candidates (mean pooling would not)."""
    torch.manual_seed(0)
    model = host.build(host.plan(tiny), tiny).members[0].eval()
    module = model.sequence["hist_ad_id"]
    table = dict(model.named_parameters())["embedding.embedding_bags.t_ad_id.weight"]  # (4000, D)
    history = table[:5].detach().unsqueeze(0).repeat(2, 1, 1)  # (2, 5, D): ads 0..4
    candidate = table[[0, 4]].detach()  # ads 0 and 4
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        weights = module.attention(history, mask, candidate)
    assert not torch.allclose(weights[0], weights[1])


def test_installing_changes_only_the_plans_of_the_models_with_a_history(host):
    """Uninstalled (disabled), every model of the default ecosystem but
    those with a history plans exactly as with smt-din installed."""
    eco = host.default_ecosystem()
    without = Host.create(disable="smt-din")
    changed = [name for name, spec in eco.models.items() if host.plan(spec).entries != without.plan(spec).entries]
    assert changed == [name for name, spec in eco.models.items() if spec.features.sequence]
    assert changed == ["feed_ctr", "video_ctr"]


RECIPE = Path(__file__).resolve().parents[3] / "benchmarks" / "recipes" / "din.toml"


@pytest.mark.skipif(not RECIPE.exists(), reason="the recipe lives in the smt repository, not the distribution")
def test_the_recipe_sets_din_on_every_model_with_a_history(host):
    from smt_host.testing import load_ecosystem

    eco = load_ecosystem(RECIPE)
    with_history = [name for name, spec in eco.models.items() if spec.features.sequence]
    assert with_history == ["feed_ctr", "video_ctr"]
    for name in with_history:
        spec = eco.model(name)
        assert isinstance(spec.techniques.get("din"), dict), f"{name}: the recipe sets no din parameters"
        (entry,) = [e for e in host.plan(spec).entries if e.technique == "din"]
        assert entry.params == {**host.conv.unstructure(smt_din.DINParams()), **spec.techniques["din"]}
