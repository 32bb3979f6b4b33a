"""Data sources come from plugins (``smt_data_sources``), the built-in ones
from ``smt_host.builtins.data_sources``: a plugin adds a reader the way it
adds a technique."""

from __future__ import annotations

import pytest

from smt_host.data import open_source
from smt_host.errors import ConfigError, PluginError
from smt_host.host import Host
from smt_host.plugins import HOST_DIST, DataSourceRecord, get_plugin_manager
from smt_host.spec.loading import ecosystem_from_dict
from smt_host.train.trainer import train_model

#: a plugin module that provides only a data source: rows whose click is
#: ``a < 5``, the same for every split (``rows`` is the source's own option)
CONSTANT_PLUGIN = """
import torch
from smt_host import hookimpl
from smt_host.data import InMemorySource, TensorSplit


def constant(model, eco):
    n = int(model.data.options.get("rows", 512))
    keys = tuple(f.name for f in model.features.sparse)
    ids = torch.stack([torch.arange(n) % f.vocab_size for f in model.features.sparse], dim=1)
    labels = (ids[:, :1] < 5).float().expand(n, len(model.tasks)).contiguous()
    split = TensorSplit(dense=torch.zeros(n, 0), ids=ids, keys=keys, labels=labels)
    return InMemorySource(splits={"train": split, "valid": split, "test": split}, task_names=model.task_names)


@hookimpl
def smt_data_sources():
    return {"{name}": constant}
"""


def eco_with(source: str, options: dict | None = None):
    return ecosystem_from_dict(
        {
            "model": {
                "name": "m",
                "tasks": [{"name": "click"}],
                "features": {
                    "sparse": [
                        {"name": "a", "vocab_size": 10, "embedding_dim": 4},
                        {"name": "b", "vocab_size": 7, "embedding_dim": 4},
                    ]
                },
                "arch": {"dense_arch": [8], "over_arch": [8], "task_width": 4},
                "training": {"epochs": 1, "batch_size": 128},
                "data": {"source": source, "options": options or {}},
            }
        },
        source="eco.toml",
    )


def test_builtin_sources_are_declared_by_a_builtin_plugin(no_env):
    spm = get_plugin_manager(load="")
    assert sorted(spm.data_sources) == ["criteo", "csv", "libfm", "parquet", "synthetic"]
    assert all(r.dist == HOST_DIST and r.name == n for n, r in spm.data_sources.items())
    assert not any(r.plugin == "data_sources" for r in spm.techniques.values())


def test_a_plugin_adds_a_source_and_a_model_trains_on_it(fake_dist, no_env, tmp_path):
    fake_dist(
        "smt-constant",
        "0.4",
        {"constant": "constant_source"},
        {"constant_source": CONSTANT_PLUGIN.replace("{name}", "constant")},
    )
    spm = get_plugin_manager()
    record = spm.data_sources["constant"]
    assert (record.name, record.dist, record.version) == ("constant", "smt-constant", "0.4")
    assert "plugins: smt-constant-0.4" in spm.header()
    assert not any(r.dist == "smt-constant" for r in spm.techniques.values())  # it provides data only

    eco = eco_with("constant", {"rows": 300})
    spec = eco.model("m")
    data = open_source(spec, eco, spm.data_sources)
    batch = next(data.batches("train", 64))
    assert batch.sparse.keys() == ["a", "b"] and batch.labels.shape == (64, 1)
    assert (
        sum(len(b) for b in open_source(spec, eco).batches("valid", 128)) == 300
    )  # default: a fresh manager's sources

    host = Host(spm)
    result = train_model(host, spec, eco, tmp_path / "run", plan=host.plan(spec))  # the trainer opens the host's source
    assert result.epochs == 1 and result.steps == 3  # 300 rows / 128
    assert set(result.test) == {"click"}


def test_a_source_name_clash_names_both_distributions(fake_dist, no_env):
    fake_dist("smt-aaa", "0.1", {"aaa": "aaa_source"}, {"aaa_source": CONSTANT_PLUGIN.replace("{name}", "constant")})
    fake_dist("smt-bbb", "0.2", {"bbb": "bbb_source"}, {"bbb_source": CONSTANT_PLUGIN.replace("{name}", "constant")})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value) == "plugin 'bbb' from smt-bbb 0.2: data source 'constant' clashes with the one from smt-aaa"
    assert get_plugin_manager(load="smt-aaa").data_sources["constant"].dist == "smt-aaa"  # one of them: no clash


def test_a_plugin_source_may_not_take_a_builtin_name(fake_dist, no_env):
    fake_dist("smt-csv", "0.1", {"csv2": "csv_source"}, {"csv_source": CONSTANT_PLUGIN.replace("{name}", "csv")})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value) == "plugin 'csv2' from smt-csv 0.1: data source 'csv' clashes with the one from smt-host"


def test_unknown_source_is_a_config_error_with_the_close_names(no_env):
    sources = get_plugin_manager(load="").data_sources
    eco = eco_with("libfn")
    with pytest.raises(ConfigError) as err:
        open_source(eco.model("m"), eco, sources)
    assert err.value.errors == [
        "unknown data source 'libfn' (did you mean 'libfm'?); known: criteo, csv, libfm, parquet, synthetic @ $.models.m.data.source"
    ]
    assert str(err.value).startswith("eco.toml: unknown data source 'libfn'")
    eco = eco_with("warehouse")
    with pytest.raises(ConfigError) as err:
        open_source(eco.model("m"), eco, sources)
    assert err.value.errors == [
        "unknown data source 'warehouse'; known: criteo, csv, libfm, parquet, synthetic @ $.models.m.data.source"
    ]


def test_open_source_calls_the_factory_of_the_given_records():
    eco = eco_with("mine", {"x": 1})
    seen = []

    def factory(model, ecosystem):
        seen.append((model.name, dict(model.data.options), ecosystem is eco))
        return "a source"

    assert (
        open_source(eco.model("m"), eco, {"mine": DataSourceRecord("mine", factory, "smt-mine", "1.0")}) == "a source"
    )
    assert seen == [("m", {"x": 1}, True)]
