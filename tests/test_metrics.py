"""smt_host.train.metrics against values computed by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from smt_host.train.metrics import auc, binary_metrics, entropy, logloss


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def pairwise_auc(pred: list[float], label: list[int]) -> float:
    """AUC by definition: the share of (positive, negative) pairs ranked
    right, a tie counting 1/2."""
    pos = [p for p, y in zip(pred, label) if y]
    neg = [p for p, y in zip(pred, label) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# ----------------------------------------------------------------------- auc


def test_auc_with_a_tie_counts_the_tied_pair_half():
    # positives 0.5, 0.8; negatives 0.5, 0.2. Pairs (pos, neg):
    # (0.5, 0.5) tie 1/2, (0.5, 0.2) 1, (0.8, 0.5) 1, (0.8, 0.2) 1 -> 3.5 / 4
    assert auc(t([0.5, 0.5, 0.2, 0.8]), t([1, 0, 0, 1])) == pytest.approx(0.875, abs=1e-12)


def test_auc_with_ties_across_classes_and_within_a_class():
    # positives 0.3, 0.3, 0.9; negatives 0.3, 0.1.
    # (0.3,0.3) 1/2 twice, (0.3,0.1) 1 twice, (0.9,0.3) 1, (0.9,0.1) 1 -> 5 / 6
    pred, label = [0.3, 0.3, 0.9, 0.3, 0.1], [1, 1, 1, 0, 0]
    assert auc(t(pred), t(label)) == pytest.approx(5 / 6, abs=1e-12)
    assert pairwise_auc(pred, label) == pytest.approx(5 / 6, abs=1e-12)


def test_auc_without_ties():
    # positives 0.35, 0.8; negatives 0.1, 0.4: 3 of 4 pairs ranked right
    assert auc(t([0.1, 0.4, 0.35, 0.8]), t([0, 0, 1, 1])) == pytest.approx(0.75, abs=1e-12)


def test_auc_of_a_perfect_ranking_is_one():
    assert auc(t([0.1, 0.2, 0.7, 0.9]), t([0, 0, 1, 1])) == 1.0


def test_auc_of_a_reversed_ranking_is_zero():
    assert auc(t([0.9, 0.7, 0.2, 0.1]), t([0, 0, 1, 1])) == 0.0


def test_auc_of_a_constant_prediction_is_one_half():
    assert auc(t([0.3] * 6), t([1, 0, 0, 1, 0, 0])) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("label", [[1, 1, 1], [0, 0, 0]])
def test_auc_of_a_single_class_is_nan(label):
    assert math.isnan(auc(t([0.1, 0.5, 0.9]), t(label)))


def test_auc_matches_the_pairwise_definition_on_random_tied_data():
    g = torch.Generator().manual_seed(0)
    pred = (torch.randint(0, 7, (300,), generator=g) / 6).tolist()  # 7 distinct values: many ties
    label = torch.bernoulli(torch.full((300,), 0.3), generator=g).int().tolist()
    assert auc(t(pred), t(label)) == pytest.approx(pairwise_auc(pred, label), abs=1e-12)


def test_auc_depends_only_on_the_ranking():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(200, generator=g)
    label = torch.bernoulli(torch.full((200,), 0.4), generator=g)
    assert auc(torch.logit(pred), label) == pytest.approx(auc(pred, label), abs=1e-12)


def test_auc_flattens_a_column():
    pred, label = t([0.5, 0.5, 0.2, 0.8]), t([1, 0, 0, 1])
    assert auc(pred[:, None], label[:, None]) == pytest.approx(0.875, abs=1e-12)


# ------------------------------------------------------------------- logloss


def test_logloss_of_known_probabilities():
    pred, label = t([0.9, 0.2, 0.6, 0.5]), t([1, 0, 0, 1])
    want = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.5)) / 4
    assert logloss(pred, label) == pytest.approx(want, rel=1e-6)


def test_logloss_is_mean_not_sum():
    one = logloss(t([0.7]), t([1]))
    assert one == pytest.approx(-math.log(0.7), rel=1e-6)
    assert logloss(t([0.7, 0.7, 0.7]), t([1, 1, 1])) == pytest.approx(one, rel=1e-6)


def test_logloss_penalises_the_wrong_side():
    # label 0 with p=0.9 costs -ln(0.1), not -ln(0.9)
    assert logloss(t([0.9]), t([0])) == pytest.approx(-math.log(0.1), rel=1e-5)


def test_logloss_clamps_certain_wrong_predictions():
    # p=0 for a positive is clamped to eps: finite, -ln(eps)
    assert logloss(t([0.0]), t([1])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert logloss(t([1.0]), t([0])) == pytest.approx(-math.log(1e-7), rel=1e-3)


# ------------------------------------------------------------------- entropy


def test_entropy_of_one_half_is_ln_2():
    assert entropy(0.5) == pytest.approx(math.log(2), abs=1e-15)


def test_entropy_of_a_base_rate():
    p = 0.1
    assert entropy(p) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), abs=1e-15)
    assert entropy(0.9) == pytest.approx(entropy(0.1), abs=1e-15)


def test_entropy_of_a_certain_rate_is_clamped_near_zero():
    assert 0 < entropy(0.0) < 1e-5
    assert 0 < entropy(1.0) < 1e-5


# -------------------------------------------------------- ne and calibration


def test_ne_of_the_base_rate_predictor_is_one():
    label = t([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0])
    base_rate = float(label.mean())  # 0.25
    pred = torch.full_like(label, base_rate)
    m = binary_metrics(pred, label, base_rate)
    assert m["ne"] == pytest.approx(1.0, abs=1e-6)
    assert m["logloss"] == pytest.approx(entropy(base_rate), rel=1e-6)


def test_ne_divides_by_the_given_base_rate_not_the_batch_rate():
    label, pred = t([1, 0, 0, 0]), t([0.3, 0.2, 0.1, 0.4])
    m = binary_metrics(pred, label, base_rate=0.1)
    assert m["ne"] == pytest.approx(logloss(pred, label) / entropy(0.1), rel=1e-9)
    assert m["ne"] != pytest.approx(logloss(pred, label) / entropy(0.25), rel=1e-3)


def test_ne_below_one_for_a_model_that_beats_the_base_rate():
    label = t([1, 0, 0, 0] * 5)
    pred = t([0.8, 0.1, 0.1, 0.1] * 5)
    assert binary_metrics(pred, label, 0.25)["ne"] < 1.0


def test_calibration_is_mean_prediction_over_mean_label():
    label = t([1] + [0] * 9)  # mean label 0.1
    pred = torch.full((10,), 0.2)  # mean prediction 0.2
    assert binary_metrics(pred, label, 0.1)["calibration"] == pytest.approx(2.0, rel=1e-6)
    pred = t([0.05, 0.15] * 5)  # mean prediction 0.1
    assert binary_metrics(pred, label, 0.1)["calibration"] == pytest.approx(1.0, rel=1e-6)


def test_calibration_without_positives_is_nan():
    assert math.isnan(binary_metrics(t([0.1, 0.2]), t([0, 0]), 0.1)["calibration"])


# ------------------------------------------------------------ binary_metrics


def test_binary_metrics_keys_and_counts():
    pred, label = t([0.5, 0.5, 0.2, 0.8, 0.3]), t([1, 0, 0, 1, 1])
    m = binary_metrics(pred, label, base_rate=0.4)
    assert set(m) == {"ne", "logloss", "auc", "calibration", "positives", "examples"}
    assert m["positives"] == 3 and isinstance(m["positives"], int)
    assert m["examples"] == 5 and isinstance(m["examples"], int)
    assert m["logloss"] == pytest.approx(logloss(pred, label), rel=1e-12)
    assert m["auc"] == pytest.approx(pairwise_auc(pred.tolist(), label.int().tolist()), abs=1e-12)
    assert m["calibration"] == pytest.approx((2.3 / 5) / (3 / 5), rel=1e-6)
    assert all(isinstance(v, float) for k, v in m.items() if k not in ("positives", "examples"))
