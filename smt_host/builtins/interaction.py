"""Built-in interaction branch: the flat embeddings, optionally with DLRM
pairwise dot products."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.technique import technique


@attrs.frozen
class FlatParams:
    """Args:
    dot_products: also output the F(F-1)/2 pairwise dot products of the
        feature embeddings (DLRM's interaction, Naumov et al. 2019).
    """

    dot_products: bool = False


class FlatInteraction(nn.Module):
    """Keeps the feature embeddings, flattened.

    Args:
        num_features: F.
        embedding_dim: D.
        dot_products: append the upper-triangle pairwise dot products.

    Shapes:
        forward: (B, F, D) -> (B, F*D [+ F(F-1)/2])

    Example:
        >>> m = FlatInteraction(3, 4, dot_products=True)
        >>> m(torch.ones(2, 3, 4)).shape
        torch.Size([2, 15])
    """

    def __init__(self, num_features: int, embedding_dim: int, dot_products: bool = False) -> None:
        super().__init__()
        self.dot_products = dot_products
        rows, cols = torch.triu_indices(num_features, num_features, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = num_features * embedding_dim + (len(rows) if dot_products else 0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(1)
        if not self.dot_products:
            return flat
        gram = torch.bmm(features, features.transpose(1, 2))  # (B, F, F)
        return torch.cat([flat, gram[:, self.rows, self.cols]], dim=1)


@technique(name="flat", slot="interaction", params=FlatParams)
class Flat:
    """The flat feature embeddings (the default branch), optional DLRM dots."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: FlatParams) -> nn.Module:
        return FlatInteraction(ctx.num_features, ctx.embedding_dim, params.dot_products)


@hookimpl
def smt_techniques() -> list:
    return [Flat()]
