"""The synthetic splits: exact sizes, a partition of the stream, and one base rate.

NE divides by the train split's base-rate entropy, so a valid or test split
with another base rate moves NE for reasons that are not the model's: with
contiguous slices of one stream, the default video installs were 0.59% in
train and 0.65% in valid, where predicting valid's own rate scores NE 1.08.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from smt_host.data.synthetic import EVENTS, make_impressions, stratified_split, synthetic_source
from smt_host.spec.loading import load_default_ecosystem
from smt_host.train.metrics import binary_metrics


def test_stratified_split_deals_every_label_pattern_in_proportion():
    g = torch.Generator().manual_seed(3)
    labels = (torch.rand(10_000, 2, generator=g) < torch.tensor([0.05, 0.01])).float()
    sizes = [6000, 1000, 3000]
    rows = stratified_split(labels, sizes)
    assert [len(r) for r in rows] == sizes
    assert torch.equal(torch.sort(torch.cat(rows)).values, torch.arange(10_000))  # a partition
    assert all(torch.equal(r, torch.sort(r).values) for r in rows)  # stream order kept
    pattern = labels[:, 0] + 2 * labels[:, 1]
    for p in pattern.unique():
        total = int((pattern == p).sum())
        for r, size in zip(rows, sizes):
            assert abs(int((pattern[r] == p).sum()) - total * size / 10_000) <= 1, (p, size)
    again = stratified_split(labels, sizes)
    assert all(torch.equal(a, b) for a, b in zip(rows, again))


def test_stratified_split_refuses_sizes_that_do_not_add_up():
    with pytest.raises(ValueError, match=r"split sizes \[2, 2\] sum to 4, not to the 5 rows"):
        stratified_split(torch.zeros(5, 1), [2, 2])


@pytest.mark.parametrize("model", ["video_install", "shop_cvr", "feed_ctr_cvr"])
def test_default_models_splits_share_the_train_base_rate(model):
    eco = load_default_ecosystem()
    eco = attrs.evolve(
        eco, synthetic=attrs.evolve(eco.synthetic, train_examples=50_000, valid_examples=10_000, test_examples=20_000)
    )
    spec = eco.model(model)
    source = synthetic_source(spec, eco)
    train = source.splits["train"].labels.mean(0)  # (T,)
    for split in ("valid", "test"):
        labels = source.splits[split].labels  # (N, T)
        rate = labels.mean(0)
        # within one positive of the split's share
        torch.testing.assert_close(rate, train, atol=1.5 / len(labels), rtol=0)
        for t in range(labels.shape[1]):
            # a constant at the train base rate scores NE 1 on every split (contiguous slices: up to 1.08)
            const = torch.full((len(labels),), float(train[t]))
            ne = binary_metrics(const, labels[:, t], float(train[t]))["ne"]
            assert ne == pytest.approx(1.0, abs=0.01), (split, t)
    # every model of a surface is cut the same way: its rows are the stream's rows
    imp = make_impressions(eco.synthetic.seed, spec.surface, 80_000)
    events = torch.stack([imp.labels[e] for e in EVENTS], dim=1)
    valid_rows = stratified_split(events, [50_000, 10_000, 20_000])[1]
    assert torch.equal(source.splits["valid"].labels[:, 0], imp.labels[spec.tasks[0].label_name][valid_rows])
