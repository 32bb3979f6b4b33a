"""smt technique ``numeric_embedding``: periodic embeddings of dense features.

Yury Gorishniy, Ivan Rubachev, Artem Babenko. "On Embeddings for Numerical
Features in Tabular Deep Learning", NeurIPS 2022 (the "PLR" embedding:
Periodic, then Linear, then ReLU).

Each dense feature x_j gets its own trainable frequencies c_j (k of them,
initialised from N(0, sigma^2)) and its own linear layer::

    v_j = [sin(2 pi c_j x_j), cos(2 pi c_j x_j)]     (B, 2k)
    e_j = ReLU(W_j v_j + b_j)                        (B, d)
    out = ReLU(W [e_1, ..., e_Nd] + b)               (B, D)

The last line combines the per-feature embeddings into the one (B, D)
"feature" the dense arch contributes to the interaction slot.

Shapes: B batch, Nd dense features, k frequencies, d per-feature width,
D the model's embedding dim.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from smt_host import MLP, FieldValueError, SlotContext, at_least, hookimpl, technique


def _positive(inst, attribute, value) -> None:
    if not value > 0:
        raise FieldValueError(attribute.name, f"must be > 0, got {value!r}")


@attrs.frozen
class NumericEmbeddingParams:
    """Parameters of ``numeric_embedding``.

    Args:
        num_frequencies: k, frequencies per feature (>= 1).
        sigma: standard deviation of the frequencies' initialisation (> 0);
            the paper tunes it per data set. Larger values fit sharper
            functions of the feature.
        feature_dim: d, width of each feature's embedding (>= 1).
    """

    num_frequencies: int = attrs.field(default=16, validator=at_least(1))
    sigma: float = attrs.field(default=0.1, validator=_positive)
    feature_dim: int = attrs.field(default=16, validator=at_least(1))


class PeriodicEmbedding(nn.Module):
    """PLR embeddings of Nd numeric features, combined into one (B, D) vector.

    Args:
        num_dense: Nd.
        out_dim: D.
        num_frequencies: k.
        sigma: init std of the frequencies.
        feature_dim: d.
        device: where to make the parameters.

    Shapes:
        periodic: (B, Nd) -> (B, Nd, 2k)
        embed: (B, Nd) -> (B, Nd, d)
        forward: (B, Nd) -> (B, D)

    Example:
        >>> m = PeriodicEmbedding(3, 8, num_frequencies=4, sigma=1.0, feature_dim=5)
        >>> m(torch.zeros(2, 3)).shape
        torch.Size([2, 8])
        >>> m.periodic(torch.zeros(2, 3))[0, 0].tolist() == [0.0] * 4 + [1.0] * 4  # sin(0), cos(0)
        True
    """

    def __init__(
        self,
        num_dense: int,
        out_dim: int,
        *,
        num_frequencies: int = 16,
        sigma: float = 0.1,
        feature_dim: int = 16,
        device=None,
    ) -> None:
        super().__init__()
        if num_dense < 1 or out_dim < 1 or num_frequencies < 1 or feature_dim < 1 or not sigma > 0:
            raise ValueError(
                f"PeriodicEmbedding needs num_dense, out_dim, num_frequencies, feature_dim >= 1 and sigma > 0, "
                f"got {num_dense}, {out_dim}, {num_frequencies}, {feature_dim}, {sigma}"
            )
        self.frequencies = nn.Parameter(torch.randn(num_dense, num_frequencies, device=device) * sigma)  # (Nd, k)
        bound = 1 / math.sqrt(2 * num_frequencies)
        self.weight = nn.Parameter(
            torch.empty(num_dense, 2 * num_frequencies, feature_dim, device=device).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(num_dense, feature_dim, device=device).uniform_(-bound, bound))
        self.combine = MLP(num_dense * feature_dim, [out_dim], device=device)
        self.num_dense = num_dense
        self.out_dim = out_dim

    def periodic(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Nd) -> (B, Nd, 2k): [sin(2 pi c x), cos(2 pi c x)] per feature."""
        if x.dim() != 2 or x.shape[1] != self.num_dense:
            raise ValueError(f"expected dense features (B, {self.num_dense}), got {tuple(x.shape)}")
        angles = 2 * math.pi * self.frequencies.unsqueeze(0) * x.unsqueeze(-1)  # (B, Nd, k)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Nd) -> (B, Nd, d): per-feature linear + ReLU of the periodic features."""
        v = self.periodic(x)
        return torch.relu(torch.einsum("bnk,nkd->bnd", v, self.weight) + self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.embed(x).flatten(1))


def _applies(model) -> bool | str:
    return bool(model.features.dense) or "needs dense features"


@technique(name="numeric_embedding", slot="dense_arch", params=NumericEmbeddingParams, applies=_applies, priority=10)
class NumericEmbedding:
    """Periodic (PLR) embeddings of dense features (Gorishniy et al., NeurIPS 2022)."""

    @hookimpl
    def smt_dense_arch(self, ctx: SlotContext, params: NumericEmbeddingParams) -> nn.Module:
        return PeriodicEmbedding(
            ctx.in_dim,
            ctx.embedding_dim,
            num_frequencies=params.num_frequencies,
            sigma=params.sigma,
            feature_dim=params.feature_dim,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [NumericEmbedding()]
