"""A short training run of feed_ctr with a transformer encoder on its click history learns."""

import pytest

from smt_host import Host
from smt_host.testing import train_briefly


@pytest.mark.slow
def test_feed_ctr_with_sequence_transformer_learns(tmp_path):
    # smt-din, when installed, outranks the transformer in the sequence slot
    result = train_briefly("sequence_transformer", tmp_path / "feed_ctr", host=Host.create(disable="smt-din"))
    assert result.epochs == 1 and result.steps == 157
    sequence = [(e.slot, e.technique) for e in result.plan.entries if e.slot == "sequence"]
    assert sequence == [("sequence", "sequence_transformer")]
    metrics = result.test["click"]
    assert metrics["auc"] > 0.6, f"test AUC {metrics['auc']:.4f} after one epoch on 20k examples"
    assert metrics["logloss"] < 0.2, f"test logloss {metrics['logloss']:.4f}"
