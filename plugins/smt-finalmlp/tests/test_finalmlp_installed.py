"""The host sees the plugin installed (the first test of every plugin)."""

import json
import subprocess
import sys


def test_smt_plugins_lists_finalmlp():
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins", "--json"],
        capture_output=True, text=True, check=True,
    )
    listing = json.loads(out.stdout)
    dists = {d["distribution"]: d for d in listing["distributions"]}
    assert "smt-finalmlp" in dists, f"smt-finalmlp not listed; installed: {sorted(dists)}"
    assert dists["smt-finalmlp"]["version"] == "0.1.0"
    (tech,) = dists["smt-finalmlp"]["techniques"]
    assert (tech["name"], tech["slot"], tech["plugin"]) == ("finalmlp", "interaction", "finalmlp")
    assert tech["applies_to"], "finalmlp applies to no model of the default ecosystem"
    assert "feed_ctr" in tech["applies_to"]
