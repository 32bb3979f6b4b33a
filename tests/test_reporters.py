"""Reporters (``smt_reporters``): loggers and trackers that receive the
training lifecycle events but are no part of any plan, manifest or
technique list."""

from __future__ import annotations

import json
import types

import attrs
import pytest
from click.testing import CliRunner

from smt_host import PluginError, hookimpl, reporter
from smt_host.host import Host
from smt_host.train import checkpoint as ckpt
from smt_host.train.trainer import train_model

JSONL = '''
import json
from smt_host import hookimpl, reporter


@reporter(name="jsonl")
class Jsonl:
    """Appends every lifecycle event to events.jsonl in the run folder."""

    def _write(self, ctx, params, event, **fields):
        with open(ctx.out_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"event": event, "params": repr(params), **fields}) + "\\n")

    @hookimpl
    def smt_train_start(self, ctx, params):
        self._write(ctx, params, "train_start", resumed=ctx.resumed)

    @hookimpl
    def smt_step_end(self, ctx, params, step, loss):
        self._write(ctx, params, "step_end", step=step, loss=loss)

    @hookimpl
    def smt_eval_end(self, ctx, params, split, epoch, metrics):
        self._write(ctx, params, "eval_end", split=split, epoch=epoch, auc=metrics["click"]["auc"])

    @hookimpl
    def smt_before_test(self, ctx, params):
        self._write(ctx, params, "before_test")

    @hookimpl
    def smt_train_end(self, ctx, params, metrics):
        self._write(ctx, params, "train_end", auc=metrics["click"]["auc"])


@hookimpl
def smt_reporters():
    return [Jsonl()]
'''


@pytest.fixture
def jsonl(fake_dist, no_env):
    fake_dist("smt-jsonl", "0.3", {"jsonl": "jsonl_plugin"}, {"jsonl_plugin": JSONL})


def test_a_plugin_with_only_reporters_loads(jsonl):
    host = Host.create()
    (rec,) = [r for r in host.spm.reporters.values() if r.dist != "smt-host"]
    assert (rec.name, rec.dist, rec.version, rec.plugin) == ("jsonl", "smt-jsonl", "0.3", "jsonl")
    assert rec.info.description == "Appends every lifecycle event to events.jsonl in the run folder."
    assert host.spm.distributions["smt-jsonl"] == "0.3"
    assert all(r.dist == "smt-host" for r in host.spm.techniques.values())
    assert "reporter:jsonl" in [host.spm.pm.get_name(p) for p in host.spm.pm.get_plugins()]


def test_a_reporter_records_every_event_in_order(jsonl, small_eco, tmp_path):
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=2, max_steps_per_epoch=3, patience=5))
    result = train_model(Host.create(), spec, small_eco, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert {e["params"] for e in events} == {"None"}
    assert [(e["event"], e.get("split"), e.get("epoch"), e.get("step")) for e in events] == [
        ("train_start", None, None, None),
        ("step_end", None, None, 1),
        ("step_end", None, None, 2),
        ("step_end", None, None, 3),
        ("eval_end", "valid", 1, None),
        ("step_end", None, None, 4),
        ("step_end", None, None, 5),
        ("step_end", None, None, 6),
        ("eval_end", "valid", 2, None),
        ("before_test", None, None, None),
        ("eval_end", "test", 0, None),
        ("train_end", None, None, None),
    ]
    assert all(isinstance(e["loss"], float) and e["loss"] > 0 for e in events if e["event"] == "step_end")
    assert events[-1]["auc"] == events[-2]["auc"] == result.test["click"]["auc"]
    assert result.test_before_fit is None  # a reporter's smt_before_test is no post-training fit
    assert [e["auc"] for e in events if e.get("split") == "valid"] == [
        h["valid"]["click"]["auc"] for h in result.history
    ]


def test_a_reporter_leaves_no_trace_in_plan_manifest_or_technique_lists(jsonl, small_eco, tmp_path):
    from smt_host.cli.main import cli
    from smt_host.ecosystem.cells import applicable_techniques

    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=2))
    with_it, without = Host.create(), Host.create(disable="smt-jsonl")
    assert "jsonl" in with_it.spm.reporters and "jsonl" not in without.spm.reporters
    plan = with_it.plan(spec)
    assert with_it.plan_dict(plan) == without.plan_dict(without.plan(spec))
    train_model(with_it, spec, small_eco, tmp_path / "run")
    saved = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    for part in ("plan", "manifest", "techniques"):
        assert "jsonl" not in json.dumps(saved[part]), part
    assert "jsonl" not in (tmp_path / "run" / "metrics.json").read_text()
    assert applicable_techniques(with_it, spec) == applicable_techniques(without, spec) == []
    out = CliRunner().invoke(cli, ["plugins", "--json"])
    assert out.exit_code == 0, out.output
    dists = json.loads(out.output)["distributions"]
    listed = {t["name"] for d in dists for t in d["techniques"]}
    assert listed == set(with_it.spm.techniques) and "jsonl" not in listed
    # listed as what it is: a reporter of its distribution, applying to no model
    assert [(d["distribution"], [r["name"] for r in d.get("reporters", [])]) for d in dists if d.get("reporters")] == [
        ("smt-host", sorted(r for r, rec in with_it.spm.reporters.items() if rec.dist == "smt-host")),
        ("smt-jsonl", ["jsonl"]),
    ]


def _module(*reporters: object) -> types.ModuleType:
    module = types.ModuleType("smt_test_reporters")
    module.smt_reporters = hookimpl(lambda: list(reporters))
    return module


@reporter(name="boom")
class Boom:
    @hookimpl
    def smt_step_end(self, step):
        if step == 2:
            raise RuntimeError("tracker offline")


def test_a_failing_reporter_stops_the_run_naming_it(no_env, small_eco, tmp_path):
    host = Host.create(load="", extra=[(_module(Boom()), "boom")])
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=3))
    with pytest.raises(PluginError) as err:
        train_model(host, spec, small_eco, tmp_path / "run")
    assert str(err.value) == "reporter 'boom' (<extra> 0) failed in smt_step_end(): RuntimeError: tracker offline"


def test_a_reporter_implements_lifecycle_hooks_only():
    @reporter(name="sneaky")
    class Sneaky:
        @hookimpl
        def smt_interaction(self, ctx):
            pass

        @hookimpl
        def smt_train_end(self, ctx):
            pass

    with pytest.raises(PluginError, match=r"reporter 'sneaky' implements smt_interaction\(\); a reporter implements"):
        Host.create(load="", extra=[(_module(Sneaky()), "sneaky")])

    @reporter(name="deaf")
    class Deaf:
        pass

    with pytest.raises(PluginError, match="reporter 'deaf' implements no lifecycle hook"):
        Host.create(load="", extra=[(_module(Deaf()), "deaf")])

    with pytest.raises(PluginError, match=r"is not a reporter: decorate its class with @smt_host.reporter"):
        Host.create(load="", extra=[(_module(object()), "plain")])

    with pytest.raises(
        PluginError, match="reporter name 'boom' clashes with the reporter of the same name from <extra>"
    ):
        Host.create(load="", extra=[(_module(Boom()), "a"), (_module(Boom()), "b")])


def test_the_run_folder_records_are_built_in_reporters_that_can_be_blocked(no_env):
    host = Host.create(load="")
    builtin = {n for n, r in host.spm.reporters.items() if r.dist == "smt-host"}
    assert {"run_record", "metrics_log"} <= builtin
    blocked = Host.create(load="", disable="metrics_log,curves")
    assert "metrics_log" not in blocked.spm.reporters and "curves" not in blocked.spm.reporters
    assert "run_record" in blocked.spm.reporters
    assert blocked.spm.disabled_reporters["metrics_log"] == "smt-host"
