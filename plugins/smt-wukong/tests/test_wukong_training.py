"""A short training run of the default ecosystem's feed_ctr with wukong."""

from __future__ import annotations

import attrs
import pytest

from smt_host.host import Host
from smt_host.train.trainer import train_model


@pytest.mark.slow
def test_feed_ctr_learns_with_wukong(tmp_path):
    host = Host.create()
    eco = host.default_ecosystem()
    eco = attrs.evolve(eco, synthetic=attrs.evolve(eco.synthetic, train_examples=20000, valid_examples=5000, test_examples=5000))
    spec = eco.model("feed_ctr")
    # one epoch at batch 128 (157 steps): enough for a working branch to learn,
    # a broken one stays near AUC 0.5
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, batch_size=128))
    result = train_model(host, spec, eco, tmp_path / "feed_ctr")
    assert "wukong" in result.plan.techniques()
    assert result.epochs == 1
    auc = result.test["click"]["auc"]
    assert auc > 0.6, f"test AUC {auc:.4f} after one epoch with wukong"
