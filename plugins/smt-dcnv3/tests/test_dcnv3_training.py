"""A short training run of feed_ctr with the dcnv3 branch learns."""

import pytest

from smt_host.testing import train_briefly


@pytest.mark.slow
def test_feed_ctr_with_dcnv3_learns(tmp_path):
    result = train_briefly("dcnv3", tmp_path / "feed_ctr")
    assert result.epochs == 1 and result.steps == 157
    metrics = result.test["click"]
    assert metrics["auc"] > 0.6, f"test AUC {metrics['auc']:.4f} after one epoch on 20k examples"
    assert metrics["ne"] < 1.0, f"test NE {metrics['ne']:.4f}: no better than predicting the base rate"
