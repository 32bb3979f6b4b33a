"""Tests of dcnv3_tri_bce, the paper's Tri-BCE loss (section 3.4)."""

from __future__ import annotations

import attrs
import pytest
import torch

from smt_host import ConfigError, Host, LossInputs, PluginError, example_batch

pytest_plugins = ["smt_host.testing"]


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create()


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def enable(spec, dcnv3=True, tri=True):
    return attrs.evolve(spec, techniques={**spec.techniques, "dcnv3": dcnv3, "dcnv3_tri_bce": tri})


def bce_by_hand(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))), per task (T,)."""
    p = torch.sigmoid(z.double())
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean(dim=0)


@pytest.mark.parametrize("model", ["feed_ctr", "feed_ctr_cvr"])
def test_the_loss_is_the_papers_tri_bce(host, eco, model):
    """loss = L + max(0, L_E - L) L_E + max(0, L_L - L) L_L per task, L from the model's logits."""
    spec = enable(eco.model(model), dcnv3={"ecn_dropout": 0.0, "lcn_dropout": 0.0})  # two forwards agree
    plan = host.plan(spec)
    assert {"bce", "dcnv3_tri_bce"} <= set(plan.techniques())
    built = host.build(plan, spec)
    net = built.members[0].train()
    batch = example_batch(spec, 32)
    labels = torch.bernoulli(torch.full((32, len(spec.tasks)), 0.4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    logits = net(batch.dense, batch.sparse)
    ecn, lcn = net.branches["dcnv3"].sub_logits
    with torch.no_grad():  # the two networks' logits: their mean is the branch's output
        torch.testing.assert_close(0.5 * (ecn + lcn), net.branches["dcnv3"](net.features(batch.dense, batch.sparse)))
    net.branches["dcnv3"].sub_logits = (ecn, lcn)  # those of the forward that made `logits`
    got = built.loss(LossInputs(logits=logits, labels=labels, batch=batch, model=net))
    w = torch.tensor([t.weight for t in spec.tasks], dtype=torch.float64)
    main, le, ll = bce_by_hand(logits, labels), bce_by_hand(ecn, labels), bce_by_hand(lcn, labels)
    want = (w * (main + torch.relu(le - main) * le + torch.relu(ll - main) * ll)).sum()
    assert (le > main).any() or (ll > main).any(), "the test needs a network worse than the model"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    plain_spec = enable(eco.model(model), tri=False)
    base = host.build(host.plan(plain_spec), plain_spec)
    plain = base.loss(LossInputs(logits=logits, labels=labels, batch=batch, model=net))
    torch.testing.assert_close(plain.double(), (w * main).sum(), rtol=1e-5, atol=1e-6)  # bce alone, for contrast
    got.backward()
    head = net.branches["dcnv3"].ecn_logit.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_off_unless_enabled(host, eco):
    plan = host.plan(eco.model("feed_ctr"))
    assert "dcnv3" in plan.techniques() and "dcnv3_tri_bce" not in plan.techniques()


def test_eval_mode_keeps_no_state():
    """Export and serving run in eval mode: the branch records nothing there."""
    from smt_dcnv3 import DCNv3Branch

    branch = DCNv3Branch(3, 4).eval()
    branch(torch.randn(2, 3, 4))
    assert branch.sub_logits is None
    branch.train()(torch.randn(2, 3, 4))
    assert [tuple(t.shape) for t in branch.sub_logits] == [(2, 1), (2, 1)]


def test_refuses_a_structure_without_the_two_logits(host, eco):
    spec = enable(eco.model("feed_ctr"), dcnv3={"structure": "parallel"})
    with pytest.raises(ConfigError) as info:
        host.build(host.plan(spec), spec)
    assert str(info.value) == (
        "needs dcnv3 with structure = \"logit\" (the two networks' logits), got 'parallel'"
        " @ $.models.feed_ctr.techniques.dcnv3_tri_bce"
    )


def test_requires_dcnv3(host, eco):
    spec = enable(eco.model("feed_ctr"), dcnv3=False)
    with pytest.raises(PluginError) as info:
        host.plan(spec)
    assert str(info.value) == (
        "technique 'dcnv3_tri_bce' (smt-dcnv3 0.1.0) requires dcnv3, which is not active in model 'feed_ctr'"
    )


def test_conformance(smt_check):
    assert smt_check("dcnv3_tri_bce") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]
