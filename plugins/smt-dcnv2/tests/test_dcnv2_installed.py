"""The host sees the plugin installed (the first test of every plugin)."""

import json
import subprocess
import sys


def test_smt_plugins_lists_dcnv2():
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins", "--json"],
        capture_output=True, text=True, check=True,
    )
    listing = json.loads(out.stdout)
    dists = {d["distribution"]: d for d in listing["distributions"]}
    assert "smt-dcnv2" in dists, f"smt-dcnv2 not listed; installed: {sorted(dists)}"
    assert dists["smt-dcnv2"]["version"] == "0.1.0"
    (tech,) = dists["smt-dcnv2"]["techniques"]
    assert (tech["name"], tech["slot"], tech["plugin"]) == ("dcnv2", "interaction", "dcnv2")
    assert tech["applies_to"], "dcnv2 applies to no model of the default ecosystem"
    assert "feed_ctr" in tech["applies_to"]
