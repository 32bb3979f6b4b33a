"""The host sees the plugin installed (the first test of every plugin)."""

from smt_host.testing import listed_techniques


def test_smt_plugins_lists_dcnv2():
    techniques = listed_techniques("smt-dcnv2")
    assert [t["version"] for t in techniques.values()] == ["0.2.0"]
    (tech,) = techniques.values()
    assert (tech["name"], tech["slot"], tech["plugin"]) == ("dcnv2", "interaction", "dcnv2")
    assert tech["applies_to"], "dcnv2 applies to no model of the default ecosystem"
    assert "feed_ctr" in tech["applies_to"]
