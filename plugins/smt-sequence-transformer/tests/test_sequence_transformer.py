"""Tests of the sequence_transformer technique: BST's encoder by hand,
empty histories, positions, export parity."""

from __future__ import annotations

import doctest
import math
import re
import tomllib
from pathlib import Path

import attrs
import pytest
import smt_sequence_transformer
import torch
from smt_sequence_transformer import EncoderLayer, SequenceTransformerEncoder

from smt_host import ConfigError, Host
from smt_host.testing import default_ecosystem_path, ecosystem_from_dict, tiny_ecosystem

pytest_plugins = ["smt_host.testing"]

README = Path(__file__).resolve().parents[1] / "README.md"
D, HEADS, FF = 4, 2, 6
#: three real items; one real item then padding; an empty row (L = 3)
MASK = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, D, generator=g), MASK.clone(), torch.randn(3, D, generator=g)


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter at random, LayerNorm gains and biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return (x - mean) / math.sqrt(var + norm.eps) * norm.weight + norm.bias


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.01 * x)


@torch.no_grad()
def _layer_by_hand(layer: EncoderLayer, tokens: torch.Tensor, valid: list[bool]) -> torch.Tensor:
    """One post-norm encoder layer on one row of N tokens (N, D), head by
    head and token by token: attention softmax(q k / sqrt(d_h)) over the
    valid keys, output projection, residual + LayerNorm, LeakyReLU FFN,
    residual + LayerNorm."""
    n, dh = tokens.shape[0], D // HEADS
    wq, wk, wv = layer.qkv.weight.split(D)
    bq, bk, bv = layer.qkv.bias.split(D)
    out = torch.zeros(n, D)
    for i in range(n):
        heads = []
        for h in range(HEADS):
            rows = slice(h * dh, (h + 1) * dh)
            q = wq[rows] @ tokens[i] + bq[rows]
            scores = [
                float(q @ (wk[rows] @ tokens[j] + bk[rows])) / math.sqrt(dh) if valid[j] else -math.inf
                for j in range(n)
            ]
            top = max(scores)
            e = [math.exp(s - top) for s in scores]
            a = [v / sum(e) for v in e]
            heads.append(sum(a[j] * (wv[rows] @ tokens[j] + bv[rows]) for j in range(n)))
        attended = layer.proj.weight @ torch.cat(heads) + layer.proj.bias
        x = _layer_norm(tokens[i] + attended, layer.norm1)
        ff = layer.ff2.weight @ _leaky_relu(layer.ff1.weight @ x + layer.ff1.bias) + layer.ff2.bias
        out[i] = _layer_norm(x + ff, layer.norm2)
    return out


def test_docstring_examples_run():
    result = doctest.testmod(smt_sequence_transformer, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


# ------------------------------------------------------------------ BST by hand


@pytest.mark.parametrize("output", ["candidate", "mean"])
def test_one_layer_follows_the_paper(output):
    """tokens [c, h_1..h_L] + positions 0..L; one encoder layer; the
    candidate token's output, or the mean over the valid tokens."""
    bst = SequenceTransformerEncoder(D, max_length=5, heads=HEADS, ff_dim=FF, output=output).eval()
    _randomise(bst)
    history, mask, candidate = _inputs()
    with torch.no_grad():
        out = bst(history, mask, candidate)
    (layer,) = bst.layers
    for b in range(3):
        tokens = torch.cat([candidate[b : b + 1], history[b]]) + bst.positions.weight[:4]  # (L+1, D)
        valid = [True, *mask[b].tolist()]
        encoded = _layer_by_hand(layer, tokens, valid)
        if output == "candidate":
            want = encoded[0]
        else:
            want = sum(encoded[j] for j in range(4) if valid[j]) / sum(valid)
        torch.testing.assert_close(out[b], want, msg=lambda m, b=b: f"row {b}: {m}")


def test_two_layers_compose():
    bst = SequenceTransformerEncoder(D, max_length=3, layers=2, heads=HEADS, ff_dim=FF).eval()
    _randomise(bst)
    history, mask, candidate = _inputs()
    with torch.no_grad():
        out = bst(history, mask, candidate)
    for b in range(3):
        tokens = torch.cat([candidate[b : b + 1], history[b]]) + bst.positions.weight
        valid = [True, *mask[b].tolist()]
        for layer in bst.layers:
            tokens = _layer_by_hand(layer, tokens, valid)
        torch.testing.assert_close(out[b], tokens[0])


def test_an_empty_history_is_the_candidate_attending_to_itself():
    """With only the candidate valid, attention returns its own value:
    the output is finite and depends on the candidate alone."""
    torch.manual_seed(0)
    bst = SequenceTransformerEncoder(D, max_length=5, heads=HEADS).eval()
    history, mask, candidate = _inputs()
    empty = torch.zeros(3, 1, dtype=torch.bool)
    with torch.no_grad():
        a = bst(history[:, :1], empty, candidate)
        b = bst(torch.full_like(history[:, :1], 1e4), empty, candidate)
        c = bst(history[:, :1], empty, candidate + 1)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("output", ["candidate", "mean"])
def test_padding_never_reaches_the_output(output):
    torch.manual_seed(0)
    bst = SequenceTransformerEncoder(D, max_length=5, layers=2, heads=HEADS, output=output)
    history, mask, candidate = _inputs()
    dirty = torch.where(mask.unsqueeze(-1), history, torch.full_like(history, float("nan")))
    bst.eval()
    with torch.no_grad():
        torch.testing.assert_close(bst(dirty, mask, candidate), bst(history, mask, candidate))
        # a longer padded batch (L = 5) gives the same rows
        longer = torch.cat([history, torch.randn(3, 2, D)], dim=1)
        torch.testing.assert_close(
            bst(longer, torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1), candidate),
            bst(history, mask, candidate),
        )


def test_positions_encode_recency():
    """Reversing a history changes the output (positions by recency rank);
    without positions the encoder would be order-blind."""
    torch.manual_seed(0)
    bst = SequenceTransformerEncoder(D, max_length=5, heads=HEADS).eval()
    history, mask, candidate = _inputs()
    with torch.no_grad():
        out = bst(history, mask, candidate)
        flipped = bst(history.flip(1), mask, candidate)  # row 0 has three real items
        assert not torch.allclose(out[0], flipped[0])
        bst.positions.weight.zero_()
        torch.testing.assert_close(bst(history.flip(1), mask, candidate)[0], bst(history, mask, candidate)[0])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    bst = SequenceTransformerEncoder(D, max_length=3, layers=2, heads=HEADS, dropout=0.1)
    history, mask, candidate = _inputs()
    bst(history, mask, candidate).pow(2).sum().backward()
    assert [n for n, p in bst.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": 3}, "heads must be >= 1 and divide dim, got heads=3 and dim=4"),
        ({"output": "max"}, "output must be 'candidate' or 'mean', got 'max'"),
        ({"activation": "tanh"}, "activation must be one of 'leaky_relu', 'relu', 'gelu', got 'tanh'"),
        ({"layers": 0}, "max_length and layers must be >= 1, got 5 and 0"),
    ],
)
def test_module_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SequenceTransformerEncoder(D, max_length=5, **kwargs)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("output", ["candidate", "mean"])
def test_export_matches_eager(output):
    bst = SequenceTransformerEncoder(D, max_length=6, layers=2, heads=HEADS, output=output).eval()
    _randomise(bst)
    history, mask, candidate = _inputs()
    exported = torch.export.export(bst, (history, mask, candidate), strict=False)
    other_history, _, other_candidate = _inputs(seed=7)
    other_mask = torch.tensor([[False, False, False], [True, True, False], [True, True, True]])
    with torch.no_grad():
        for args in ((history, mask, candidate), (other_history, other_mask, other_candidate)):
            torch.testing.assert_close(exported.module()(*args), bst(*args))


def test_export_with_a_dynamic_batch_and_length():
    """One exported program serves every batch size and history length up to max_length."""
    bst = SequenceTransformerEncoder(D, max_length=6, heads=HEADS).eval()
    _randomise(bst)
    history, mask, candidate = _inputs()
    batch, length = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("length", min=1, max=6)
    exported = torch.export.export(
        bst,
        (history, mask, candidate),
        dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}, {0: batch}),
        strict=False,
    )
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(5, 6, D, generator=g), torch.rand(5, 6, generator=g) > 0.5, torch.randn(5, D, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*args), bst(*args))


# ------------------------------------------------------------------ the host

NAME = "sequence_transformer"


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def tiny():
    return tiny_ecosystem(histories=True).model("tiny_history")


def with_params(spec, value, name=NAME):
    return attrs.evolve(spec, techniques={**spec.techniques, name: value})


def test_conformance_defaults(smt_check):
    assert smt_check(NAME) == ["tiny_history"]


@pytest.mark.parametrize(
    "value",
    [
        {"layers": 2, "heads": 4, "output": "mean", "activation": "gelu"},
        {"heads": 1, "ff_dim": 8, "dropout": 0.0},
    ],
)
def test_conformance(smt_check, value):
    eco = tiny_ecosystem(histories=True)
    eco = attrs.evolve(eco, models={n: with_params(m, value) for n, m in eco.models.items()})
    assert smt_check(NAME, ecosystem=eco) == ["tiny_history"]


@pytest.mark.parametrize(
    "value, message",
    [
        (
            {"heads": 3},
            "must divide the embedding dim D=8, got 3 @ $.models.tiny_history.techniques.sequence_transformer.heads",
        ),
        ({"layers": 0}, "must be >= 1, got 0 @ $.models.tiny_history.techniques.sequence_transformer.layers"),
        ({"ff_dim": 0}, "must be >= 1, got 0 @ $.models.tiny_history.techniques.sequence_transformer.ff_dim"),
        (
            {"output": "max"},
            "must be one of 'candidate', 'mean', got 'max' @ $.models.tiny_history.techniques.sequence_transformer.output",
        ),
        (
            {"activation": "tanh"},
            "must be one of 'leaky_relu', 'relu', 'gelu', got 'tanh'"
            " @ $.models.tiny_history.techniques.sequence_transformer.activation",
        ),
        (
            {"head": 2},
            "unknown key 'head' (did you mean 'heads'?); valid keys: layers, heads, ff_dim, dropout, activation, output"
            " @ $.models.tiny_history.techniques.sequence_transformer",
        ),
    ],
)
def test_bad_params_name_the_path(host, tiny, value, message):
    spec = with_params(tiny, value)
    with pytest.raises(ConfigError) as info:
        host.build(host.plan(spec), spec)
    assert str(info.value) == message


def test_params_reach_the_module_and_the_plan_counts_its_flops(host, tiny):
    spec = with_params(tiny, {"layers": 2, "heads": 4, "ff_dim": 12, "output": "mean"})
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.technique == NAME]
    assert (entry.slot, entry.dist, entry.version) == ("sequence", "smt-sequence-transformer", "0.1.0")
    assert entry.params == {
        "layers": 2,
        "heads": 4,
        "ff_dim": 12,
        "dropout": 0.2,
        "activation": "leaky_relu",
        "output": "mean",
    }
    module = host.build(plan, spec).members[0].sequence["hist_ad_id"]
    (feature,) = spec.features.sequence
    d, n = spec.embedding_dim, feature.max_length + 1  # tokens: the candidate and max_length items
    assert isinstance(module, SequenceTransformerEncoder) and module.output == "mean"
    assert module.positions.num_embeddings == n
    assert [(layer.heads, layer.ff1.out_features) for layer in module.layers] == [(4, 12), (4, 12)]
    # per layer: q, k, v (2 N D 3D), scores and their weighted sum (2 x 2 N N D), the output
    # projection (2 N D D) and the feed-forward network (2 N D ff x 2)
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 12
    assert entry.flops == 2 * per_layer


def test_priority_below_din_above_the_built_in(host, tiny):
    plan = host.plan(tiny)
    winner = [e.technique for e in plan.entries if e.slot == "sequence"]
    if "din" in host.spm.techniques:  # both plugins installed: din wins, the transformer is shadowed
        assert winner == ["din"]
        assert (NAME, "shadowed by din") in [(s.name, s.reason) for s in plan.skipped]
        plan = host.plan(with_params(tiny, False, name="din"))
        winner = [e.technique for e in plan.entries if e.slot == "sequence"]
    assert winner == [NAME]
    assert ("mean_pool", f"shadowed by {NAME}") in [(s.name, s.reason) for s in plan.skipped]
    assert host.spm.techniques[NAME].info.priority > host.spm.techniques["mean_pool"].info.priority
    explicit = host.plan(with_params(tiny, True))  # enabled by name, it wins whatever else is installed
    assert [e.technique for e in explicit.entries if e.slot == "sequence"] == [NAME]


def test_models_without_a_history_do_not_take_it(host):
    eco = tiny_ecosystem(histories=True)
    for name in ("tiny_ctr", "tiny_multi", "tiny_nodense"):
        plan = host.plan(eco.model(name))
        assert NAME not in plan.techniques()
        assert [s.reason for s in plan.skipped if s.name == NAME] == ["not applicable: no sequence features"]


def test_readme_examples_plan(host):
    """Every TOML example of the README, appended to the default ecosystem, plans."""
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    base = default_ecosystem_path().read_text(encoding="utf-8")
    seen = []
    for block in blocks:
        eco = ecosystem_from_dict(tomllib.loads(base + "\n" + block), conv=host.conv)
        seen.append(NAME in host.plan(eco.model("feed_ctr")).techniques())
    assert True in seen and False in seen, "the README shows an override and an opt-out"


def test_installing_changes_only_the_plans_of_the_models_with_a_history():
    """With smt-din out of the way, disabling smt-sequence-transformer
    changes the plans of the default models with a history and no other."""
    host = Host.create(disable="smt-din")
    eco = host.default_ecosystem()
    without = Host.create(disable="smt-din,smt-sequence-transformer")
    changed = [name for name, spec in eco.models.items() if host.plan(spec).entries != without.plan(spec).entries]
    assert changed == [name for name, spec in eco.models.items() if spec.features.sequence]
    assert changed == ["feed_ctr", "video_ctr"]


RECIPE = Path(__file__).resolve().parents[3] / "benchmarks" / "recipes" / "sequence_transformer.toml"


@pytest.mark.skipif(not RECIPE.exists(), reason="the recipe lives in the smt repository, not the distribution")
def test_the_recipe_sets_the_transformer_on_every_model_with_a_history(host):
    from smt_host.testing import load_ecosystem

    eco = load_ecosystem(RECIPE)
    with_history = [name for name, spec in eco.models.items() if spec.features.sequence]
    assert with_history == ["feed_ctr", "video_ctr"]
    for name in with_history:
        spec = eco.model(name)
        assert isinstance(spec.techniques.get(NAME), dict), f"{name}: the recipe sets no {NAME} parameters"
        (entry,) = [e for e in host.plan(spec).entries if e.technique == NAME]  # named, it wins over din
        defaults = host.conv.unstructure(smt_sequence_transformer.SequenceTransformerParams())
        assert entry.params == {**defaults, **spec.techniques[NAME]}
