"""Tests of the smt-embedding-reg plugin (run with the plugin installed)."""

from __future__ import annotations

import attrs
import pytest
import torch
from smt_embedding_reg import EmbeddingRegParams, embedding_l2

from smt_host import ConfigError, Host, LossInputs, example_batch
from smt_host.testing import listed_techniques

pytest_plugins = ["smt_host.testing"]

DIST = "smt-embedding-reg"
MODELS = ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(load=DIST)


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def test_smt_plugins_lists_the_distribution():
    (t,) = listed_techniques(DIST, load_only=True).values()  # alone: nothing shadows it
    assert t["version"] == "0.1.0"
    assert (t["name"], t["slot"]) == ("embedding_reg", "loss")
    assert t["applies_to"] == MODELS


def test_runs_after_the_builtin_loss(host, eco):
    plan = host.plan(eco.model("feed_ctr"))
    assert [e.technique for e in plan.slot("loss")] == ["bce", "embedding_reg"]
    assert plan.slot("loss")[1].params == {"weight": 1e-6, "unique": False}


def _by_hand(model, batch, unique=False) -> float:
    """Sum of squared norms of looked-up rows, with plain Python loops."""
    kjt = batch.sparse
    tables = {f: cfg.name for cfg in model.embedding.embedding_bag_configs() for f in cfg.feature_names}
    total = 0.0
    for key in kjt.keys():
        weight = model.embedding.embedding_bags[tables[key]].weight.detach()
        ids = [int(i) for i in kjt[key].values()]
        if unique:
            ids = sorted(set(ids))
        for i in ids:
            total += float((weight[i].double() ** 2).sum())
    return total


@pytest.mark.parametrize("unique", [False, True])
def test_total_loss_is_base_loss_plus_the_term_by_hand(host, eco, unique):
    spec = eco.model("feed_ctr_cvr")
    spec = attrs.evolve(spec, techniques={"embedding_reg": {"weight": 0.01, "unique": unique}})
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=64)  # ids repeat in small vocabularies
    labels = torch.bernoulli(torch.full((64, 2), 0.3), generator=torch.Generator().manual_seed(0))
    inputs = LossInputs(logits=model(batch.dense, batch.sparse), labels=labels, batch=batch, model=model)
    total = host.build(plan, spec).loss(inputs)
    base_plan = host.plan(attrs.evolve(spec, techniques={"embedding_reg": False}))
    base = host.build(base_plan, spec).loss(inputs)
    hand = _by_hand(model, batch, unique)
    assert hand > 0
    torch.testing.assert_close(total.double(), base.double() + 0.01 * hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        embedding_l2(model, batch.sparse, unique=unique).double(),
        torch.tensor(hand, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-6,
    )


def test_unique_counts_repeated_rows_once(host, eco):
    spec = eco.model("feed_ctr")
    model = host.build(host.plan(spec), spec).members[0]
    batch = example_batch(spec, batch_size=64)
    assert embedding_l2(model, batch.sparse, unique=True) < embedding_l2(model, batch.sparse)


def test_gradient_reaches_only_looked_up_rows(host, eco):
    spec = eco.model("feed_ctr")
    model = host.build(host.plan(spec), spec).members[0]
    batch = example_batch(spec, batch_size=8)
    embedding_l2(model, batch.sparse).backward()
    weight = model.embedding.embedding_bags["t_user_id"].weight
    ids = batch.sparse["user_id"].values()
    counts = torch.bincount(ids, minlength=weight.shape[0]).float()
    # d/dw sum_lookups ||w_i||^2 = 2 * count_i * w_i
    torch.testing.assert_close(weight.grad, 2 * counts[:, None] * weight.detach())
    assert int((weight.grad.abs().sum(1) > 0).sum()) == len(set(ids.tolist()))


def test_zero_weight_leaves_the_loss_unchanged(host, eco):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"embedding_reg": {"weight": 0.0}})
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    inputs = LossInputs(logits=model(batch.dense, batch.sparse), labels=torch.ones(8, 1), batch=batch, model=model)
    off = attrs.evolve(spec, techniques={"embedding_reg": False})
    base = host.build(host.plan(off), off).loss(inputs)
    torch.testing.assert_close(host.build(plan, spec).loss(inputs), base)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"weight": -1.0}, "must be >= 0.0, got -1.0 @ $.models.feed_ctr.techniques.embedding_reg.weight"),
        (
            {"lambda": 1.0},
            "unknown key 'lambda'; valid keys: weight, unique @ $.models.feed_ctr.techniques.embedding_reg",
        ),
    ],
)
def test_parameter_validation_names_the_path(eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"embedding_reg": override})
    with pytest.raises(ConfigError) as exc:
        Host.create().plan(spec)
    assert str(exc.value) == message


def test_params_defaults():
    assert EmbeddingRegParams() == EmbeddingRegParams(weight=1e-6, unique=False)


def test_conformance(smt_check):
    assert smt_check("embedding_reg") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_docstring_examples_run():
    import doctest

    import smt_embedding_reg

    result = doctest.testmod(smt_embedding_reg)
    assert result.attempted > 0 and result.failed == 0
