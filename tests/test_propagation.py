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

pytestmark = pytest.mark.skipif(
    os.environ.get("SMT_PROPAGATION_TESTS") != "1",
    reason="installs and uninstalls plugins in this environment; set SMT_PROPAGATION_TESTS=1 (tox -e host does)",
)


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
