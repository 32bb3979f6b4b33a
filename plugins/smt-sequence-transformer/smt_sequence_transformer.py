"""A BST-style transformer encoder over the candidate and a user's history,
as an smt sequence technique.

Paper: Qiwei Chen, Huan Zhao, Wei Li, Pipei Huang, Wenwu Ou. "Behavior
Sequence Transformer for E-commerce Recommendation in Alibaba". DLP-KDD
2019. https://arxiv.org/abs/1905.06874

The tokens are the candidate followed by the history, most recent first,
each with a learnt positional embedding added (section 2.2: BST's position
is the time gap to the candidate; a history without timestamps has the
recency rank, so the candidate is position 0 and the j-th most recent item
position j + 1):

.. math::

    S = [c, h_1, \\dots, h_L] + P \\qquad (B, L + 1, D)

Each of ``layers`` encoder layers (section 2.3, post-norm as the paper and
Vaswani et al.) is

.. math::

    S' = \\mathrm{LayerNorm}(S + \\mathrm{Dropout}(\\mathrm{MH}(S))), \\qquad
    F = \\mathrm{LayerNorm}(S' + \\mathrm{Dropout}(W_2\\,\\mathrm{Dropout}(\\sigma(W_1 S' + b_1)) + b_2))

with ``MH`` the multi-head scaled dot-product self-attention
``softmax(Q K^T / sqrt(D/h)) V`` per head, where no token attends to a
padding item (key-padding mask); ``sigma`` is the paper's LeakyReLU by
default. The candidate token is always a valid key, so an empty history
still gives a finite output (the candidate attends to itself).

BST flattens every output token into its MLP; the sequence slot takes
(B, D) per feature, so the output is the candidate token's
(``output = "candidate"``, the target-attention reading) or the masked
mean of the valid tokens (``"mean"``).

Shapes (B batch, L history length, D embedding dim):
    history (B, L, D), mask (B, L) bool, candidate (B, D) -> (B, D).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from smt_host import FieldValueError, SlotContext, at_least, hookimpl, in_range, one_of, technique

if TYPE_CHECKING:  # pragma: no cover
    from smt_host import SequenceFeature

__all__ = [
    "EncoderLayer",
    "SequenceTransformer",
    "SequenceTransformerEncoder",
    "SequenceTransformerParams",
    "smt_techniques",
]

#: priority in the exclusive sequence slot: below smt-din's (20), above the built-in mean_pool's (0)
PRIORITY = 10

_ACTIVATIONS = {"leaky_relu": F.leaky_relu, "relu": F.relu, "gelu": F.gelu}


@attrs.frozen
class SequenceTransformerParams:
    """Parameters of the ``sequence_transformer`` technique.

    Args:
        layers: encoder layers (the paper's best: 1).
        heads: attention heads; must divide the embedding dim D.
        ff_dim: hidden width of each layer's feed-forward network; None:
            4 D (Vaswani et al.).
        dropout: on the attention weights, after attention and in the
            feed-forward network, in [0, 0.9] (the paper: 0.2).
        activation: of the feed-forward network: ``"leaky_relu"`` (the
            paper), ``"relu"`` or ``"gelu"``.
        output: ``"candidate"`` (the candidate token's output) or
            ``"mean"`` (the mean over the candidate and the real items).

    Example:
        >>> SequenceTransformerParams(layers=2).ff_dim is None
        True
    """

    layers: int = attrs.field(default=1, validator=at_least(1))
    heads: int = attrs.field(default=2, validator=at_least(1))
    ff_dim: int | None = attrs.field(default=None, validator=at_least(1))
    dropout: float = attrs.field(default=0.2, validator=in_range(0.0, 0.9))
    activation: str = attrs.field(default="leaky_relu", validator=one_of(*_ACTIVATIONS))
    output: str = attrs.field(default="candidate", validator=one_of("candidate", "mean"))


class EncoderLayer(nn.Module):
    """One post-norm transformer encoder layer with a key-padding mask.

    Args:
        dim: D, the token width.
        heads: h; must divide D.
        ff_dim: hidden width of the feed-forward network.
        dropout: on the attention weights, after attention, in the
            feed-forward network.
        activation: ``"leaky_relu"``, ``"relu"`` or ``"gelu"``.
        device: where to make the parameters.

    Shapes:
        forward: tokens (B, N, D), valid (B, N) bool (True: a key others
        may attend to; at least one per row) -> (B, N, D)

    Example:
        >>> layer = EncoderLayer(8, heads=2, ff_dim=16)
        >>> layer(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        ff_dim: int,
        dropout: float = 0.0,
        activation: str = "leaky_relu",
        device: Any = None,
    ) -> None:
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"heads must be >= 1 and divide dim, got heads={heads} and dim={dim}")
        if ff_dim < 1:
            raise ValueError(f"ff_dim must be >= 1, got {ff_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, _ACTIVATIONS))}, got {activation!r}")
        self.heads = heads
        self.activation = activation
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.proj = nn.Linear(dim, dim, device=device)
        self.norm1 = nn.LayerNorm(dim, device=device)
        self.ff1 = nn.Linear(dim, ff_dim, device=device)
        self.ff2 = nn.Linear(ff_dim, dim, device=device)
        self.norm2 = nn.LayerNorm(dim, device=device)
        self.dropout = nn.Dropout(dropout)

    def attend(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention ``MH(S)`` (before dropout and the residual).

        Written out rather than ``F.scaled_dot_product_attention``, whose CPU
        kernel the plan's FLOP counter does not see."""
        b, n, d = tokens.shape
        dh = d // self.heads
        q, k, v = self.qkv(tokens).view(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # (B, h, N, D/h) each
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)  # (B, h, N, N)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))  # no query attends to padding
        weights = self.dropout(torch.softmax(scores, dim=-1))  # finite: the candidate key is always valid
        out = torch.matmul(weights, v)  # (B, h, N, D/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.norm1(tokens + self.dropout(self.attend(tokens, valid)))  # (B, N, D)
        ff = self.ff2(self.dropout(_ACTIVATIONS[self.activation](self.ff1(x))))  # (B, N, D)
        return self.norm2(x + self.dropout(ff))


class SequenceTransformerEncoder(nn.Module):
    """BST over ``[candidate, history]`` with recency positions; the output
    is the candidate token's or the mean of the valid tokens.

    Args:
        embedding_dim: D.
        max_length: the longest history (the position table has
            ``max_length + 1`` rows, the candidate's included).
        layers: encoder layers.
        heads: attention heads (divides D).
        ff_dim: feed-forward width; None: 4 D.
        dropout: in the encoder layers.
        activation: of the feed-forward networks.
        output: ``"candidate"`` or ``"mean"``.
        device: where to make the parameters.

    Shapes:
        forward: history (B, L, D), mask (B, L) bool (True: a real item,
        L <= max_length), candidate (B, D) -> (B, D)

    Example:
        >>> _ = torch.manual_seed(0)
        >>> bst = SequenceTransformerEncoder(8, max_length=5, heads=2)
        >>> mask = torch.tensor([[True, True, False], [False, False, False]])
        >>> out = bst(torch.randn(2, 3, 8), mask, torch.randn(2, 8))
        >>> out.shape, bool(out.isfinite().all())
        (torch.Size([2, 8]), True)
    """

    input_format = "padded"

    def __init__(
        self,
        embedding_dim: int,
        *,
        max_length: int,
        layers: int = 1,
        heads: int = 2,
        ff_dim: int | None = None,
        dropout: float = 0.0,
        activation: str = "leaky_relu",
        output: str = "candidate",
        device: Any = None,
    ) -> None:
        super().__init__()
        if max_length < 1 or layers < 1:
            raise ValueError(f"max_length and layers must be >= 1, got {max_length} and {layers}")
        if output not in ("candidate", "mean"):
            raise ValueError(f"output must be 'candidate' or 'mean', got {output!r}")
        self.positions = nn.Embedding(max_length + 1, embedding_dim, device=device)
        nn.init.normal_(self.positions.weight, std=1.0 / math.sqrt(embedding_dim))
        self.layers = nn.ModuleList(
            EncoderLayer(
                embedding_dim,
                heads=heads,
                ff_dim=ff_dim or 4 * embedding_dim,
                dropout=dropout,
                activation=activation,
                device=device,
            )
            for _ in range(layers)
        )
        self.output = output
        self.out_dim = embedding_dim

    def forward(self, history: torch.Tensor, mask: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        b, n = history.shape[0], history.shape[1] + 1
        tokens = torch.cat([candidate.unsqueeze(1), history], dim=1)  # (B, L+1, D)
        tokens = tokens + self.positions.weight[:n].unsqueeze(0)  # rank 0 the candidate, j+1 the j-th most recent
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)  # (B, L+1)
        tokens = torch.where(valid.unsqueeze(-1), tokens, 0.0)  # padding values never reach a layer
        for layer in self.layers:
            tokens = layer(tokens, valid)  # (B, L+1, D)
        if self.output == "candidate":
            return tokens[:, 0]  # (B, D)
        w = valid.unsqueeze(-1).to(tokens.dtype)  # (B, L+1, 1)
        return (tokens * w).sum(1) / w.sum(1)  # (B, D); w.sum >= 1, the candidate


@technique(name="sequence_transformer", slot="sequence", params=SequenceTransformerParams, priority=PRIORITY)
class SequenceTransformer:
    """A BST-style transformer encoder over candidate and history (Chen et al., 2019)."""

    @hookimpl
    def smt_sequence(self, ctx: SlotContext, params: SequenceTransformerParams, feature: SequenceFeature) -> nn.Module:
        if ctx.embedding_dim % params.heads:
            raise FieldValueError("heads", f"must divide the embedding dim D={ctx.embedding_dim}, got {params.heads}")
        return SequenceTransformerEncoder(
            ctx.embedding_dim,
            max_length=feature.max_length,
            layers=params.layers,
            heads=params.heads,
            ff_dim=params.ff_dim,
            dropout=params.dropout,
            activation=params.activation,
            output=params.output,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [SequenceTransformer()]
