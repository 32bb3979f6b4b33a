"""focal_loss: focal loss (Lin et al. 2017) as an smt loss technique.

Focal loss down-weights well-classified examples so training concentrates on
hard ones (Lin, Goyal, Girshick, He, Dollar, "Focal Loss for Dense Object
Detection", ICCV 2017, arXiv 1708.02002). Per example and task, with
``p = sigmoid(logit)``, ``p_t = p`` for a positive label and ``1 - p`` for a
negative one::

    FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)

where ``alpha_t = alpha`` for positives and ``1 - alpha`` for negatives (no
weighting when ``alpha`` is unset). With ``gamma = 0`` and no ``alpha`` it
is binary cross-entropy.

Slot contract (loss, chain): the built-in ``bce`` runs first and returns the
task-weighted sum of mean BCE with logits. Focal loss *replaces* BCE, but a
loss technique must wrap the loss it receives (regularizers earlier in the
chain live inside it) and must not compute BCE again on top of it. So this
technique adds a correction::

    loss(inputs) + sum_t w_t * (mean_B FL_t - mean_B BCE_t)

which equals the task-weighted focal loss (plus every other term in the
chain) exactly. It declares ``requires=("bce",)`` (the correction assumes
BCE is in the chain; a model that opts out of ``bce`` gets a planning error
rather than a wrong loss) and ``after=("bce",)``.

It is off by default (``default=False``): focal loss trades calibration for
ranking on hard examples, and ads ranking models are used as calibrated
probabilities, so installing it must not change every model. A model opts
in with ``focal_loss = true`` or a parameter table in its spec.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from smt_host import LossFn, LossInputs, SlotContext, at_least, hookimpl, technique


def _alpha_in_open_unit(instance, attribute, value) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"'alpha' must be in (0, 1) or unset, got {value}")


@attrs.frozen
class FocalLossParams:
    """Args:
    gamma: the focusing exponent (>= 0; 0 gives BCE). The paper uses 2.
    alpha: weight of positive examples in (0, 1) (negatives get
        ``1 - alpha``); unset for no class weighting. The paper uses 0.25
        with gamma 2 for detection.
    """

    gamma: float = attrs.field(default=2.0, validator=at_least(0.0))
    alpha: float | None = attrs.field(default=None, validator=_alpha_in_open_unit)


def focal_terms(logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float | None = None) -> torch.Tensor:
    """Element-wise focal loss, numerically stable from the logits.

    Args:
        logits: (B, T).
        labels: (B, T) in {0, 1}.
        gamma: focusing exponent.
        alpha: positive-class weight, or None.

    Shapes:
        (B, T), (B, T) -> (B, T)

    Example:
        >>> x, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
        >>> bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        >>> torch.allclose(focal_terms(x, y, gamma=0.0), bce)
        True
        >>> focal_terms(x, y, gamma=2.0)
        tensor([[0.0018, 0.0227]])
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # -log(p_t)
    p_t = torch.exp(-bce)
    terms = (1.0 - p_t).pow(gamma) * bce if gamma != 0 else bce
    if alpha is not None:
        terms = (alpha * labels + (1.0 - alpha) * (1.0 - labels)) * terms
    return terms


@technique(name="focal_loss", slot="loss", params=FocalLossParams, requires=("bce",), after=("bce",), default=False)
class FocalLoss:
    """Focal loss (Lin et al. 2017) in place of BCE, opt-in per model."""

    @hookimpl
    def smt_loss(self, ctx: SlotContext, params: FocalLossParams, loss: LossFn | None) -> LossFn:
        if loss is None:
            raise ValueError("focal_loss corrects the built-in bce loss, but the loss chain is empty")
        weights = torch.tensor([t.weight for t in ctx.spec.tasks])

        def focal(inputs: LossInputs) -> torch.Tensor:
            bce = F.binary_cross_entropy_with_logits(inputs.logits, inputs.labels, reduction="none").mean(dim=0)
            fl = focal_terms(inputs.logits, inputs.labels, params.gamma, params.alpha).mean(dim=0)  # (T,)
            correction = ((fl - bce) * weights.to(fl.device)).sum()
            return loss(inputs) + correction

        return focal


@hookimpl
def smt_techniques() -> list:
    return [FocalLoss()]
