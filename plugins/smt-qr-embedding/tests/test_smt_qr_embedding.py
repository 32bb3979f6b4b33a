"""Tests of the smt-qr-embedding plugin (run with the plugin installed)."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from smt_qr_embedding import QRFeatureTransform, QRParams, QRPooledTransform
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host import ConfigError, Host, LossInputs, example_batch
from smt_host.testing import listed_techniques

pytest_plugins = ["smt_host.testing"]

DIST = "smt-qr-embedding"
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
    assert (t["name"], t["slot"]) == ("qr_embedding", "embedding")
    assert t["applies_to"] == MODELS  # every default model has user_id (20000) and ad_id (4000) > 1000


def test_applies_only_above_min_vocab(host, eco):
    small = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": {"min_vocab": 50000}})
    with pytest.raises(ConfigError) as exc:
        host.plan(small)
    assert str(exc.value) == (
        "technique 'qr_embedding' is enabled but does not apply to this model: no sparse feature has more than "
        "50000 ids (min_vocab) @ $.models.feed_ctr.techniques.qr_embedding"
    )
    spec = eco.model("feed_ctr")
    tiny = attrs.evolve(spec, features=attrs.evolve(spec.features, sparse=spec.features.sparse[1:3]))
    plan = host.plan(tiny)
    assert "qr_embedding" not in plan.techniques()
    assert {s.name: s.reason for s in plan.skipped}["qr_embedding"] == (
        "not applicable: no sparse feature has more than 1000 ids (min_vocab)"
    )


def test_tables_are_split_and_memory_shrinks(host, eco):
    spec = eco.model("feed_ctr")
    plan = host.plan(spec)
    base = host.plan(spec, builtins_only=True)
    model = host.build(plan, spec).members[0]
    rows = {c.name: (c.num_embeddings, tuple(c.feature_names)) for c in model.embedding.embedding_bag_configs()}
    m_user, m_ad = math.ceil(math.sqrt(20000)), math.ceil(math.sqrt(4000))
    assert (m_user, m_ad) == (142, 64)
    assert rows["t_user_id__q"] == (math.ceil(20000 / 142), ("user_id__q",))
    assert rows["t_user_id__r"] == (142, ("user_id__r",))
    assert rows["t_ad_id__q"] == (63, ("ad_id__q",))
    assert rows["t_ad_id__r"] == (64, ("ad_id__r",))
    assert "t_user_id" not in rows and rows["t_advertiser_id"] == (400, ("advertiser_id",))
    assert plan.widths["tables"] == base.widths["tables"] + 2
    d = 16 * 4
    saved = (20000 - 141 - 142 + 4000 - 63 - 64) * d
    assert base.cost.embedding_bytes - plan.cost.embedding_bytes == saved
    assert plan.cost.embedding_bytes < base.cost.embedding_bytes / 20


def test_num_collisions_override(host, eco):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": {"num_collisions": 4, "min_vocab": 5000}})
    model = host.build(host.plan(spec), spec).members[0]
    rows = {c.name: c.num_embeddings for c in model.embedding.embedding_bag_configs()}
    assert (rows["t_user_id__q"], rows["t_user_id__r"], rows["t_ad_id"]) == (5000, 4, 4000)


def test_ids_split_exactly():
    ids = torch.arange(0, 20000)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["small", "user_id"],
        values=torch.cat([torch.tensor([3, 1]), ids]),
        lengths=torch.tensor([1, 1, 10000, 10000]),
    )
    out = QRFeatureTransform({"user_id": 142})(kjt)
    assert out.keys() == ["small", "user_id__q", "user_id__r"]
    d = out.to_dict()
    torch.testing.assert_close(d["small"].values(), torch.tensor([3, 1]))
    q, r = d["user_id__q"].values(), d["user_id__r"].values()
    torch.testing.assert_close(q * 142 + r, ids)  # the split is exact and invertible
    assert int(q.max()) == math.ceil(20000 / 142) - 1 and int(r.max()) == 141 and int(r.min()) == 0
    assert len({(a, b) for a, b in zip(q.tolist(), r.tolist())}) == 20000  # every id keeps its own pair
    torch.testing.assert_close(d["user_id__q"].lengths(), torch.tensor([10000, 10000]))
    torch.testing.assert_close(d["user_id__r"].lengths(), torch.tensor([10000, 10000]))


def test_multi_valued_features_keep_their_lengths():
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["u"], values=torch.tensor([5, 17, 9]), lengths=torch.tensor([2, 0, 1])
    )
    out = QRFeatureTransform({"u": 4})(kjt)
    torch.testing.assert_close(out.lengths(), torch.tensor([2, 0, 1, 2, 0, 1]))
    torch.testing.assert_close(out.values(), torch.tensor([1, 4, 2, 1, 1, 1]))


@pytest.mark.parametrize("op", ["mult", "add"])
def test_embedding_of_an_id_is_the_combination_of_its_rows(host, eco, op):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": {"op": op}})
    model = host.build(host.plan(spec), spec).members[0]
    batch = example_batch(spec, batch_size=8)
    ids = batch.sparse["user_id"].values()
    sparse = batch.sparse
    for t in model.feature_transforms:
        sparse = t(sparse)
    pooled = model.embedding(sparse).to_dict()
    for t in model.pooled_transforms:
        pooled = t(pooled)
    eq = model.embedding.embedding_bags["t_user_id__q"].weight[ids // 142]
    er = model.embedding.embedding_bags["t_user_id__r"].weight[ids % 142]
    torch.testing.assert_close(pooled["user_id"], eq * er if op == "mult" else eq + er)
    assert set(pooled) == {f.name for f in spec.features.sparse}


@pytest.mark.parametrize("op", ["mult", "add"])
def test_combined_embeddings_start_with_the_spec_init_std(host, eco, op):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": {"op": op}})
    spec = attrs.evolve(spec, features=attrs.evolve(spec.features, embedding_init_std=1e-3))
    model = host.build(host.plan(spec), spec).members[0]
    q = model.embedding.embedding_bags["t_user_id__q"].weight
    r = model.embedding.embedding_bags["t_user_id__r"].weight
    ids = torch.arange(20000)
    combined = q[ids // 142] * r[ids % 142] if op == "mult" else q[ids // 142] + r[ids % 142]
    assert 0.8e-3 < float(combined.std()) < 1.2e-3, (op, combined.std())
    unsplit = model.embedding.embedding_bags["t_advertiser_id"].weight
    assert 0.8e-3 < float(unsplit.std()) < 1.2e-3


def test_pooled_transform_leaves_other_keys():
    t = QRPooledTransform(["u"], "add")
    out = t({"a__q": torch.ones(2, 3), "u__q": torch.ones(2, 3), "u__r": torch.full((2, 3), 2.0)})
    assert sorted(out) == ["a__q", "u"]
    torch.testing.assert_close(out["u"], torch.full((2, 3), 3.0))
    with pytest.raises(ValueError, match="op must be 'mult' or 'add', got 'max'"):
        QRPooledTransform(["u"], "max")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_collisions": 1}, "must be >= 2, got 1 @ $.models.feed_ctr.techniques.qr_embedding.num_collisions"),
        ({"op": "concat"}, "must be one of 'mult', 'add', got 'concat' @ $.models.feed_ctr.techniques.qr_embedding.op"),
        ({"min_vocab": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.qr_embedding.min_vocab"),
    ],
)
def test_parameter_validation_names_the_path(eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": override})
    with pytest.raises(ConfigError) as exc:
        Host.create().plan(spec)
    assert str(exc.value) == message


def test_build_forward_backward_and_export(host, eco):
    spec = eco.model("feed_ctr_cvr")
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = model(batch.dense, batch.sparse)
    assert logits.shape == (8, 2)
    loss = host.build(plan, spec).loss(LossInputs(logits=logits, labels=torch.ones(8, 2), batch=batch, model=model))
    loss.backward()
    for name in ("t_user_id__q", "t_user_id__r", "t_ad_id__q", "t_ad_id__r"):
        assert model.embedding.embedding_bags[name].weight.grad.abs().sum() > 0, name
    exported = torch.export.export(model.eval(), (batch.dense, batch.sparse), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(batch.dense, batch.sparse), model(batch.dense, batch.sparse))


def test_params_defaults():
    assert QRParams() == QRParams(min_vocab=1000, num_collisions=None, op="mult")


def test_conformance(smt_check):
    assert smt_check("qr_embedding") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_docstring_examples_run():
    import doctest

    import smt_qr_embedding

    result = doctest.testmod(smt_qr_embedding)
    assert result.attempted > 0 and result.failed == 0
