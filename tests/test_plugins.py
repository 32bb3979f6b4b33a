"""Plugin loading: entry points from on-disk dist-info fakes, the two
environment filters, order, and the exact text of broken-plugin errors."""

from __future__ import annotations

import pytest
from conftest import GOOD_PLUGIN

from smt_host.errors import CapacityError, ConfigError, PluginError
from smt_host.host import Host
from smt_host.plugins import get_plugin_manager

BUILTIN_ORDER = [
    "embedding_bag",
    "mlp_dense",
    "mean_pool",
    "flat",
    "mlp_over",
    "shared_bottom",
    "linear_head",
    "single",
    "bce",
    "adam_adagrad",
]


def test_builtins_register_first_in_slot_order(no_env):
    spm = get_plugin_manager(load="")
    assert [r.name for r in spm.all_ordered()] == BUILTIN_ORDER
    assert all(r.dist == "smt-host" for r in spm.all_ordered())
    assert spm.header().endswith("plugins: none")


def test_entry_point_from_dist_info_is_loaded(fake_dist, no_env):
    fake_dist("smt-fake", "1.2.3", {"fake": "fake_plugin"}, {"fake_plugin": GOOD_PLUGIN.format(name="meanpool")})
    spm = get_plugin_manager()
    reg = spm.techniques["meanpool"]
    assert (reg.dist, reg.version, reg.plugin, reg.info.slot) == ("smt-fake", "1.2.3", "fake", "interaction")
    assert "plugins: smt-fake-1.2.3" in spm.header()
    eco = Host(spm).default_ecosystem()
    plan = Host(spm).plan(eco.model("feed_ctr"))
    assert [e.technique for e in plan.slot("interaction")] == ["flat", "meanpool"]


def test_load_and_disable_filters(fake_dist, monkeypatch):
    fake_dist("smt-aaa", "0.1", {"aaa": "aaa_plugin"}, {"aaa_plugin": GOOD_PLUGIN.format(name="aaa")})
    fake_dist("smt-bbb", "0.1", {"bbb": "bbb_plugin"}, {"bbb_plugin": GOOD_PLUGIN.format(name="bbb")})

    def external():
        return sorted(n for n, r in get_plugin_manager().techniques.items() if not r.builtin)

    monkeypatch.delenv("SMT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("SMT_DISABLE_PLUGINS", raising=False)
    assert external() == ["aaa", "bbb"]
    monkeypatch.setenv("SMT_LOAD_PLUGINS", "")
    assert external() == []
    monkeypatch.setenv("SMT_LOAD_PLUGINS", "smt-bbb")
    assert external() == ["bbb"]
    monkeypatch.setenv("SMT_LOAD_PLUGINS", "aaa,bbb")  # entry point names work too
    assert external() == ["aaa", "bbb"]
    monkeypatch.delenv("SMT_LOAD_PLUGINS")
    monkeypatch.setenv("SMT_DISABLE_PLUGINS", "smt-aaa")
    assert external() == ["bbb"]


def test_order_does_not_depend_on_install_order(fake_dist, no_env):
    # zzz is installed (written) first, aaa second; order is by name, then constraints
    fake_dist("smt-zzz", "0.1", {"zzz": "zzz_plugin"}, {"zzz_plugin": GOOD_PLUGIN.format(name="zzz")})
    fake_dist("smt-aaa", "0.1", {"aaa": "aaa_plugin"}, {"aaa_plugin": GOOD_PLUGIN.format(name="aaa")})
    spm = get_plugin_manager()
    assert spm.ordered(["zzz", "flat", "aaa"]) == ["flat", "aaa", "zzz"]
    after = GOOD_PLUGIN.format(name="early").replace('slot="interaction",', 'slot="interaction", after=("zzz",),')
    fake_dist("smt-early", "0.1", {"early": "early_plugin"}, {"early_plugin": after})
    spm = get_plugin_manager()
    assert spm.ordered(["zzz", "flat", "aaa", "early"]) == ["flat", "aaa", "zzz", "early"]


def test_import_error_names_the_distribution(fake_dist, no_env):
    fake_dist("smt-broken", "0.3", {"broken": "broken_plugin"}, {"broken_plugin": "import not_a_module_xyz\n"})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value) == (
        "plugin 'broken' from smt-broken 0.3 failed to import (broken_plugin): "
        "ModuleNotFoundError: No module named 'not_a_module_xyz'"
    )


def test_bad_hook_signature_names_the_distribution(fake_dist, no_env):
    bad = GOOD_PLUGIN.format(name="badsig").replace(
        "def smt_interaction(self, ctx, params)", "def smt_interaction(self, ctx, params, extra)"
    )
    fake_dist("smt-badsig", "0.1", {"badsig": "badsig_plugin"}, {"badsig_plugin": bad})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    msg = str(err.value)
    assert msg.startswith("plugin 'badsig' from smt-badsig 0.1: technique 'badsig' has a bad hook: ")
    assert "smt_interaction" in msg and "extra" in msg


def test_misspelled_hook_names_the_distribution(fake_dist, no_env):
    typo = GOOD_PLUGIN.format(name="typo").replace("def smt_interaction(", "def smt_interactoin(")
    fake_dist("smt-typo", "0.1", {"typo": "typo_plugin"}, {"typo_plugin": typo})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value) == (
        "plugin 'typo' from smt-typo 0.1: technique 'typo' declares slot 'interaction' "
        "but implements no smt_interaction() hook"
    )


def test_unknown_hook_is_caught_by_check_pending(fake_dist, no_env):
    extra = GOOD_PLUGIN.format(name="extra") + "\n    @hookimpl\n    def smt_not_a_hook(self):\n        pass\n"
    extra = extra.replace("@hookimpl\ndef smt_techniques", "@hookimpl\ndef smt_techniques")
    src = GOOD_PLUGIN.format(name="extra").replace(
        "@hookimpl\n    def smt_interaction",
        "@hookimpl\n    def smt_not_a_hook(self):\n        pass\n\n    @hookimpl\n    def smt_interaction",
    )
    fake_dist("smt-extra", "0.2", {"extra": "extra_plugin"}, {"extra_plugin": src})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value).startswith("smt-extra 0.2: unknown hook 'smt_not_a_hook' in plugin")


def test_name_clash_is_an_error_naming_both(fake_dist, no_env):
    fake_dist("smt-one", "1.0", {"one": "one_plugin"}, {"one_plugin": GOOD_PLUGIN.format(name="same")})
    fake_dist("smt-two", "2.0", {"two": "two_plugin"}, {"two_plugin": GOOD_PLUGIN.format(name="same")})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value) == (
        "plugin 'two' from smt-two 2.0: technique name 'same' clashes with the technique of the same "
        "name from smt-one 1.0; uninstall one of them"
    )


def test_clash_with_a_builtin_name(fake_dist, no_env):
    fake_dist("smt-flat2", "0.1", {"flat2": "flat2_plugin"}, {"flat2_plugin": GOOD_PLUGIN.format(name="flat")})
    with pytest.raises(
        PluginError, match="technique name 'flat' clashes with the technique of the same name from smt-host"
    ):
        get_plugin_manager()


def test_plugin_without_techniques_hook(fake_dist, no_env):
    fake_dist("smt-empty", "0.1", {"empty": "empty_plugin"}, {"empty_plugin": "x = 1\n"})
    with pytest.raises(PluginError) as err:
        get_plugin_manager()
    assert str(err.value) == (
        "plugin 'empty' from smt-empty 0.1: implements none of smt_techniques(), smt_data_sources(), "
        "smt_reporters(), so it provides nothing"
    )


def test_exact_order_of_hook_calls(no_env):
    host = Host.create(load="")
    calls = []
    host.spm.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, [i.plugin_name for i in impls])), lambda *a: None
    )
    eco = host.default_ecosystem()
    spec = eco.model("feed_ctr_cvr")
    from smt_host.model.resolve import resolve
    from smt_host.model.template import build_loss, build_model, build_optimizers

    res = resolve(spec, host.spm, host.conv)
    model = build_model(spec, res, host.spm)
    build_loss(spec, res, host.spm)
    build_optimizers(spec, res, host.spm, model)
    assert calls == [
        ("smt_ensemble", ["technique:single"]),  # its build() makes the member: the hooks below
        ("smt_embedding_tables", ["technique:embedding_bag"]),
        ("smt_dense_arch", ["technique:mlp_dense"]),
        ("smt_interaction", ["technique:flat"]),
        ("smt_over_arch", ["technique:mlp_over"]),
        ("smt_task_arch", ["technique:shared_bottom"]),
        ("smt_head", ["technique:linear_head"]),
        ("smt_head", ["technique:linear_head"]),
        ("smt_loss", ["technique:bce"]),
        ("smt_optimizers", ["technique:adam_adagrad"]),
    ]


def test_lifecycle_hooks_fire_in_order_for_every_technique(fake_dist, no_env, small_eco, tmp_path):
    src = (
        GOOD_PLUGIN.format(name="watch")
        + """
EVENTS = []

def _record(name):
    def hook(self, ctx, params, **kw):
        EVENTS.append((name, kw.get("split"), kw.get("step")))
    return hook

Mean.smt_train_start = hookimpl(lambda self, ctx: EVENTS.append(("start", None, None)))
Mean.smt_step_end = hookimpl(lambda self, ctx, step: EVENTS.append(("step", None, step)))
Mean.smt_eval_end = hookimpl(lambda self, ctx, split, epoch: EVENTS.append(("eval", split, epoch)))
Mean.smt_before_test = hookimpl(lambda self, ctx: EVENTS.append(("before_test", None, None)))
Mean.smt_train_end = hookimpl(lambda self, ctx: EVENTS.append(("end", None, None)))
"""
    )
    fake_dist("smt-watch", "0.1", {"watch": "watch_plugin"}, {"watch_plugin": src})
    import attrs

    from smt_host.train.trainer import train_model

    host = Host.create()
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=2, max_steps_per_epoch=3, patience=5))
    result = train_model(host, spec, small_eco, tmp_path / "run")
    import watch_plugin

    assert result.test_before_fit == result.test  # the hook fitted nothing here
    assert watch_plugin.EVENTS == [
        ("start", None, None),
        ("step", None, 1),
        ("step", None, 2),
        ("step", None, 3),
        ("eval", "valid", 1),
        ("step", None, 4),
        ("step", None, 5),
        ("step", None, 6),
        ("eval", "valid", 2),
        ("before_test", None, None),
        ("eval", "test", 0),
        ("end", None, None),
    ]


def test_an_exception_inside_a_slot_hook_names_the_technique(fake_dist, no_env):
    src = GOOD_PLUGIN.format(name="raiser").replace(
        "return MeanBranch(ctx.embedding_dim, params.width)", "raise RuntimeError('kernel missing')"
    )
    fake_dist("smt-raiser", "0.2", {"raiser": "raiser_plugin"}, {"raiser_plugin": src})
    host = Host.create()
    with pytest.raises(PluginError) as err:
        host.plan(host.default_ecosystem().model("feed_ctr"))
    assert (
        str(err.value)
        == "technique 'raiser' (smt-raiser 0.2) failed in smt_interaction(): RuntimeError: kernel missing"
    )


@pytest.mark.parametrize(
    "raised, message",
    [
        ("ValueError('width too odd')", "width too odd @ $.models.feed_ctr.techniques.raiser"),
        (
            "FieldValueError('width', 'must be even, got 3')",
            "must be even, got 3 @ $.models.feed_ctr.techniques.raiser.width",
        ),
    ],
)
def test_a_value_error_in_a_slot_hook_gets_the_spec_path(fake_dist, no_env, raised, message):
    """A slot hook that refuses its parameters raises ValueError (or the
    field's FieldValueError); the host adds where in the spec to look."""
    src = GOOD_PLUGIN.format(name="raiser").replace(
        "return MeanBranch(ctx.embedding_dim, params.width)",
        f"from smt_host import FieldValueError\n        raise {raised}",
    )
    fake_dist("smt-raiser", "0.2", {"raiser": "raiser_plugin"}, {"raiser_plugin": src})
    host = Host.create()
    with pytest.raises(ConfigError) as err:
        host.plan(host.default_ecosystem().model("feed_ctr"))
    assert str(err.value) == message


def test_an_smt_error_in_a_hook_passes_unchanged(fake_dist, no_env):
    src = GOOD_PLUGIN.format(name="raiser").replace(
        "return MeanBranch(ctx.embedding_dim, params.width)",
        "from smt_host import CapacityError\n        raise CapacityError('too costly')",
    )
    fake_dist("smt-raiser", "0.2", {"raiser": "raiser_plugin"}, {"raiser_plugin": src})
    host = Host.create()
    with pytest.raises(CapacityError) as err:
        host.plan(host.default_ecosystem().model("feed_ctr"))
    assert str(err.value) == "too costly"


def test_a_string_for_a_list_is_refused():
    from smt_host.errors import ConfigError
    from smt_host.spec.loading import ecosystem_from_dict

    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(
            {
                "models": {
                    "m": {"surface": "feed", "tasks": "click", "features": {"sparse": [{"name": "a", "vocab_size": 3}]}}
                }
            }
        )
    assert str(err.value) == "expected a list, got the string 'click' @ $.models.m.tasks"
