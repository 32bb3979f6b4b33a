"""Propagation, for real: `pip install plugins/<dist>` (not editable) puts
the technique into every applicable model's plan with no spec edited;
`pip uninstall` takes it out. It changes the environment it runs in, so it
runs only where SMT_PROPAGATION_TESTS=1 (tox -e host sets it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.propagation,
    pytest.mark.skipif(
        os.environ.get("SMT_PROPAGATION_TESTS") != "1",
        reason="installs and uninstalls plugins in this environment; set SMT_PROPAGATION_TESTS=1 (tox -e host does)",
    ),
]


def _pip(*args):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _plans():
    env = {k: v for k, v in os.environ.items() if k not in ("SMT_LOAD_PLUGINS", "SMT_DISABLE_PLUGINS")}
    out = subprocess.run([sys.executable, "-m", "smt_host", "plan", "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return {p["model"]: p for p in json.loads(out.stdout)}


def _branch_models(plans, technique):
    return sorted(m for m, p in plans.items() if any(e["technique"] == technique for e in p["entries"]))


ALL_MODELS = ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]


@pytest.mark.parametrize(
    "dist,technique,slot,models",
    [
        ("smt-dcnv2", "dcnv2", "interaction", ALL_MODELS),
        ("smt-mmoe", "mmoe", "task_arch", ["feed_ctr_cvr"]),  # the only multi-task model, and no other
        ("smt-din", "din", "sequence", ["feed_ctr", "video_ctr"]),  # the models with a history, and no other
    ],
)
def test_install_propagates_and_uninstall_removes(dist, technique, slot, models):
    path = ROOT / "plugins" / dist
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    before = _plans()
    assert _branch_models(before, technique) == []
    _pip("install", "--quiet", str(path))
    try:
        after = _plans()
        assert _branch_models(after, technique) == models  # every applicable model, no spec edited
        for model in models:
            plan = after[model]
            entry = next(e for e in plan["entries"] if e["technique"] == technique)
            assert entry["dist"] == dist and entry["slot"] == slot
            assert plan["cost"]["flops"] != before[model]["cost"]["flops"]
        for model in set(after) - set(models):  # the others are untouched
            assert after[model]["entries"] == before[model]["entries"]
    finally:
        _pip("uninstall", "--yes", "--quiet", dist)
    assert _branch_models(_plans(), technique) == []


SPEC_NAMING_DCNV2 = """
[model]
name = "tuned"
surface = "feed"
tasks = [{ name = "click" }]
[model.features]
sparse = [{ name = "user_id", vocab_size = 20000, embedding_dim = 8 }, { name = "ad_id", vocab_size = 4000, embedding_dim = 8 }]
[model.techniques.dcnv2]
num_layers = 2
"""


def _plan_file(path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("SMT_LOAD_PLUGINS", "SMT_DISABLE_PLUGINS")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "smt_host", "plan", str(path), "--json"], capture_output=True, text=True, env=env
    )


def test_a_spec_that_tunes_a_technique_plans_after_uninstall_with_a_notice(tmp_path):
    """The spec tunes dcnv2; installed it is used with those parameters,
    uninstalled the spec still plans (its table skipped, with one notice
    line naming the spec path and the distribution), and with
    required_plugins the absence is an error instead."""
    path = ROOT / "plugins" / "smt-dcnv2"
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    spec = tmp_path / "tuned.toml"
    spec.write_text(SPEC_NAMING_DCNV2)
    _pip("install", "--quiet", str(path))
    try:
        out = _plan_file(spec)
        assert out.returncode == 0, out.stderr
        (entry,) = [e for e in json.loads(out.stdout)["entries"] if e["technique"] == "dcnv2"]
        assert entry["params"]["num_layers"] == 2 and "notice:" not in out.stderr
        disabled = _plan_file(spec, {"SMT_DISABLE_PLUGINS": "smt-dcnv2"})
        assert disabled.returncode == 0, disabled.stderr
        assert (
            "notice: technique 'dcnv2' (smt-dcnv2) disabled by SMT_DISABLE_PLUGINS; its settings at "
            "$.models.tuned.techniques.dcnv2 are skipped"
        ) in disabled.stderr
    finally:
        _pip("uninstall", "--yes", "--quiet", "smt-dcnv2")
    out = _plan_file(spec)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert "dcnv2" not in [e["technique"] for e in plan["entries"]]
    notices = [ln for ln in out.stderr.splitlines() if ln.startswith("notice:")]
    assert notices == [
        "notice: technique 'dcnv2' (smt-dcnv2) not installed (pip install smt-dcnv2); its settings at "
        "$.models.tuned.techniques.dcnv2 are skipped"
    ]
    assert [s["reason"] for s in plan["skipped"] if s["name"] == "dcnv2"] == [notices[0].split(") ", 1)[1]]
    spec.write_text(
        SPEC_NAMING_DCNV2.replace('name = "tuned"', 'name = "tuned"\nrequired_plugins = ["smt-dcnv2>=0.1"]')
    )
    out = _plan_file(spec)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: model 'tuned': smt-dcnv2>=0.1 is required but not installed (pip install 'smt-dcnv2>=0.1') "
        "@ $.models.tuned.required_plugins"
    )
