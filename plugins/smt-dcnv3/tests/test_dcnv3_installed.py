"""The host sees the plugin installed (the first test of every plugin)."""

from smt_host.testing import listed_techniques


def test_smt_plugins_lists_dcnv3():
    techniques = listed_techniques("smt-dcnv3")
    assert sorted(techniques) == ["dcnv3", "dcnv3_tri_bce"]
    assert {t["version"] for t in techniques.values()} == {"0.1.0"}
    tech = techniques["dcnv3"]
    assert (tech["name"], tech["slot"], tech["plugin"]) == ("dcnv3", "interaction", "dcnv3")
    assert tech["applies_to"], "dcnv3 applies to no model of the default ecosystem"
    assert "feed_ctr" in tech["applies_to"]
    loss = techniques["dcnv3_tri_bce"]
    assert (loss["slot"], loss["plugin"]) == ("loss", "dcnv3")
