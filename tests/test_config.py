"""Specs: TOML loading, unknown keys, exact error texts with paths,
technique overrides, opt-out, not-installed techniques."""

from __future__ import annotations

import attrs
import pytest
from conftest import GOOD_PLUGIN

from smt_host.errors import ConfigError, PluginError
from smt_host.host import Host
from smt_host.spec.loading import ecosystem_from_dict, load_default_ecosystem, load_ecosystem


def _eco(**model_changes):
    model = {
        "surface": "feed",
        "tasks": [{"name": "click"}],
        "features": {
            "sparse": [
                {"name": "user_id", "vocab_size": 20000},
                {"name": "ad_id", "vocab_size": 4000},
                {"name": "hour", "vocab_size": 24},
                {"name": "device", "vocab_size": 0},
            ]
        },
    }
    model.update(model_changes)
    return {"name": "t", "models": {"feed_ctr": model}}


def test_default_ecosystem_shape():
    eco = load_default_ecosystem()
    assert len(eco.models) >= 5
    assert len({m.surface for m in eco.models.values()}) >= 3
    assert len({t.name for m in eco.models.values() for t in m.tasks}) >= 3
    assert any(len(m.tasks) >= 2 for m in eco.models.values())


def test_validator_message_and_path_are_kept():
    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(_eco(), source="eco.toml")
    assert str(err.value) == "eco.toml: must be >= 1, got 0 @ $.models.feed_ctr.features.sparse[3].vocab_size"


def test_unknown_key_is_refused_with_its_path():
    data = _eco()
    data["models"]["feed_ctr"]["features"]["sparse"][3]["vocab_size"] = 5
    data["models"]["feed_ctr"]["training"] = {"epochs": 2, "lernrate": 0.1}
    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(data)
    assert str(err.value) == (
        "unknown key 'lernrate'; valid keys: epochs, batch_size, lr, embedding_lr, weight_decay, "
        "embedding_weight_decay, seed, patience, lr_decay, early_stop_metric, max_steps_per_epoch, "
        "eval_batch_size, checkpoint_every_steps @ $.models.feed_ctr.training"
    )


def test_several_errors_are_all_reported():
    data = _eco(training={"epochs": 0, "batch_size": "big"})
    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(data)
    assert err.value.errors == [
        "must be >= 1, got 0 @ $.models.feed_ctr.features.sparse[3].vocab_size",
        "must be >= 1, got 0 @ $.models.feed_ctr.training.epochs",
        "expected an integer, got the string 'big' @ $.models.feed_ctr.training.batch_size",
    ]


def test_embedding_dim_validator_path():
    data = _eco()
    data["models"]["feed_ctr"]["features"]["sparse"][3] = {"name": "device", "vocab_size": 5, "embedding_dim": 0}
    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(data)
    assert str(err.value) == "must be >= 1, got 0 @ $.models.feed_ctr.features.sparse[3].embedding_dim"


def test_toml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "eco.toml"
    path.write_text(
        '[models.a]\nsurface = "feed"\ntasks = [{ name = "click" }]\n[models.a.features]\nsparse = [{ name = "user_id", vocab_size = 20000 }]\n[models.a.capacity]\nbudget = "huge"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_ecosystem(path)
    assert (
        str(err.value)
        == f"{path}: must be a positive number of FLOPs or \"baseline\", got 'huge' @ $.models.a.capacity.budget"
    )
    path.write_text("[models.a\n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid TOML: "):
        load_ecosystem(path)


def test_single_model_file(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text(
        '[model]\nname = "solo"\nsurface = "shop"\ntasks = [{ name = "conversion" }]\n[model.features]\nsparse = [{ name = "ad_id", vocab_size = 4000 }]\n'
    )
    eco = load_ecosystem(path)
    assert list(eco.models) == ["solo"] and eco.models["solo"].surface == "shop"


def test_technique_not_installed_is_skipped_naming_the_distribution(no_env, capsys):
    host = Host.create(load="")
    spec = load_default_ecosystem().model("feed_ctr")
    spec = attrs.evolve(spec, techniques={"dcnv2": {"num_layers": 2}, "mmoe": False})
    plan = host.plan(spec)
    reasons = {s.name: (s.dist, s.reason) for s in plan.skipped}
    assert reasons["dcnv2"] == (
        "smt-dcnv2",
        "not installed (pip install smt-dcnv2); its settings at $.models.feed_ctr.techniques.dcnv2 are skipped",
    )
    assert reasons["mmoe"] == (
        "smt-mmoe",
        "not installed (pip install smt-mmoe); its settings at $.models.feed_ctr.techniques.mmoe are skipped",
    )
    assert capsys.readouterr().err.splitlines() == [
        "notice: technique 'dcnv2' (smt-dcnv2) not installed (pip install smt-dcnv2); its settings at "
        "$.models.feed_ctr.techniques.dcnv2 are skipped",
        "notice: technique 'mmoe' (smt-mmoe) not installed (pip install smt-mmoe); its settings at "
        "$.models.feed_ctr.techniques.mmoe are skipped",
    ]
    host.plan(spec)  # the same notice is printed once per host
    assert capsys.readouterr().err == ""


def test_a_typo_gets_a_suggestion(no_env):
    host = Host.create(load="")
    spec = attrs.evolve(load_default_ecosystem().model("feed_ctr"), techniques={"flta": False})
    (skip,) = [s for s in host.plan(spec).skipped if s.name == "flta"]
    assert skip.reason == (
        "not installed (did you mean 'flat'? if not: pip install smt-flta); its settings at "
        "$.models.feed_ctr.techniques.flta are skipped"
    )


def test_disabled_is_told_apart_from_not_installed(fake_dist, no_env, monkeypatch):
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    monkeypatch.setenv("SMT_DISABLE_PLUGINS", "smt-meanpool")
    host = Host.create()
    spec = attrs.evolve(load_default_ecosystem().model("feed_ctr"), techniques={"meanpool": {"width": 4}})
    (skip,) = [s for s in host.plan(spec).skipped if s.name == "meanpool"]
    assert (skip.dist, skip.reason) == (
        "smt-meanpool",
        "disabled by SMT_DISABLE_PLUGINS; its settings at $.models.feed_ctr.techniques.meanpool are skipped",
    )
    required = attrs.evolve(spec, required_plugins=("smt-meanpool>=0.1",))
    with pytest.raises(PluginError) as err:
        host.plan(required)
    assert str(err.value) == (
        "model 'feed_ctr': smt-meanpool>=0.1 is required but disabled by SMT_DISABLE_PLUGINS "
        "@ $.models.feed_ctr.required_plugins"
    )
    monkeypatch.delenv("SMT_DISABLE_PLUGINS")
    assert "meanpool" in Host.create().plan(required).techniques()
    with pytest.raises(PluginError) as err:
        Host.create().plan(attrs.evolve(spec, required_plugins=("smt-meanpool>=0.2",)))
    assert str(err.value) == (
        "model 'feed_ctr': smt-meanpool>=0.2 is required but smt-meanpool 0.1 is installed "
        "@ $.models.feed_ctr.required_plugins"
    )


def test_override_opt_out_and_param_errors(fake_dist, no_env):
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    host = Host.create()
    spec = load_default_ecosystem().model("feed_ctr")
    assert host.plan(spec).slot("interaction")[1].params == {"width": 4}
    plan = host.plan(attrs.evolve(spec, techniques={"meanpool": {"width": 9}}))
    assert plan.slot("interaction")[1].params == {"width": 9} and plan.slot("interaction")[1].out_dim == 9
    plan = host.plan(attrs.evolve(spec, techniques={"meanpool": False}))
    assert [e.technique for e in plan.slot("interaction")] == ["flat"]
    assert ("meanpool", "opted out") in [(s.name, s.reason) for s in plan.skipped]
    with pytest.raises(ConfigError) as err:
        host.plan(attrs.evolve(spec, techniques={"meanpool": {"width": 0}}))
    assert str(err.value) == "must be >= 1, got 0 @ $.models.feed_ctr.techniques.meanpool.width"
    with pytest.raises(ConfigError) as err:
        host.plan(attrs.evolve(spec, techniques={"meanpool": {"widht": 3}}))
    assert str(err.value) == (
        "unknown key 'widht' (did you mean 'width'?); valid keys: width @ $.models.feed_ctr.techniques.meanpool"
    )


def test_required_plugins(tmp_path, no_env):
    from smt_host.errors import PluginError

    path = tmp_path / "eco.toml"
    path.write_text(
        '[plugins]\nrequired = ["smt-dcnv2>=0.1"]\n[models.a]\nsurface = "feed"\ntasks = [{ name = "click" }]\n[models.a.features]\nsparse = [{ name = "user_id", vocab_size = 20000 }]\n'
    )
    with pytest.raises(PluginError) as err:
        Host.create(load="").load_ecosystem(str(path))
    assert str(err.value) == (
        f"{path}: smt-dcnv2>=0.1 is required but not installed (pip install 'smt-dcnv2>=0.1') @ $.plugins.required"
    )
