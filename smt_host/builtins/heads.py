"""Built-in heads: one linear logit per task."""

from __future__ import annotations

import torch
from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.technique import technique


class LinearHead(nn.Module):
    """Shapes: forward: (B, H_t) -> (B,) logits.

    Example:
        >>> LinearHead(4)(torch.zeros(3, 4)).shape
        torch.Size([3])
    """

    def __init__(self, in_dim: int, device=None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, 1, device=device)
        self.out_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


@technique(name="linear_head", slot="heads")
class LinearHeadTechnique:
    """A linear layer to one logit, per task."""

    @hookimpl
    def smt_head(self, ctx: SlotContext) -> nn.Module:
        return LinearHead(ctx.in_dim, device=ctx.device)


@hookimpl
def smt_techniques() -> list:
    return [LinearHeadTechnique()]
