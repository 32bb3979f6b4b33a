"""`smt new-plugin`: the generated distributions work with no edit.

In-process (always): every slot's skeleton is generated, imported from its
folder and registered with ``Host.create(extra=...)``, then passes the
conformance kit. Installed (SMT_PROPAGATION_TESTS=1, it changes the
environment): the generated folder is ``pip install``ed (not editable), its
own tests pass, ``smt plan`` shows the technique in every model, and it is
uninstalled.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from smt_host.authoring import scaffold
from smt_host.cli.main import cli
from smt_host.host import Host
from smt_host.technique import EXCLUSIVE_SLOTS, SLOTS
from smt_host.testing import check_technique
from smt_host.train.trainer import train_model


def _import(folder: Path, module: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module, mod)  # removed again after the test
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------- the command


def test_module_doctests():
    result = doctest.testmod(scaffold, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


def test_cli_generates_the_distribution(tmp_path):
    result = CliRunner().invoke(cli, ["new-plugin", "mask-net", "--slot", "interaction", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "smt-mask-net"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "pyproject.toml",
        "smt_mask_net.py",
        "tests/conftest.py",
        "tests/test_mask_net.py",
    ]
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["name"] == "smt-mask-net"
    assert project["project"]["dependencies"] == ["smt-host>=0.4,<0.5"]
    assert project["project"]["entry-points"]["smt"] == {"mask-net": "smt_mask_net"}
    assert project["tool"]["setuptools"]["py-modules"] == ["smt_mask_net"]
    test = (folder / "tests" / "test_mask_net.py").read_text()
    assert 'smt_check("mask_net")' in test and '"plugins", "--json"' in test
    module = (folder / "smt_mask_net.py").read_text()
    assert '@technique(name="mask_net", slot="interaction", params=MaskNetParams)' in module
    assert "(B, F, D) -> (B, width)" in module


@pytest.mark.parametrize(
    "args, message",
    [
        (["Bad", "--slot", "loss"], "error: invalid plugin name 'Bad': use lower-case letters and digits"),
        (["a--b", "--slot", "loss"], "error: invalid plugin name 'a--b'"),
        (["smt-foo", "--slot", "loss"], "error: invalid plugin name 'smt-foo': give it without the 'smt-' prefix"),
        (["bce", "--slot", "loss"], "error: invalid plugin name 'bce': technique 'bce' is a built-in of smt-host"),
        (["foo", "--slot", "pooling"], f"error: unknown slot 'pooling'; slots are: {', '.join(SLOTS)}"),
        (["foo"], "new-plugin: give exactly one of --slot SLOT (a technique) or --reporter (a logger/tracker)"),
        (["foo", "--slot", "loss", "--reporter"], "new-plugin: give exactly one of --slot SLOT"),
    ],
)
def test_cli_refuses_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["new-plugin", *args, "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_existing_folder(tmp_path):
    (tmp_path / "smt-foo").mkdir()
    result = CliRunner().invoke(cli, ["new-plugin", "foo", "--slot", "loss", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'smt-foo'} already exists" in result.output
    assert list((tmp_path / "smt-foo").iterdir()) == []


def test_cli_help_lists_slots():
    result = CliRunner().invoke(cli, ["new-plugin", "--help"])
    assert result.exit_code == 0
    for slot in SLOTS:
        assert slot in result.output
    assert "priority=10" in result.output


# ------------------------------------------------------ every slot, in-process


@pytest.mark.parametrize("slot", SLOTS)
def test_skeleton_passes_the_kit(slot, tmp_path, monkeypatch):  # one torch thread: the kit's smt_one_thread
    name = f"my_{slot}"
    folder = scaffold.new_plugin(name.replace("_", "-"), slot, tmp_path)
    mod = _import(folder, f"smt_{name}", monkeypatch)
    host = Host.create(load="", extra=[(mod, name.replace("_", "-"))])
    info = host.spm.techniques[name].info
    assert info.slot == slot
    assert info.priority == (10 if slot in EXCLUSIVE_SLOTS else 0)
    assert check_technique(name, host=host)
    # it is active (not shadowed by the built-in) in every model of the default ecosystem
    eco = host.default_ecosystem()
    for spec in eco.models.values():
        if slot == "sequence" and not spec.features.sequence:  # the slot is empty without histories
            assert name not in host.plan(spec).techniques(), f"{name} is in the plan of {spec.name}, which has none"
            continue
        if not info.default:  # off by default (the ensemble skeleton): only where a spec enables it
            assert name not in host.plan(spec).techniques(), f"{name} is in the plan of {spec.name} unasked"
            spec = attrs.evolve(spec, techniques={**spec.techniques, name: True})
        assert name in host.plan(spec).techniques(), f"{name} not in the plan of {spec.name}"
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0


def test_the_sequence_skeleton_is_active_in_the_models_with_histories(tmp_path, monkeypatch):
    folder = scaffold.new_plugin("my-seq", "sequence", tmp_path)
    mod = _import(folder, "smt_my_seq", monkeypatch)
    host = Host.create(load="", extra=[(mod, "my-seq")])
    eco = host.default_ecosystem()
    with_history = sorted(m for m, spec in eco.models.items() if spec.features.sequence)
    assert with_history, "no default model has a history feature"
    assert sorted(m for m, spec in eco.models.items() if "my_seq" in host.plan(spec).techniques()) == with_history


# ------------------------------------------------------ a reporter, in-process


def test_cli_generates_a_reporter(tmp_path):
    result = CliRunner().invoke(cli, ["new-plugin", "tb-logger", "--reporter", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "(smt-tb-logger: reporter 'tb_logger')" in result.output
    folder = tmp_path / "smt-tb-logger"
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["description"] == "tb_logger: an smt reporter (no technique: it enters no plan)"
    assert project["project"]["entry-points"]["smt"] == {"tb-logger": "smt_tb_logger"}
    module = (folder / "smt_tb_logger.py").read_text()
    assert '@reporter(name="tb_logger")' in module and "def smt_reporters()" in module
    assert "@technique" not in module and "smt_techniques" not in module


def test_the_reporter_skeleton_records_a_run_and_enters_no_plan(tmp_path, monkeypatch, small_eco):
    folder = scaffold.new_plugin("tb-logger", "reporter", tmp_path)
    mod = _import(folder, "smt_tb_logger", monkeypatch)
    host = Host.create(load="", extra=[(mod, "tb-logger")])
    assert "tb_logger" in [r.name for r in host.spm.reporters.values()]
    assert "tb_logger" not in host.spm.techniques
    spec = small_eco.model("tiny_ctr")
    assert "tb_logger" not in host.plan(spec).techniques()
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=3))
    train_model(host, spec, small_eco, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "tb_logger.jsonl").read_text().splitlines()]
    assert [(r["event"], r.get("split")) for r in records] == [("eval", "valid"), ("eval", "test"), ("end", None)]
    assert "click" in records[-1]["metrics"]
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0


# ---------------------------------------------------- installed, for real

needs_env = pytest.mark.skipif(
    os.environ.get("SMT_PROPAGATION_TESTS") != "1",
    reason="installs and uninstalls a plugin in this environment; set SMT_PROPAGATION_TESTS=1 (tox -e host does)",
)


def _pip(*args):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("SMT_LOAD_PLUGINS", "SMT_DISABLE_PLUGINS")}


def _plans():
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plan", "--json"], capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 0, out.stderr
    return {p["model"]: p for p in json.loads(out.stdout)}


def _models_with(plans, technique):
    return sorted(m for m, p in plans.items() if any(e["technique"] == technique for e in p["entries"]))


@needs_env
@pytest.mark.propagation
# one slot: each install + test run + plans takes a minute or two on a small
# machine; every slot's skeleton is checked in-process above
@pytest.mark.parametrize("slot", ["interaction"])
def test_generated_plugin_installs_tests_and_propagates(slot, tmp_path):
    name = f"scaffolded-{slot.replace('_', '-')}"
    technique, dist = name.replace("-", "_"), f"smt-{name}"
    folder = scaffold.new_plugin(name, slot, tmp_path)
    assert _models_with(_plans(), technique) == []
    _pip("install", "--quiet", str(folder))
    try:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
            capture_output=True,
            text=True,
            cwd=folder,
            env=_env(),
        )
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert "3 passed" in tests.stdout
        plans = _plans()
        for model, plan in plans.items():
            entries = [e for e in plan["entries"] if e["technique"] == technique]
            assert entries, f"{technique} not in the plan of {model}: {plan['skipped']}"
            assert (entries[0]["slot"], entries[0]["dist"]) == (slot, dist)
    finally:
        _pip("uninstall", "--yes", "--quiet", dist)
    assert _models_with(_plans(), technique) == []
