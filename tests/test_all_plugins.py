"""Every first-party plugin installed together (tox -e all): every default
model plans, trains a few steps and exports, with all the techniques that
apply to it."""

from __future__ import annotations

import attrs
import pytest
import torch
from conftest import FIRST_PARTY_DISTS as DISTS
from conftest import every_plugin_installed

from smt_host.host import Host
from smt_host.model.template import example_batch

pytestmark = every_plugin_installed()


@pytest.fixture(scope="module")
def host():
    return Host.create()


def test_every_plugin_is_loaded(host):
    assert set(DISTS) <= set(host.spm.distributions)


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"])
def test_model_plans_trains_and_exports(host, model, tmp_path):
    from smt_host.train.trainer import train_model

    eco = host.default_ecosystem()
    eco = attrs.evolve(
        eco, synthetic=attrs.evolve(eco.synthetic, train_examples=3000, valid_examples=1000, test_examples=1000)
    )
    spec = eco.model(model)
    plan = host.plan(spec)
    external = {e.dist for e in plan.entries} - {"smt-host"}
    assert external, f"no plugin technique in {model}'s plan"
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, batch_size=256, max_steps_per_epoch=5))
    result = train_model(host, spec, eco, tmp_path / model, plan=plan)
    assert result.steps == 5
    assert all(torch.isfinite(torch.tensor(m["logloss"])) for m in result.test.values())
    trained = host.build(plan, spec).model
    batch = example_batch(spec, 8)
    exported = torch.export.export(trained.eval(), (batch.dense, batch.sparse), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(batch.dense, batch.sparse), trained(batch.dense, batch.sparse))


def test_all_interaction_branches_in_one_model(host):
    spec = host.default_ecosystem().model("feed_ctr")
    branches = [e.technique for e in host.plan(spec).slot("interaction")]
    for name in ("dcnv2", "finalmlp", "wukong", "dhen"):
        if name in host.spm.techniques:
            assert name in branches


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"])
def test_neutral_capacity_lands_within_two_percent(host, model):
    from smt_host.ecosystem.cells import ALL, BASELINE, applicable_techniques, arm_kwargs, neutral_spec

    spec = neutral_spec(host.default_ecosystem().model(model), seed=0)
    base = host.plan(spec, **arm_kwargs(BASELINE)).cost.flops
    from smt_host.errors import CapacityError

    for arm in applicable_techniques(host, spec):
        plan = host.plan(spec, **arm_kwargs(arm))
        assert plan.capacity.mode == "baseline"
        assert abs(plan.cost.flops - base) <= 0.02 * base, (arm, plan.cost.flops, base, plan.capacity)
    # all of them together may not fit the baseline's FLOPs: then a clear error, never a silent model
    try:
        plan = host.plan(spec, **arm_kwargs(ALL))
    except CapacityError as exc:
        assert f"model {model!r} cannot meet its capacity budget" in str(exc)
        assert "Costliest techniques: " in str(exc)
    else:
        assert abs(plan.cost.flops - base) <= 0.02 * base


def test_an_ensemble_of_networks_with_every_technique(host, tmp_path):
    """smt-deep-ensemble (off by default) enabled in a model that has every
    other applicable technique: each member carries them all, calibration
    fits one map per member, and the ensemble exports."""
    from smt_host.train.trainer import train_model

    eco = host.default_ecosystem()
    eco = attrs.evolve(
        eco, synthetic=attrs.evolve(eco.synthetic, train_examples=3000, valid_examples=1000, test_examples=1000)
    )
    spec = eco.model("feed_ctr")
    single = host.plan(spec)
    assert "deep_ensemble" not in single.techniques()
    spec = attrs.evolve(
        spec,
        techniques={**spec.techniques, "deep_ensemble": {"members": 2}},
        training=attrs.evolve(spec.training, epochs=1, batch_size=256, max_steps_per_epoch=5),
    )
    plan = host.plan(spec)
    # the ensemble slot's built-in "single" is shadowed by deep_ensemble; every other technique stays
    assert set(plan.techniques()) == (set(single.techniques()) - {"single"}) | {"deep_ensemble"}
    assert plan.cost.flops == pytest.approx(2 * single.cost.flops, rel=0.01)
    result = train_model(host, spec, eco, tmp_path, plan=plan)
    assert result.steps == 5
    assert len(result.reports["calibration"]["members"]) == 2
    trained = host.build(plan, spec).model
    assert len(trained.members) == 2
    batch = example_batch(spec, 8)
    exported = torch.export.export(trained.eval(), (batch.dense, batch.sparse), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(batch.dense, batch.sparse), trained(batch.dense, batch.sparse))


def test_the_kept_lock_is_current_for_the_host_and_every_first_party_plugin(host):
    """``locks/default.lock.json`` is what ``tox -e main`` trains: it must
    pass every check of ``smt train --locked`` with this host and every
    first-party plugin installed, and have evaluated each of them on every
    model it applies to. A new host version, a plugin version bump, a new
    plugin or a changed default model fails here: make the lock again with
    ``tox -e lock``."""
    from conftest import ROOT

    from smt_host.ecosystem.lock import prepare_locked, read_lock

    path = ROOT / "locks" / "default.lock.json"
    eco = host.default_ecosystem()
    locked = prepare_locked(host, eco, list(eco.models.values()), read_lock(path), where=str(path))
    assert set(locked.models) == set(eco.models)
    assert not locked.unevaluated, f"{path} did not evaluate {locked.unevaluated}: run `tox -e lock`"
