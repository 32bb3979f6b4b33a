"""Built-in sequence technique: the mean of a history's item embeddings."""

from __future__ import annotations

import torch
from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.spec.schema import SequenceFeature
from smt_host.technique import technique


class MeanPool(nn.Module):
    """The mean of the real items of each history; the candidate is ignored.

    An empty history gives zeros (the mean over no items is taken as 0).

    Args:
        embedding_dim: D.

    Shapes:
        forward: history (B, L, D), mask (B, L) bool, candidate (B, D) -> (B, D)

    Example:
        >>> pool = MeanPool(2)
        >>> history = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [9.0, 9.0]]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> pool(history, mask, torch.zeros(2, 2)).tolist()
        [[2.0, 3.0], [5.0, 6.0]]
    """

    input_format = "padded"

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.out_dim = embedding_dim

    def forward(self, history: torch.Tensor, mask: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        weights = mask.to(history.dtype).unsqueeze(-1)  # (B, L, 1)
        total = (history * weights).sum(dim=1)  # (B, D)
        count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1)
        return total / count  # (B, D)


@technique(name="mean_pool", slot="sequence")
class MeanPoolTechnique:
    """Mean of the history's item embeddings (the candidate is not used)."""

    @hookimpl
    def smt_sequence(self, ctx: SlotContext, feature: SequenceFeature) -> nn.Module:
        return MeanPool(ctx.embedding_dim)


@hookimpl
def smt_techniques() -> list:
    return [MeanPoolTechnique()]
