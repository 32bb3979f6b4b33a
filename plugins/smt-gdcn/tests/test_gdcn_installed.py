"""The host sees the plugin installed (the first test of every plugin)."""

from smt_host.testing import listed_techniques


def test_smt_plugins_lists_gdcn():
    techniques = listed_techniques("smt-gdcn")
    assert [t["version"] for t in techniques.values()] == ["0.1.0"]
    (tech,) = techniques.values()
    assert (tech["name"], tech["slot"], tech["plugin"]) == ("gdcn", "interaction", "gdcn")
    assert tech["applies_to"], "gdcn applies to no model of the default ecosystem"
    assert "feed_ctr" in tech["applies_to"]
