"""Tests of the smt-numeric-embedding plugin (run with the plugin installed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import attrs
import pytest
import torch
from smt_numeric_embedding import NumericEmbeddingParams, PeriodicEmbedding

from smt_host import ConfigError, Host, LossInputs, example_batch
from smt_host.testing import tiny_ecosystem

pytest_plugins = ["smt_host.testing"]

DIST = "smt-numeric-embedding"
MODELS = ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(load=DIST)


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def test_smt_plugins_lists_the_distribution():
    env = {**os.environ, "SMT_LOAD_PLUGINS": DIST}
    env.pop("SMT_DISABLE_PLUGINS", None)
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    dists = {d["distribution"]: d for d in json.loads(out)["distributions"]}
    assert dists[DIST]["version"] == "0.1.0"
    (t,) = dists[DIST]["techniques"]
    assert (t["name"], t["slot"], t["priority"]) == ("numeric_embedding", "dense_arch", 10)
    assert t["applies_to"] == MODELS  # every default model has dense features
    builtin = {x["name"]: x for d in dists.values() for x in d["techniques"]}["mlp_dense"]
    assert builtin["active_in"] == []
    assert builtin["skipped"]["feed_ctr"] == "shadowed by numeric_embedding"


def test_not_applicable_without_dense_features(host):
    spec = tiny_ecosystem().model("tiny_nodense")
    plan = host.plan(spec)
    assert plan.slot("dense_arch") == []
    assert {s.name: s.reason for s in plan.skipped}[
        "numeric_embedding"
    ] == "not applicable: the model has no dense features"
    from smt_numeric_embedding import _applies

    assert _applies(spec) == "needs dense features"
    assert _applies(tiny_ecosystem().model("tiny_ctr")) is True


def test_plan_and_widths(host, eco):
    spec = eco.model("feed_ctr_cvr")
    plan = host.plan(spec)
    (e,) = plan.slot("dense_arch")
    assert (e.technique, e.out_dim) == ("numeric_embedding", 16)
    assert e.params == {"num_frequencies": 16, "sigma": 0.1, "feature_dim": 16}
    assert e.flops > 0
    model = host.build(plan, spec).members[0]
    assert isinstance(model.dense_arch, PeriodicEmbedding)
    assert model.dense_arch.frequencies.shape == (3, 16)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"num_frequencies": 0},
            "must be >= 1, got 0 @ $.models.feed_ctr.techniques.numeric_embedding.num_frequencies",
        ),
        ({"sigma": 0.0}, "must be > 0, got 0.0 @ $.models.feed_ctr.techniques.numeric_embedding.sigma"),
        ({"feature_dim": -2}, "must be >= 1, got -2 @ $.models.feed_ctr.techniques.numeric_embedding.feature_dim"),
        (
            {"bins": 8},
            "unknown key 'bins'; valid keys: num_frequencies, sigma, feature_dim @ $.models.feed_ctr.techniques.numeric_embedding",
        ),
    ],
)
def test_parameter_validation_names_the_path(eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"numeric_embedding": override})
    with pytest.raises(ConfigError) as exc:
        Host.create().plan(spec)
    assert str(exc.value) == message


def test_periodic_features_golden():
    m = PeriodicEmbedding(2, 4, num_frequencies=2, sigma=1.0, feature_dim=3)
    with torch.no_grad():
        m.frequencies.copy_(torch.tensor([[0.25, 0.5], [1.0, 0.125]]))
    x = torch.tensor([[1.0, 2.0]])
    v = m.periodic(x)
    assert v.shape == (1, 2, 4)
    # feature 0: angles 2 pi * [0.25, 0.5] * 1 = [pi/2, pi]; feature 1: 2 pi * [1, 0.125] * 2 = [4 pi, pi/2]
    want = torch.tensor([[[1.0, 0.0, 0.0, -1.0], [0.0, 1.0, 1.0, 0.0]]])
    torch.testing.assert_close(v, want, atol=1e-6, rtol=0)


def test_each_feature_has_its_own_embedding():
    torch.manual_seed(0)
    m = PeriodicEmbedding(3, 8, num_frequencies=4, sigma=1.0, feature_dim=5)
    x = torch.randn(6, 3)
    y = x.clone()
    y[:, 1] += 0.7
    ex, ey = m.embed(x), m.embed(y)
    assert ex.shape == (6, 3, 5)
    torch.testing.assert_close(ex[:, [0, 2]], ey[:, [0, 2]])
    assert not torch.allclose(ex[:, 1], ey[:, 1])
    # per-feature linear: feature j uses weight[j] only
    torch.testing.assert_close(ex[:, 2], torch.relu(m.periodic(x)[:, 2] @ m.weight[2] + m.bias[2]))
    out = m(x)
    assert out.shape == (6, 8) and (out >= 0).all()


def test_frequency_init_scale():
    torch.manual_seed(0)
    m = PeriodicEmbedding(50, 8, num_frequencies=64, sigma=3.0, feature_dim=2)
    assert abs(m.frequencies.std().item() - 3.0) < 0.15


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="sigma > 0, got 2, 8, 4, 5, 0.0"):
        PeriodicEmbedding(2, 8, num_frequencies=4, sigma=0.0, feature_dim=5)
    m = PeriodicEmbedding(2, 8)
    with pytest.raises(ValueError, match=r"expected dense features \(B, 2\), got \(4, 3\)"):
        m(torch.zeros(4, 3))


def test_build_forward_backward(host, eco):
    spec = eco.model("video_install")
    plan = host.plan(spec)
    model = host.build(plan, spec).members[0]
    batch = example_batch(spec, batch_size=8)
    logits = model(batch.dense, batch.sparse)
    assert logits.shape == (8, 1)
    loss = host.build(plan, spec).loss(LossInputs(logits=logits, labels=torch.ones(8, 1), batch=batch, model=model))
    loss.backward()
    for name, p in model.dense_arch.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.dense_arch.frequencies.grad.abs().sum() > 0


def test_params_defaults():
    assert NumericEmbeddingParams() == NumericEmbeddingParams(num_frequencies=16, sigma=0.1, feature_dim=16)
    assert math.isclose(NumericEmbeddingParams(sigma=2).sigma, 2)


def test_conformance(smt_check):
    assert smt_check("numeric_embedding") == ["tiny_ctr", "tiny_multi"]


def test_docstring_examples_run():
    import doctest

    import smt_numeric_embedding

    result = doctest.testmod(smt_numeric_embedding)
    assert result.attempted > 0 and result.failed == 0
