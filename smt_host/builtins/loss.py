"""Built-in loss: binary cross-entropy with logits, summed over tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smt_host.contexts import LossFn, LossInputs, SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.technique import technique


@technique(name="bce", slot="loss")
class BCE:
    """Sum over tasks of task weight x mean BCE with logits."""

    @hookimpl
    def smt_loss(self, ctx: SlotContext, loss: LossFn | None) -> LossFn:
        weights = torch.tensor([t.weight for t in ctx.spec.tasks])

        def bce(inputs: LossInputs) -> torch.Tensor:
            per_task = F.binary_cross_entropy_with_logits(inputs.logits, inputs.labels, reduction="none").mean(
                dim=0
            )  # (T,)
            total = (per_task * weights.to(per_task.device)).sum()
            return total if loss is None else total + loss(inputs)

        return bce


@hookimpl
def smt_techniques() -> list:
    return [BCE()]
