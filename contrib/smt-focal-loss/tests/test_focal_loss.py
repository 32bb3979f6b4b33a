"""Tests of smt-focal-loss: the host sees it installed, and it passes the smt
conformance kit on every model of the tiny ecosystem it applies to."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys

import smt_focal_loss

pytest_plugins = ["smt_host.testing"]


def test_smt_plugins_lists_it():
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    dists = {d["distribution"]: d for d in json.loads(out.stdout)["distributions"]}
    assert "smt-focal-loss" in dists, f"smt-focal-loss not listed; installed: {sorted(dists)}"
    (tech,) = dists["smt-focal-loss"]["techniques"]
    assert (tech["name"], tech["slot"]) == ("focal_loss", "loss")
    # opt-in: installed, but no model of the default ecosystem uses it until its spec enables it
    assert tech["default"] is False
    assert tech["applies_to"] == []
    assert set(tech["skipped"].values()) == {"off by default"}


def test_conformance(smt_check):
    checked = smt_check("focal_loss")
    assert checked, "checked no model"


def test_docstring_examples_run():
    result = doctest.testmod(smt_focal_loss, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0
