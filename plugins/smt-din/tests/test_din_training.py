"""A short training run of feed_ctr with DIN on its click history learns."""

import pytest

from smt_host.testing import train_briefly


@pytest.mark.slow
def test_feed_ctr_with_din_learns(tmp_path):
    result = train_briefly("din", tmp_path / "feed_ctr")
    assert result.epochs == 1 and result.steps == 157
    assert [(e.slot, e.technique) for e in result.plan.entries if e.slot == "sequence"] == [("sequence", "din")]
    metrics = result.test["click"]
    assert metrics["auc"] > 0.6, f"test AUC {metrics['auc']:.4f} after one epoch on 20k examples"
    assert metrics["logloss"] < 0.2, f"test logloss {metrics['logloss']:.4f}"
