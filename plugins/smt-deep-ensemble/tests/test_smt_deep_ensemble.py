"""Tests of the smt-deep-ensemble plugin (run with the plugin installed)."""

from __future__ import annotations

import attrs
import pytest
import torch
from smt_deep_ensemble import DeepEnsemble
from torch import nn

from smt_host import ConfigError, Host, TemplateModel, example_batch
from smt_host.testing import listed_techniques, saved_checkpoint, train_model

pytest_plugins = ["smt_host.testing"]

DIST = "smt-deep-ensemble"
MODELS = ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(load=DIST)


def enable(spec, **params):
    return attrs.evolve(spec, techniques={**spec.techniques, "deep_ensemble": params or True})


def test_smt_plugins_lists_it_off_by_default():
    (t,) = listed_techniques(DIST, load_only=True).values()
    assert (t["name"], t["slot"], t["version"], t["default"]) == ("deep_ensemble", "ensemble", "0.1.0", False)
    assert t["applies_to"] == [] and t["skipped"] == {m: "off by default" for m in MODELS}


def test_smt_plugins_text_says_how_to_enable_it():
    import os
    import subprocess
    import sys

    env = {**os.environ, "SMT_LOAD_PLUGINS": DIST, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    (row,) = [ln for ln in out.stdout.splitlines() if "deep_ensemble" in ln]
    assert "(off by default: a model enables it in its spec)" in row


def test_conformance(smt_check):
    assert smt_check("deep_ensemble") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_members_parameter(host):
    spec = host.default_ecosystem().model("feed_ctr")
    plan = host.plan(enable(spec, members=3))
    assert plan.slot("ensemble")[0].params == {"members": 3} and plan.widths["members"] == 3
    assert host.plan(enable(spec)).widths["members"] == 2  # the default
    with pytest.raises(ConfigError) as err:
        host.plan(enable(spec, members=1))
    assert str(err.value) == "must be >= 2, got 1 @ $.models.feed_ctr.techniques.deep_ensemble.members"


def test_logits_are_the_members_mean(host):
    spec = enable(host.default_ecosystem().model("feed_ctr_cvr"), members=3)
    model = host.build(host.plan(spec), spec).model.eval()
    assert isinstance(model, DeepEnsemble)
    members = list(model.members)
    assert len(members) == 3 and all(isinstance(m, TemplateModel) for m in members)
    batch = example_batch(spec, 8)
    with torch.no_grad():
        each = [m(batch.dense, batch.sparse) for m in members]
        got = model(batch.dense, batch.sparse)
    assert got.shape == (8, 2)
    torch.testing.assert_close(got, (each[0] + each[1] + each[2]) / 3)
    assert not torch.allclose(each[0], each[1])  # initialised apart


def test_known_values():
    class Const(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = torch.tensor(v)

        def forward(self, dense, sparse):
            return self.v.expand(dense.shape[0], -1)

    ens = DeepEnsemble([Const([1.0, -2.0]), Const([3.0, 4.0])])
    assert ens(torch.zeros(2, 0), None).tolist() == [[2.0, 1.0], [2.0, 1.0]]


def test_a_short_run_learns_and_saves_every_member(host, tmp_path):
    eco = host.default_ecosystem()
    eco = attrs.evolve(
        eco, synthetic=attrs.evolve(eco.synthetic, train_examples=20000, valid_examples=5000, test_examples=5000)
    )
    spec = enable(eco.model("feed_ctr"))
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, batch_size=128))
    result = train_model(host, spec, eco, tmp_path)
    # a broken ensemble (members untrained) stays near 0.5; 5000 test rows (~170 clicks)
    # give an AUC standard error of about 0.02, so 0.57 is 3 of them above chance
    assert result.test["click"]["auc"] > 0.57, result.test
    saved = saved_checkpoint(tmp_path)
    assert {k.split(".")[1] for k in saved["best_model"]} == {"0", "1"}
    assert (
        len(saved["optimizers"]) == len(host.build(result.plan, spec).optimizers) == 2 * 2
    )  # Adam + Adagrad per member


def test_a_capacity_budget_shrinks_every_member(host):
    spec = host.default_ecosystem().model("feed_ctr")
    base = host.plan(spec, builtins_only=True).cost.flops
    spec = enable(attrs.evolve(spec, capacity=attrs.evolve(spec.capacity, budget="baseline")))
    plan = host.plan(spec)
    assert plan.capacity.mode == "baseline" and plan.capacity.scale < 1
    assert abs(plan.cost.flops - base) <= 0.02 * base
    a, b = host.build(plan, spec).members
    assert (
        a.over_arch.out_dim
        == b.over_arch.out_dim
        < host.plan(enable(host.default_ecosystem().model("feed_ctr"))).widths["over_arch"]
    )
