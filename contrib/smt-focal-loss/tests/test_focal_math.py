"""The focal loss math against a hand computation, and its place in the
loss chain."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from smt_focal_loss import FocalLossParams, focal_terms

from smt_host import ConfigError, Host, LossInputs
from smt_host.testing import tiny_ecosystem

LOGITS = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [1.5, 0.0]])
LABELS = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])


def hand_focal(logit: float, label: float, gamma: float, alpha=None) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    p_t = p if label == 1.0 else 1.0 - p
    a_t = 1.0 if alpha is None else (alpha if label == 1.0 else 1.0 - alpha)
    return -a_t * (1.0 - p_t) ** gamma * math.log(p_t)


def hand_bce(logit: float, label: float) -> float:
    return hand_focal(logit, label, 0.0)


@pytest.fixture(scope="module")
def host():
    return Host.create()


def spec_with(techniques: dict, weights=(1.0, 0.5)):
    spec = tiny_ecosystem().model("tiny_multi")
    tasks = tuple(attrs.evolve(t, weight=w) for t, w in zip(spec.tasks, weights))
    return attrs.evolve(spec, tasks=tasks, techniques=techniques)


def chain_loss(host, spec) -> torch.Tensor:
    plan = host.plan(spec)
    return host.build(plan, spec).loss(LossInputs(logits=LOGITS, labels=LABELS, batch=None, model=None))


@pytest.mark.parametrize("gamma, alpha", [(2.0, None), (1.0, 0.25), (0.0, None), (3.5, 0.75)])
def test_terms_match_hand_computation(gamma, alpha):
    got = focal_terms(LOGITS, LABELS, gamma, alpha)
    want = torch.tensor(
        [[hand_focal(x, y, gamma, alpha) for x, y in zip(rx, ry)] for rx, ry in zip(LOGITS.tolist(), LABELS.tolist())]
    )
    torch.testing.assert_close(got, want)


def test_golden_values():
    # p = sigmoid(2) = 0.880797, FL = 0.119203^2 * 0.126928 = 0.0018035
    # p = sigmoid(-1) = 0.268941 with label 0: p_t = 0.731059, FL = 0.268941^2 * 0.313262 = 0.0226581
    got = focal_terms(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]]), gamma=2.0)
    torch.testing.assert_close(got, torch.tensor([[0.0018035, 0.0226581]]), atol=1e-6, rtol=1e-4)


def test_chain_total_is_weighted_focal_loss(host):
    spec = spec_with({"focal_loss": {"gamma": 2.0, "alpha": 0.25}})
    total = chain_loss(host, spec)
    weights = (1.0, 0.5)
    want = sum(
        w * sum(hand_focal(LOGITS[b, t].item(), LABELS[b, t].item(), 2.0, 0.25) for b in range(3)) / 3
        for t, w in enumerate(weights)
    )
    torch.testing.assert_close(total, torch.tensor(want), atol=1e-6, rtol=1e-5)


def test_no_bce_added_twice(host):
    # gamma 0 and no alpha is BCE: the chain total must equal the plain bce chain
    with_focal = chain_loss(host, spec_with({"focal_loss": {"gamma": 0.0}}))
    plain = chain_loss(host, spec_with({}))
    want = sum(
        w * sum(hand_bce(LOGITS[b, t].item(), LABELS[b, t].item()) for b in range(3)) / 3
        for t, w in enumerate((1.0, 0.5))
    )
    torch.testing.assert_close(plain, torch.tensor(want), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_focal, plain)


def test_off_by_default_and_after_bce(host):
    plan = host.plan(spec_with({}))
    assert "focal_loss" not in plan.techniques()
    assert [s.reason for s in plan.skipped if s.name == "focal_loss"] == ["off by default"]
    plan = host.plan(spec_with({"focal_loss": True}))
    assert [e.technique for e in plan.entries if e.slot == "loss"] == ["bce", "focal_loss"]


def test_requires_bce(host):
    with pytest.raises(Exception, match="focal_loss.*requires bce"):
        host.plan(spec_with({"focal_loss": True, "bce": False}))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"gamma": -1.0}, "gamma"),
        ({"alpha": 1.5}, "'alpha' must be in (0, 1) or unset, got 1.5"),
        ({"beta": 1.0}, "unknown key 'beta'; valid keys: gamma, alpha"),
    ],
)
def test_bad_params_are_refused(host, params, message):
    with pytest.raises(ConfigError) as err:
        host.plan(spec_with({"focal_loss": params}))
    assert message in str(err.value)
    assert "$.models.tiny_multi.techniques.focal_loss" in str(err.value)


def test_params_defaults():
    assert FocalLossParams() == FocalLossParams(gamma=2.0, alpha=None)
