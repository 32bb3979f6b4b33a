"""The host sees the plugin installed (the first test of every plugin)."""

from smt_host.testing import listed_techniques


def test_smt_plugins_lists_din_in_the_models_with_a_history():
    techniques = listed_techniques("smt-din", load_only=True)  # no other sequence plugin shadows it
    assert [t["version"] for t in techniques.values()] == ["0.1.0"]
    (tech,) = techniques.values()
    assert (tech["name"], tech["slot"], tech["plugin"]) == ("din", "sequence", "din")
    # the default ecosystem's models with a history feature, and no other
    assert sorted(tech["applies_to"]) == ["feed_ctr", "video_ctr"]
    assert sorted(tech["active_in"]) == ["feed_ctr", "video_ctr"]
    assert tech["skipped"]["feed_ctr_cvr"] == "not applicable: no sequence features"
