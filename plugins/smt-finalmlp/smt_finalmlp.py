"""FinalMLP: two gated MLP streams fused by multi-head bilinear aggregation,
as an smt interaction branch.

Paper: Kelong Mao, Jieming Zhu, Liangcai Su, Guohao Cai, Yuhao Li, Zhenhua
Dong. "FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction".
AAAI 2023. https://arxiv.org/abs/2304.00902

With ``x`` the flat feature embeddings (N = F*D wide):

* feature gating (section 3.2, "stream-specific feature selection"): each
  stream k has its own gate ``g_k = 2 * sigmoid(MLP_k(x))`` (N wide, 1 at
  zero logits) and reads ``x * g_k``. The paper computes the gate from a
  chosen context (e.g. user or item id embeddings, else a learned vector);
  here the context is the embeddings of the features named in
  ``gate1_context`` / ``gate2_context`` (e.g. user for one stream, item for
  the other, as BARS tunes it on Frappe), or all the flat embeddings when a
  context is left empty;
* two MLP streams (section 3.1): ``o_1 = MLP_1(x * g_1)``,
  ``o_2 = MLP_2(x * g_2)``, of output widths d_1 and d_2;
* multi-head bilinear fusion (section 3.3, eqs. 6-7): ``o_1`` and ``o_2``
  are split into h contiguous heads; head j gives
  ``o_1j^T W_j o_2j`` and the heads are summed, with the linear terms:
  ``z = b + W_1 o_1 + W_2 o_2 + sum_j o_1j^T W_j o_2j``.

The paper's fusion outputs the logit (one unit). With ``to_logits`` the
branch does just that, one logit per task added to the model's logits (a
wide part beside the template's deep over-arch). Otherwise it outputs
``fusion_dim`` units (each W_j is (d_1/h, fusion_dim, d_2/h), as in the
FuxiCTR reference implementation) and the template's over-arch reads them
beside the other branches.

Shapes (B batch, F features, D embedding dim, T tasks):
    (B, F, D) -> (B, fusion_dim), or (B, T) with ``to_logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from smt_host import MLP, FieldValueError, SlotContext, at_least, hookimpl, in_range, technique

__all__ = ["BilinearFusion", "FeatureGate", "FinalMLP", "FinalMLPBranch", "FinalMLPParams", "smt_techniques"]


def _widths(inst: Any, attribute: attrs.Attribute, value: tuple) -> None:
    if not value:
        raise FieldValueError(attribute.name, "must list at least one width, got []")
    for i, w in enumerate(value):
        if w < 1:
            raise FieldValueError(attribute.name, f"every width must be >= 1, got {w!r} at [{i}]")


def _divides_streams(inst: FinalMLPParams, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        return  # at_least(1) reports it
    bad = [
        f"{name}[-1]={widths[-1]}"
        for name, widths in (("stream1_widths", inst.stream1_widths), ("stream2_widths", inst.stream2_widths))
        if widths and widths[-1] % value
    ]
    if bad:
        raise FieldValueError(
            attribute.name,
            f"must divide the output width of both streams, got num_heads={value} and {' and '.join(bad)}",
        )


@attrs.frozen
class FinalMLPParams:
    """Parameters of the ``finalmlp`` technique.

    Args:
        stream1_widths: hidden widths of stream 1 (its last is d_1).
        stream2_widths: hidden widths of stream 2 (its last is d_2). The
            paper pairs a deeper stream with a wider one.
        num_heads: heads h of the bilinear fusion; must divide d_1 and d_2.
        fusion_dim: output width of the branch (``out_dim``); unused with
            ``to_logits``.
        to_logits: the fusion gives one logit per task, added to the
            model's logits, instead of units for the over-arch.
        gating: stream-specific feature gating on (True) or off.
        gate_hidden: hidden width of each gate's MLP.
        gate1_context: names of the features whose embeddings stream 1's
            gate reads; empty: all features (the flat embeddings).
        gate2_context: the same for stream 2's gate.
        dropout: dropout after each stream layer, in [0, 0.9].
        batch_norm: BatchNorm1d between each stream layer and its ReLU.

    Example:
        >>> FinalMLPParams(stream1_widths=(64, 32), stream2_widths=(32,), num_heads=2).num_heads
        2
    """

    stream1_widths: tuple[int, ...] = attrs.field(default=(128, 64), converter=tuple, validator=_widths)
    stream2_widths: tuple[int, ...] = attrs.field(default=(128,), converter=tuple, validator=_widths)
    num_heads: int = attrs.field(default=4, validator=[at_least(1), _divides_streams])
    fusion_dim: int = attrs.field(default=32, validator=at_least(1))
    to_logits: bool = False
    gating: bool = True
    gate_hidden: int = attrs.field(default=64, validator=at_least(1))
    gate1_context: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    gate2_context: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 0.9))
    batch_norm: bool = False


class FeatureGate(nn.Module):
    """Stream-specific feature gate: ``x -> x * 2 sigmoid(MLP(context))``,
    the context being the embeddings of some features (all by default).

    Args:
        num_features: F.
        embedding_dim: D.
        hidden: width of the gate MLP's hidden layer.
        context: indices (into F) of the context features; None: all.
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, F*D)

    Example:
        >>> gate = FeatureGate(3, 2, 4, context=[0])
        >>> gate(torch.ones(5, 3, 2)).shape
        torch.Size([5, 6])
    """

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        hidden: int,
        context: Sequence[int] | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        n = num_features * embedding_dim
        self.context = None if context is None else list(context)
        in_dim = n if self.context is None else len(self.context) * embedding_dim
        self.mlp = MLP(in_dim, [hidden, n], final_activation=False, device=device)
        self.out_dim = n

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(1)
        ctx = x if self.context is None else features[:, self.context].flatten(1)
        return x * (2.0 * torch.sigmoid(self.mlp(ctx)))


class BilinearFusion(nn.Module):
    """Multi-head bilinear fusion of two vectors (FinalMLP eq. 7).

    ``z = b + W_1 o_1 + W_2 o_2 + sum_j o_1j^T W_j o_2j`` where ``o_1j`` and
    ``o_2j`` are the j-th of h contiguous, equal chunks of ``o_1`` and ``o_2``.

    Args:
        dim1: d_1, width of ``o_1``.
        dim2: d_2, width of ``o_2``.
        out_dim: width of ``z``.
        num_heads: h; must divide d_1 and d_2.
        device: where to make the parameters.

    Shapes:
        forward: (B, d_1), (B, d_2) -> (B, out_dim)

    Example:
        >>> fuse = BilinearFusion(4, 6, out_dim=3, num_heads=2)
        >>> fuse(torch.ones(5, 4), torch.ones(5, 6)).shape
        torch.Size([5, 3])
    """

    def __init__(self, dim1: int, dim2: int, *, out_dim: int, num_heads: int = 1, device: Any = None) -> None:
        super().__init__()
        if num_heads < 1 or dim1 % num_heads or dim2 % num_heads:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide dim1={dim1} and dim2={dim2}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        self.num_heads = num_heads
        self.head1, self.head2 = dim1 // num_heads, dim2 // num_heads
        self.linear1 = nn.Linear(dim1, out_dim, device=device)
        self.linear2 = nn.Linear(dim2, out_dim, bias=False, device=device)
        # W_j as (h, d_1/h, out_dim * d_2/h); xavier over the (h d_1/h d_2/h, out) matrix as FuxiCTR does
        weight = torch.empty(num_heads * self.head1 * self.head2, out_dim, device=device)
        nn.init.xavier_normal_(weight)
        self.weight = nn.Parameter(
            weight.view(num_heads, self.head1, self.head2, out_dim)
            .transpose(2, 3)
            .reshape(num_heads, self.head1, out_dim * self.head2)
        )
        self.out_dim = out_dim

    def forward(self, o1: torch.Tensor, o2: torch.Tensor) -> torch.Tensor:
        b = o1.shape[0]
        h1 = o1.view(b, self.num_heads, self.head1).transpose(0, 1)  # (h, B, d1/h)
        h2 = o2.view(b, self.num_heads, self.head2).transpose(0, 1)  # (h, B, d2/h)
        left = torch.bmm(h1, self.weight).view(self.num_heads, b, self.out_dim, self.head2)  # (h, B, out, d2/h)
        pair = torch.matmul(left, h2.unsqueeze(-1)).squeeze(-1)  # (h, B, out)
        return self.linear1(o1) + self.linear2(o2) + pair.sum(0)


class FinalMLPBranch(nn.Module):
    """FinalMLP over the flat feature embeddings.

    Args:
        num_features: F.
        embedding_dim: D.
        stream1_widths: widths of stream 1's layers (Linear + ReLU each).
        stream2_widths: widths of stream 2's layers.
        num_heads: heads of the bilinear fusion (divides both streams' last width).
        fusion_dim: output width.
        to_logits: mark the branch as a wide part (the template adds its
            output, then ``fusion_dim`` = T wide, to the logits).
        gating: stream-specific feature gates on or off.
        gate_hidden: hidden width of each gate.
        gate1_context: indices (into F) of stream 1's gate context; None: all.
        gate2_context: the same for stream 2.
        dropout: dropout after each stream layer.
        batch_norm: BatchNorm1d in the streams.
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, fusion_dim)

    Example:
        >>> _ = torch.manual_seed(0)
        >>> branch = FinalMLPBranch(3, 4, stream1_widths=[8, 4], stream2_widths=[6], num_heads=2, fusion_dim=5)
        >>> branch(torch.randn(7, 3, 4)).shape
        torch.Size([7, 5])
        >>> branch.out_dim
        5
    """

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        *,
        stream1_widths: Sequence[int] = (128, 64),
        stream2_widths: Sequence[int] = (128,),
        num_heads: int = 4,
        fusion_dim: int = 32,
        to_logits: bool = False,
        gating: bool = True,
        gate_hidden: int = 64,
        gate1_context: Sequence[int] | None = None,
        gate2_context: Sequence[int] | None = None,
        dropout: float = 0.0,
        batch_norm: bool = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        if num_features < 1 or embedding_dim < 1:
            raise ValueError(f"num_features and embedding_dim must be >= 1, got {num_features} and {embedding_dim}")
        n = num_features * embedding_dim
        self.gate1 = (
            FeatureGate(num_features, embedding_dim, gate_hidden, gate1_context, device) if gating else nn.Flatten(1)
        )
        self.gate2 = (
            FeatureGate(num_features, embedding_dim, gate_hidden, gate2_context, device) if gating else nn.Flatten(1)
        )
        self.stream1 = MLP(n, list(stream1_widths), dropout=dropout, batch_norm=batch_norm, device=device)
        self.stream2 = MLP(n, list(stream2_widths), dropout=dropout, batch_norm=batch_norm, device=device)
        self.fusion = BilinearFusion(
            self.stream1.out_dim,
            self.stream2.out_dim,
            out_dim=fusion_dim,
            num_heads=num_heads,
            device=device,
        )
        self.out_dim = fusion_dim
        self.to_logits = to_logits

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.stream1(self.gate1(features)), self.stream2(self.gate2(features)))


@technique(name="finalmlp", slot="interaction", params=FinalMLPParams)
class FinalMLP:
    """FinalMLP: two gated MLP streams, bilinear fusion (Mao et al., AAAI 2023)."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: FinalMLPParams) -> nn.Module:
        return FinalMLPBranch(
            ctx.num_features,
            ctx.embedding_dim,
            stream1_widths=params.stream1_widths,
            stream2_widths=params.stream2_widths,
            num_heads=params.num_heads,
            fusion_dim=len(ctx.tasks) if params.to_logits else params.fusion_dim,
            to_logits=params.to_logits,
            gating=params.gating,
            gate_hidden=params.gate_hidden,
            gate1_context=context_indices(ctx, params.gate1_context, "gate1_context"),
            gate2_context=context_indices(ctx, params.gate2_context, "gate2_context"),
            dropout=params.dropout,
            batch_norm=params.batch_norm,
            device=ctx.device,
        )


def context_indices(ctx: SlotContext, names: Sequence[str], field: str) -> list[int] | None:
    """Positions in the (B, F, D) features of the named sparse features
    (the template stacks sparse features in spec order, the dense arch's
    output last); None for an empty list (all features)."""
    if not names:
        return None
    order = [f.name for f in ctx.spec.features.sparse]
    unknown = [n for n in names if n not in order]
    if unknown:
        raise FieldValueError(field, f"names no sparse feature of the model: {unknown}; the model has {order}")
    return [order.index(n) for n in names]


@hookimpl
def smt_techniques() -> list:
    return [FinalMLP()]
