"""Evaluation metrics for binary tasks.

NE (normalized entropy, He et al. 2014) is the logloss divided by the
entropy of the training base rate: < 1 means the model beats predicting the
base rate. Calibration is mean prediction / mean label (1 is perfect).
"""

from __future__ import annotations

import math

import torch


def logloss(pred: torch.Tensor, label: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``pred`` (N,) against 0/1
    ``label`` (N,), in nats; ``pred`` is clamped to [eps, 1 - eps].

    Example:
        >>> round(logloss(torch.tensor([0.9, 0.2]), torch.tensor([1, 0])), 6)  # -(ln 0.9 + ln 0.8) / 2
        0.164252
    """
    p = pred.double().clamp(eps, 1 - eps)
    y = label.double()
    return float(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())


def entropy(rate: float, eps: float = 1e-7) -> float:
    """Binary entropy (nats) of a base rate: the logloss of predicting it.

    Example:
        >>> entropy(0.5) == math.log(2)
        True
        >>> round(entropy(0.1), 6)
        0.325083
    """
    p = min(max(rate, eps), 1 - eps)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def auc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given average ranks.

    Returns NaN when the labels hold one class only.

    Example:
        >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    pred = pred.double().flatten()
    label = label.flatten() > 0.5
    n_pos = int(label.sum())
    n_neg = label.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(pred)
    sorted_pred = pred[order]
    ranks = torch.empty_like(pred)
    ranks[order] = torch.arange(1, pred.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(sorted_pred, return_inverse=True, return_counts=True)
    if len(uniq) < pred.numel():
        ends = torch.cumsum(counts, 0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[order] = avg[inverse]
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(pred: torch.Tensor, label: torch.Tensor, base_rate: float) -> dict[str, float]:
    """``{"ne", "logloss", "auc", "calibration", "positives", "examples"}`` of one task.

    ``base_rate`` is the training split's positive rate (NE's denominator);
    calibration uses this split's own mean label.

    Example:
        >>> label = torch.tensor([1.0, 0.0, 0.0, 0.0])
        >>> m = binary_metrics(torch.full((4,), 0.25), label, base_rate=0.25)
        >>> round(m["ne"], 6), m["calibration"], m["auc"], m["positives"], m["examples"]
        (1.0, 1.0, 0.5, 1, 4)
    """
    ll = logloss(pred, label)
    mean_label = float(label.double().mean())
    return {
        "ne": ll / entropy(base_rate),
        "logloss": ll,
        "auc": auc(pred, label),
        "calibration": float(pred.double().mean()) / mean_label if mean_label > 0 else float("nan"),
        "positives": int((label > 0.5).sum()),
        "examples": int(label.numel()),
    }
