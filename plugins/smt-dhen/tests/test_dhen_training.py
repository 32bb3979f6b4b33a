"""A short training run of the default ecosystem's feed_ctr with dhen."""

import pytest

from smt_host.testing import train_briefly


@pytest.mark.slow
def test_feed_ctr_learns_with_dhen(tmp_path):
    result = train_briefly("dhen", tmp_path / "feed_ctr")
    auc = result.test["click"]["auc"]
    assert auc > 0.6, f"test AUC {auc:.4f} after one epoch with dhen"
