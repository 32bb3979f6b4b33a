"""A short training run of feed_ctr with the finalmlp branch learns."""

import attrs
import pytest

from smt_host.host import Host
from smt_host.train.trainer import train_model


@pytest.mark.slow
def test_feed_ctr_with_finalmlp_learns(tmp_path):
    host = Host.create()
    eco = host.default_ecosystem()
    eco = attrs.evolve(eco, synthetic=attrs.evolve(eco.synthetic, train_examples=20000, valid_examples=5000, test_examples=5000))
    spec = eco.model("feed_ctr")
    # one epoch of 20k examples at the default batch (1024) is 20 steps, too few
    # for any model (the baseline's test AUC is then ~0.49); batches of 128 give 157
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, batch_size=128))
    result = train_model(host, spec, eco, tmp_path / "feed_ctr")
    assert "finalmlp" in result.plan.techniques()
    assert result.epochs == 1 and result.steps == 157
    metrics = result.test["click"]
    assert metrics["auc"] > 0.6, f"test AUC {metrics['auc']:.4f} after one epoch on 20k examples"
    assert metrics["ne"] < 1.0, f"test NE {metrics['ne']:.4f}: no better than predicting the base rate"
