"""Wukong interaction layers for smt (technique ``wukong``, slot ``interaction``).

Paper: Buyun Zhang, Liang Luo, Yuxin Chen et al., "Wukong: Towards a Scaling
Law for Large-Scale Recommendation", ICML 2024 (Meta), arXiv:2403.02545.

A Wukong network is a stack of identical *Wukong layers* over the feature
embeddings. Layer ``i`` maps ``n_i`` embeddings to ``n_F + n_L``:

* the **Factorization Machine Block** (FMB) takes the pairwise dot products of
  its input embeddings, ``X X^T`` (optionally the low-rank "optimized FM"
  ``X (X^T Y)`` with a learned ``Y`` of shape ``(n, k)``), flattens them,
  applies LayerNorm and an MLP, and reshapes the result into ``n_F`` new
  embeddings; stacking layers raises the interaction order (2, 4, 8, ...);
* the **Linear Compression Block** (LCB) recombines the input embeddings
  linearly into ``n_L`` embeddings (``W_L X``), keeping lower orders alive;
* the two are concatenated, added to the (projected, when the counts
  differ) input, and layer-normalized:
  ``X_{i+1} = LN(concat(FMB(X_i), LCB(X_i)) + residual(X_i))``.

Every layer after the first reads unit-scale embeddings (the previous
layer's LayerNorm). With ``input_norm`` (the default) the first one does
too: ``X_0 = LN(E)`` over D, so the stack behaves the same whatever scale
the embedding tables have (see the README's design notes: at the BARS
recipe's scale, tables from N(0, 1e-4^2) under L2 0.1, the FMB's
LayerNorm is all epsilon and the branch outputs a constant).

The branch outputs the final embeddings, flattened; the template's over-arch
plays the role of the paper's final MLP.

Shapes: B batch, F features, D embedding dim; n_F = ``num_fm_embeddings``,
n_L = ``num_lcb_embeddings``, k = ``fm_rank``::

    (B, F, D) -> [LN over D] -> layer 1 -> (B, n_F + n_L, D) -> ... -> layer L -> (B, (n_F + n_L) * D)

Example:
    >>> import torch
    >>> branch = WukongInteraction(11, 16, WukongParams(num_layers=2))
    >>> branch(torch.randn(4, 11, 16)).shape
    torch.Size([4, 256])
    >>> branch.out_dim
    256
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from smt_host import MLP, SlotContext, at_least, hookimpl, positive_widths, technique

__all__ = [
    "FactorizationMachineBlock",
    "LinearCompressionBlock",
    "Wukong",
    "WukongInteraction",
    "WukongLayer",
    "WukongParams",
]


@attrs.frozen
class WukongParams:
    """Parameters of the ``wukong`` technique (a model spec's
    ``[models.NAME.techniques.wukong]`` table).

    Args:
        num_layers: Wukong layers stacked (>= 1).
        num_fm_embeddings: n_F, embeddings each layer's FMB produces (>= 1).
        num_lcb_embeddings: n_L, embeddings each layer's LCB produces (>= 1).
        fm_rank: k, rank of the FMB's low-rank projection of the feature axis
            (``X (X^T Y)``, Y of shape (n, k)); unset: the full ``X X^T``.
        mlp_widths: hidden widths of the FMB's MLP; its last layer always
            outputs n_F * D. Empty: one linear layer.
        input_norm: LayerNorm (over D) on the embeddings before the first
            layer, so the first layer sees the unit scale every later layer
            sees. False: the raw embeddings (0.1.0's behaviour).
    """

    num_layers: int = attrs.field(default=2, validator=at_least(1))
    num_fm_embeddings: int = attrs.field(default=8, validator=at_least(1))
    num_lcb_embeddings: int = attrs.field(default=8, validator=at_least(1))
    fm_rank: int | None = attrs.field(default=None, validator=at_least(1))
    mlp_widths: tuple[int, ...] = attrs.field(default=(128,), converter=tuple, validator=positive_widths)
    input_norm: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


#: epsilon of the input LayerNorm: far below the variance of the smallest embedding rows the
#: BARS recipe makes (row RMS 1e-4: variance 1e-8), so it normalizes them rather than
#: dividing them by sqrt(eps) as the default 1e-5 would
INPUT_NORM_EPS = 1e-12


def _check_positive(**values: int) -> None:
    bad = {k: v for k, v in values.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError("must be ints >= 1: " + ", ".join(f"{k}={v!r}" for k, v in bad.items()))


class LinearCompressionBlock(nn.Module):
    """LCB: a linear recombination of the feature axis, ``Y = W X``.

    Args:
        num_inputs: n, embeddings in.
        num_outputs: n_L, embeddings out.
        device: where to make the weight.

    Shapes:
        forward: (B, n, D) -> (B, n_L, D), ``Y[b] = weight @ X[b]`` with
        ``weight`` of shape (n_L, n).

    Example:
        >>> lcb = LinearCompressionBlock(3, 2)
        >>> lcb(torch.ones(5, 3, 4)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(self, num_inputs: int, num_outputs: int, *, device: Any = None) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, num_outputs=num_outputs)
        self.weight = nn.Parameter(torch.empty(num_outputs, num_inputs, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear(n, n_L)
        self.num_inputs = num_inputs
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, x)  # (n_L, n) @ (B, n, D) -> (B, n_L, D)


class FactorizationMachineBlock(nn.Module):
    """FMB: pairwise interactions of the embeddings, turned into new embeddings.

    ``FMB(X) = reshape(MLP(LN(flatten(FM(X)))))`` with ``FM(X) = X X^T``, or
    ``X (X^T Y)`` when ``rank`` is set (Y a learned (n, k) matrix; computing
    ``X^T Y`` first costs O(n D k) instead of O(n^2 D)).

    Args:
        num_inputs: n, embeddings in.
        embedding_dim: D.
        num_outputs: n_F, embeddings out.
        rank: k, or None for the full n x n interaction matrix.
        mlp_widths: hidden widths of the MLP (its last layer outputs n_F * D).
        device: where to make the parameters.

    Shapes:
        interaction_matrix: (B, n, D) -> (B, n, n) or (B, n, k)
        forward: (B, n, D) -> (B, n_F, D)

    Example:
        >>> fmb = FactorizationMachineBlock(3, 4, num_outputs=2, rank=None, mlp_widths=[8])
        >>> x = torch.randn(5, 3, 4)
        >>> torch.allclose(fmb.interaction_matrix(x), x @ x.transpose(1, 2))
        True
        >>> fmb(x).shape
        torch.Size([5, 2, 4])
    """

    def __init__(
        self,
        num_inputs: int,
        embedding_dim: int,
        *,
        num_outputs: int,
        rank: int | None = None,
        mlp_widths: Sequence[int] = (),
        device: Any = None,
    ) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, embedding_dim=embedding_dim, num_outputs=num_outputs)
        if rank is not None:
            _check_positive(rank=rank)
            self.projection: nn.Parameter | None = nn.Parameter(
                torch.randn(num_inputs, rank, device=device) / math.sqrt(num_inputs)
            )
        else:
            self.projection = None
        width = num_inputs * (rank if rank is not None else num_inputs)
        self.norm = nn.LayerNorm(width, device=device)
        self.mlp = MLP(width, [*mlp_widths, num_outputs * embedding_dim], final_activation=False, device=device)
        self.num_outputs = num_outputs
        self.embedding_dim = embedding_dim

    def interaction_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``X X^T`` (B, n, n), or ``X (X^T Y)`` (B, n, k) with the projection."""
        if self.projection is None:
            return torch.bmm(x, x.transpose(1, 2))
        return torch.bmm(x, torch.matmul(x.transpose(1, 2), self.projection))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.interaction_matrix(x).flatten(1)
        out = self.mlp(self.norm(flat))
        return out.view(x.shape[0], self.num_outputs, self.embedding_dim)


class WukongLayer(nn.Module):
    """One Wukong layer: ``LN(concat(FMB(X), LCB(X)) + residual(X))``.

    The residual is the identity when n == n_F + n_L, else a
    :class:`LinearCompressionBlock` from n to n_F + n_L embeddings.

    Args:
        num_inputs: n, embeddings in.
        embedding_dim: D.
        num_fm_embeddings: n_F.
        num_lcb_embeddings: n_L.
        rank: k for the FMB (None: full).
        mlp_widths: hidden widths of the FMB's MLP.
        device: where to make the parameters.

    Shapes:
        forward: (B, n, D) -> (B, n_F + n_L, D)

    Example:
        >>> layer = WukongLayer(5, 4, num_fm_embeddings=2, num_lcb_embeddings=3)
        >>> layer(torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 4])
    """

    def __init__(
        self,
        num_inputs: int,
        embedding_dim: int,
        *,
        num_fm_embeddings: int,
        num_lcb_embeddings: int,
        rank: int | None = None,
        mlp_widths: Sequence[int] = (),
        device: Any = None,
    ) -> None:
        super().__init__()
        self.fmb = FactorizationMachineBlock(
            num_inputs,
            embedding_dim,
            num_outputs=num_fm_embeddings,
            rank=rank,
            mlp_widths=mlp_widths,
            device=device,
        )
        self.lcb = LinearCompressionBlock(num_inputs, num_lcb_embeddings, device=device)
        self.num_outputs = num_fm_embeddings + num_lcb_embeddings
        self.residual: nn.Module = (
            nn.Identity()
            if num_inputs == self.num_outputs
            else LinearCompressionBlock(num_inputs, self.num_outputs, device=device)
        )
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.fmb(x), self.lcb(x)], dim=1)
        return self.norm(y + self.residual(x))


class WukongInteraction(nn.Module):
    """The ``wukong`` interaction branch: stacked Wukong layers, flattened.

    Args:
        num_features: F, embeddings in (sparse features plus the dense arch's).
        embedding_dim: D.
        params: a :class:`WukongParams`.
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, out_dim), ``out_dim = (n_F + n_L) * D``;
        ``X_0 = input_norm(features)`` (a LayerNorm over D, or the identity).

    Example:
        >>> branch = WukongInteraction(6, 8, WukongParams(num_layers=3, num_fm_embeddings=4,
        ...                            num_lcb_embeddings=2, fm_rank=3))
        >>> branch(torch.randn(2, 6, 8)).shape
        torch.Size([2, 48])
    """

    def __init__(self, num_features: int, embedding_dim: int, params: WukongParams, *, device: Any = None) -> None:
        super().__init__()
        _check_positive(num_features=num_features, embedding_dim=embedding_dim)
        self.input_norm: nn.Module = (
            nn.LayerNorm(embedding_dim, eps=INPUT_NORM_EPS, device=device) if params.input_norm else nn.Identity()
        )
        layers = []
        n = num_features
        for _ in range(params.num_layers):
            layer = WukongLayer(
                n,
                embedding_dim,
                num_fm_embeddings=params.num_fm_embeddings,
                num_lcb_embeddings=params.num_lcb_embeddings,
                rank=params.fm_rank,
                mlp_widths=params.mlp_widths,
                device=device,
            )
            layers.append(layer)
            n = layer.num_outputs
        self.layers = nn.Sequential(*layers)
        self.num_outputs = n
        self.out_dim = int(n * embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x0 = self.input_norm(features)  # (B, F, D), each embedding at zero mean, unit variance over D
        return self.layers(x0).flatten(1)  # (B, (n_F + n_L) * D)


@technique(name="wukong", slot="interaction", params=WukongParams)
class Wukong:
    """Wukong layers: stacked factorization-machine and linear-compression blocks (ICML 2024)."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: WukongParams) -> nn.Module:
        return WukongInteraction(ctx.num_features, ctx.embedding_dim, params, device=ctx.device)


@hookimpl
def smt_techniques() -> list:
    return [Wukong()]
