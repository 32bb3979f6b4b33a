"""smt technique ``deep_ensemble``: K template networks, one model.

Balaji Lakshminarayanan, Alexander Pritzel, Charles Blundell. "Simple and
Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS
2017. Each member is the whole template network the plan describes (its own
embedding tables, interaction branches, over-arch and heads), built from its
own random initialisation; the host trains every member on its own loss, so
they learn as K separately trained models would, on the same batches::

    logit(x) = (1 / K) * sum_k logit_k(x)        (B, T)

Averaging logits (a normalised geometric mean of the members' odds) rather
than probabilities keeps the model one exportable graph ending in logits,
and scored higher on Frappe_x1's validation split (see README).

It costs K times one network's FLOPs, parameters and table memory, so it is
off by default: a model enables it in its spec
(``[models.X.techniques.deep_ensemble]``). Under a capacity budget the host
shrinks each member's over-arch to fit the K of them.

Shapes: B batch, T tasks, Nd dense features.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host import SlotContext, at_least, hookimpl, technique


@attrs.frozen
class DeepEnsembleParams:
    """Parameters of ``deep_ensemble``.

    Args:
        members: K, the number of template networks (>= 2).
    """

    members: int = attrs.field(default=2, validator=at_least(2))


class DeepEnsemble(nn.Module):
    """The mean of K networks' logits.

    Args:
        members: K modules, each ``forward(dense (B, Nd), sparse KJT) -> (B, T)``.

    Shapes:
        forward(dense (B, Nd), sparse KJT) -> logits (B, T)
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return torch.stack([m(dense, sparse) for m in self.members]).mean(dim=0)


@technique(name="deep_ensemble", slot="ensemble", params=DeepEnsembleParams, default=False)
class DeepEnsembleTechnique:
    """K independently trained template networks, logits averaged (off unless a model enables it)."""

    @hookimpl
    def smt_ensemble(self, ctx: SlotContext, params: DeepEnsembleParams, build: Callable[[], nn.Module]) -> nn.Module:
        return DeepEnsemble([build() for _ in range(params.members)])


@hookimpl
def smt_techniques() -> list:
    return [DeepEnsembleTechnique()]
