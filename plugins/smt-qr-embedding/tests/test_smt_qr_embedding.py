"""Tests of the smt-qr-embedding plugin (run with the plugin installed)."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from smt_qr_embedding import (
    QRFeatureTransform,
    QRParams,
    QRPooledTransform,
    collisions,
    part_init_std,
    saves_rows,
    split_rows,
)
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
    assert t["version"] == "0.2.0"
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
    tiny = attrs.evolve(spec, features=attrs.evolve(spec.features, sparse=spec.features.sparse[1:3], sequence=()))
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
    torch.testing.assert_close(pooled["user_id"], (1 + eq) * er if op == "mult" else eq + er)
    assert set(pooled) == {f.name for f in spec.features.sparse}


@pytest.mark.parametrize("op", ["mult", "add"])
def test_combined_embeddings_start_with_the_spec_init_std(host, eco, op):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": {"op": op}})
    spec = attrs.evolve(spec, features=attrs.evolve(spec.features, embedding_init_std=1e-3))
    model = host.build(host.plan(spec), spec).members[0]
    q = model.embedding.embedding_bags["t_user_id__q"].weight
    r = model.embedding.embedding_bags["t_user_id__r"].weight
    ids = torch.arange(20000)
    combined = (1 + q[ids // 142]) * r[ids % 142] if op == "mult" else q[ids // 142] + r[ids % 142]
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
        ({"op": "concat"}, "must be one of 'add', 'mult', got 'concat' @ $.models.feed_ctr.techniques.qr_embedding.op"),
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
    assert QRParams() == QRParams(min_vocab=1000, num_collisions=None, op="add")


def test_conformance(smt_check):
    assert smt_check("qr_embedding") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_docstring_examples_run():
    import doctest

    import smt_qr_embedding

    result = doctest.testmod(smt_qr_embedding)
    assert result.attempted > 0 and result.failed == 0


def _qr_lookup(w_q: torch.Tensor, w_r: torch.Tensor, op: str, values, lengths, pooling: str = "sum") -> torch.Tensor:
    """The technique's path for one feature ``f`` (feature transform, the two
    tables, pooled transform) with the paper's tables W_q (ceil(V/m), D) and
    W_r (m, D) loaded (for ``mult`` the quotient table stores W_q - 1)."""
    from smt_host import TableSpec, make_ebc

    m, d = w_r.shape
    ebc = make_ebc(
        [
            TableSpec("t__q", ["f__q"], w_q.shape[0], d, pooling=pooling),
            TableSpec("t__r", ["f__r"], m, d, pooling=pooling),
        ]
    )
    with torch.no_grad():
        ebc.embedding_bags["t__q"].weight.copy_(w_q - 1 if op == "mult" else w_q)
        ebc.embedding_bags["t__r"].weight.copy_(w_r)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor(values), lengths=torch.tensor(lengths))
    pooled = ebc(QRFeatureTransform({"f": m})(kjt)).to_dict()
    return QRPooledTransform(["f"], op)(pooled)["f"]


# V = 10 ids, m = 4: quotient rows 0..2, remainder rows 0..3 (the paper's e(i) = W_q[i \ m] o W_r[i mod m])
W_Q = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
W_R = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 1.0]])


@pytest.mark.parametrize(
    "op, expected",
    [
        # id 7 = 1 * 4 + 3, id 9 = 2 * 4 + 1, id 0 = 0 * 4 + 0, id 6 = 1 * 4 + 2
        ("mult", [[-3.0, 4.0], [0.0, 6.0], [1.0, 0.0], [6.0, 8.0]]),
        ("add", [[2.0, 5.0], [5.0, 7.0], [2.0, 2.0], [5.0, 6.0]]),
    ],
)
def test_golden_values_of_the_papers_equations(op, expected):
    out = _qr_lookup(W_Q, W_R, op, [7, 9, 0, 6], [1, 1, 1, 1])
    torch.testing.assert_close(out, torch.tensor(expected))


@pytest.mark.parametrize("op", ["mult", "add"])
def test_every_id_against_the_equation(op):
    g = torch.Generator().manual_seed(0)
    v, m, d = 23, 5, 3
    w_q, w_r = torch.randn(math.ceil(v / m), d, generator=g), torch.randn(m, d, generator=g)
    out = _qr_lookup(w_q, w_r, op, list(range(v)), [1] * v)
    for i in range(v):
        want = w_q[i // m] * w_r[i % m] if op == "mult" else w_q[i // m] + w_r[i % m]
        torch.testing.assert_close(out[i], want)


def test_a_mean_pooled_bag_is_the_product_of_the_pooled_factors():
    """The paper's QREmbeddingBag pools each table, then combines:
    mean(W_q[q_j]) o mean(W_r[r_j]) for the bag {7, 9}."""
    out = _qr_lookup(W_Q, W_R, "mult", [7, 9], [2], pooling="mean")
    want = (W_Q[[1, 2]].mean(0)) * (W_R[[3, 1]].mean(0))
    torch.testing.assert_close(out[0], want)


@pytest.mark.parametrize("op", ["mult", "add"])
def test_each_table_gets_the_gradient_of_the_embedding_at_init(op):
    """What stalled version 0.1 on Frappe: both factors of the product started
    at std sqrt(1e-4), so each table's gradient was 1e-2 of the embedding's.
    Now the remainder rows (and, for add, the quotient rows) get the
    embedding's own gradient, summed over the ids that share the row."""
    from smt_host import TableSpec, make_ebc

    torch.manual_seed(0)
    q_std, r_std = part_init_std(1e-4, op)
    ebc = make_ebc(
        [TableSpec("t__q", ["u__q"], 141, 16, init_std=q_std), TableSpec("t__r", ["u__r"], 142, 16, init_std=r_std)]
    )
    w_q, w_r = ebc.embedding_bags["t__q"].weight, ebc.embedding_bags["t__r"].weight
    if op == "mult":
        assert float(w_q.abs().max()) < 1e-3  # the table stores E_q = W_q - 1: the quotient factor starts at 1
    ids = torch.tensor([5, 147, 289, 7])  # 5, 147, 289 share remainder row 5 (m = 142)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=ids, lengths=torch.ones(4, dtype=torch.long))
    e = QRPooledTransform(["u"], op)(ebc(QRFeatureTransform({"u": 142})(kjt)).to_dict())["u"]  # (4, 16)
    upstream = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    (e * upstream).sum().backward()
    torch.testing.assert_close(w_r.grad[5], upstream[:3].sum(0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(w_r.grad[7], upstream[3], rtol=1e-3, atol=1e-3)
    if op == "add":
        torch.testing.assert_close(w_q.grad[1], upstream[1])  # id 147 = 1 * 142 + 5


def test_learns_under_l2_on_the_tables_from_a_tiny_init():
    """The Frappe recipe in small: tables from N(0, 1e-4^2), Adam with L2 0.1
    on every row; the label depends on the id only. The default op learns it
    (version 0.1's product of two small tables stayed at AUC 0.5)."""
    from smt_host import TableSpec, binary_metrics, make_ebc

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    v, m, d = 400, 20, 8
    params = QRParams()
    u, w = torch.randn(v // m, 2, generator=g), torch.randn(m, 2, generator=g)
    truth = (u[torch.arange(v) // m] * w[torch.arange(v) % m]).sum(1)  # (V,) logit of each id
    q_std, r_std = part_init_std(1e-4, params.op)
    ebc = make_ebc(
        [TableSpec("t__q", ["f__q"], v // m, d, init_std=q_std), TableSpec("t__r", ["f__r"], m, d, init_std=r_std)]
    )
    split, combine = QRFeatureTransform({"f": m}), QRPooledTransform(["f"], params.op)
    head = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opts = [torch.optim.Adam(ebc.parameters(), lr=1e-2, weight_decay=0.1), torch.optim.Adam(head.parameters(), lr=1e-2)]

    def logits(ids: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.ones_like(ids))
        return head(combine(ebc(split(kjt)).to_dict())["f"]).squeeze(1)

    for _ in range(400):
        ids = torch.randint(0, v, (256,), generator=g)
        y = torch.bernoulli(torch.sigmoid(3 * truth[ids]), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(ids), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    with torch.no_grad():
        ids = torch.randint(0, v, (4096,), generator=g)
        y = torch.bernoulli(torch.sigmoid(3 * truth[ids]), generator=g)
        assert binary_metrics(torch.sigmoid(logits(ids)), y, base_rate=float(y.mean()))["auc"] > 0.8


def test_refuses_a_model_where_no_table_would_shrink(host, eco):
    spec = eco.model("feed_ctr")
    spec = attrs.evolve(spec, techniques={"qr_embedding": {"num_collisions": 20000}})
    with pytest.raises(ConfigError) as exc:
        host.plan(spec)
    assert str(exc.value) == (
        "technique 'qr_embedding' is enabled but does not apply to this model: no table would shrink: its two "
        "tables would have as many rows or more (rows user_id 20000 -> 20001, ad_id 4000 -> 20001) "
        "@ $.models.feed_ctr.techniques.qr_embedding"
    )
    # a feature whose split would not shrink is left whole beside one that is split
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"qr_embedding": {"num_collisions": 3999}})
    rows = {
        c.name: c.num_embeddings for c in host.build(host.plan(spec), spec).members[0].embedding.embedding_bag_configs()
    }
    assert (rows["t_user_id__q"], rows["t_user_id__r"], rows["t_ad_id"]) == (6, 3999, 4000)


def test_split_rows_and_savings():
    assert split_rows(4082, 64) == 128 and saves_rows(4082, 64)
    assert [v for v in range(2, 30) if not saves_rows(v, collisions(v, QRParams()))] == [2, 3, 4, 5]
    assert not saves_rows(4000, 4000) and saves_rows(4000, 3999 // 2)
