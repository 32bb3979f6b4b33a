"""DIN target attention over a user's history, as an smt sequence technique.

Paper: Guorui Zhou, Xiaoqiang Zhu, Chenru Song, Ying Fan, Han Zhu, Xiao Ma,
Yanghui Yan, Junqi Jin, Han Li, Kun Gai. "Deep Interest Network for
Click-Through Rate Prediction". KDD 2018. https://arxiv.org/abs/1706.06978

With ``h_j`` the embedding of the j-th most recent item of the history and
``c`` the candidate's embedding (the ad being ranked), DIN pools the history
with weights that depend on the candidate (section 4.3, eq. 3):

.. math::

    v_U(c) = \\sum_j a(h_j, c) \\, h_j = \\sum_j w_j h_j

where the *activation unit* ``a`` is a small MLP over the concatenation
``[h_j, c, h_j - c, h_j * c]`` (4D wide; the paper's figure 2 feeds the two
embeddings and their product, the reference code adds the difference),
hidden layers 80 and 40 with PReLU or Dice, and one linear output unit.
The weights are not normalised: "normalization with softmax on the output
of a(.) is abandoned ... to reserve the intensity of user interests"
(section 4.3). ``normalize = "softmax"`` offers the normalised variant.
Padding items get weight 0, so a row with an empty history pools to 0.

Dice (section 4.4, eq. 8-9) is a data-adaptive PReLU:

.. math::

    f(s) = p(s) \\, s + (1 - p(s)) \\, \\alpha s, \\qquad
    p(s) = \\mathrm{sigmoid}\\big((s - E[s]) / \\sqrt{Var[s] + \\epsilon}\\big)

with the mini-batch mean and variance in training (here over the real
items only, never the padding), running averages at inference, no affine
parameters, ``epsilon = 1e-8`` and ``alpha`` learnt per channel (0 at
first, as in the reference code).

Shapes (B batch, L history length, D embedding dim):
    history (B, L, D), mask (B, L) bool, candidate (B, D) -> (B, D).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from smt_host import SlotContext, hookimpl, in_range, one_of, positive_widths, technique

if TYPE_CHECKING:  # pragma: no cover
    from smt_host import SequenceFeature

__all__ = ["DIN", "ActivationUnit", "DINParams", "Dice", "PReLU", "TargetAttention", "smt_techniques"]

#: din's priority in the exclusive sequence slot: above smt-sequence-transformer's (10) and the built-in
#: mean_pool's (0), so with all three installed a history feature gets target attention (README, "Priority")
PRIORITY = 20


@attrs.frozen
class DINParams:
    """Parameters of the ``din`` technique.

    Args:
        hidden: widths of the activation unit's hidden layers (the paper:
            80 and 40); the unit ends in one linear output. ``[]``: a linear
            unit over the 4D input.
        activation: of the hidden layers: ``"dice"`` (the paper's choice),
            ``"prelu"`` or ``"sigmoid"`` (the reference code's attention).
        normalize: ``"none"`` (the paper: raw weights) or ``"softmax"``
            (over the real items of the row).
        dropout: after each hidden activation, in [0, 0.9].

    Example:
        >>> DINParams(hidden=[36]).hidden
        (36,)
    """

    hidden: tuple[int, ...] = attrs.field(default=(80, 40), converter=tuple, validator=positive_widths)
    activation: str = attrs.field(default="dice", validator=one_of("dice", "prelu", "sigmoid"))
    normalize: str = attrs.field(default="none", validator=one_of("none", "softmax"))
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 0.9))


class Dice(nn.Module):
    """Dice activation (DIN eq. 8-9): ``p(s) s + (1 - p(s)) alpha s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``: batch statistics
    (over the entries where ``mask`` is True) in training, running ones in
    eval; no affine parameters; ``alpha`` learnt per channel.

    Args:
        num_features: C, the channels (last dimension).
        eps: added to the variance (the paper: 1e-8).
        momentum: of the running statistics, as in ``BatchNorm1d``.
        device: where to make the parameters.

    Shapes:
        forward: x (..., C), mask (...) bool or None -> (..., C)

    Example:
        >>> dice = Dice(3).eval()
        >>> dice(torch.zeros(2, 4, 3)).shape
        torch.Size([2, 4, 3])
        >>> with torch.no_grad():
        ...     _ = dice.alpha.fill_(1.0)   # alpha = 1: f(s) = s whatever p(s)
        >>> dice(torch.tensor([[-2.0, 0.5, 3.0]])).tolist()
        [[-2.0, 0.5, 3.0]]
    """

    def __init__(self, num_features: int, *, eps: float = 1e-8, momentum: float = 0.1, device: Any = None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features, device=device))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device))
        self.register_buffer("running_var", torch.ones(num_features, device=device))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            flat = x.reshape(-1, x.shape[-1])  # (N, C)
            if mask is None:
                weight = torch.ones(flat.shape[0], 1, dtype=x.dtype, device=x.device)
            else:
                weight = mask.reshape(-1, 1).to(x.dtype)  # (N, 1)
            n = weight.sum()
            mean = (flat * weight).sum(0) / n.clamp_min(1.0)  # (C,)
            var = ((flat - mean) ** 2 * weight).sum(0) / n.clamp_min(1.0)  # (C,), biased as BatchNorm normalises
            with torch.no_grad():  # running statistics: unbiased variance, skipped without two real entries
                m = self.momentum
                keep = n > 1
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.copy_(torch.where(keep, (1 - m) * self.running_mean + m * mean, self.running_mean))
                self.running_var.copy_(torch.where(keep, (1 - m) * self.running_var + m * unbiased, self.running_var))
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return p * x + (1 - p) * self.alpha * x


class PReLU(nn.Module):
    """PReLU over the last dimension (``nn.PReLU`` takes channels at dim 1):
    ``s`` where ``s > 0``, else ``alpha s``, ``alpha`` learnt per channel
    (0.25 at first, as ``nn.PReLU``).

    Args:
        num_features: C, the channels (last dimension).
        device: where to make the parameters.

    Shapes:
        forward: (..., C) -> (..., C)

    Example:
        >>> PReLU(2)(torch.tensor([[-4.0, 3.0]])).tolist()
        [[-1.0, 3.0]]
    """

    def __init__(self, num_features: int, *, device: Any = None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((num_features,), 0.25, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.alpha * x)


def _activation(name: str, width: int, device: Any) -> nn.Module:
    if name == "dice":
        return Dice(width, device=device)
    if name == "prelu":
        return PReLU(width, device=device)
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"activation must be one of 'dice', 'prelu', 'sigmoid', got {name!r}")


class ActivationUnit(nn.Module):
    """DIN's activation unit: an MLP over ``[h, c, h - c, h * c]`` giving one
    score per history item.

    Args:
        embedding_dim: D.
        hidden: hidden widths (each Linear + activation + dropout); then one
            linear output unit.
        activation: ``"dice"``, ``"prelu"`` or ``"sigmoid"``.
        dropout: after each hidden activation.
        device: where to make the parameters.

    Shapes:
        forward: history (B, L, D), candidate (B, D), mask (B, L) bool or None -> (B, L)

    Example:
        >>> unit = ActivationUnit(4, hidden=[8, 4])
        >>> unit(torch.randn(2, 3, 4), torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        dropout: float = 0.0,
        device: Any = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if any(w < 1 for w in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {list(hidden)}")
        prev = 4 * embedding_dim
        self.linears = nn.ModuleList()
        self.activations = nn.ModuleList()
        for w in hidden:
            self.linears.append(nn.Linear(prev, w, device=device))
            self.activations.append(_activation(activation, w, device))
            prev = w
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(prev, 1, device=device)

    def forward(self, history: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c = candidate.unsqueeze(1).expand_as(history)  # (B, L, D)
        x = torch.cat([history, c, history - c, history * c], dim=-1)  # (B, L, 4D)
        for linear, act in zip(self.linears, self.activations):
            x = linear(x)  # (B, L, w)
            x = act(x, mask) if isinstance(act, Dice) else act(x)
            x = self.dropout(x)
        return self.out(x).squeeze(-1)  # (B, L)


class TargetAttention(nn.Module):
    """DIN's attention pooling of a history with respect to the candidate:
    ``sum_j w_j h_j`` with ``w_j = a(h_j, c)`` (unnormalised, as the paper)
    or its softmax over the row's real items; padding items weigh 0.

    Args:
        embedding_dim: D.
        hidden: the activation unit's hidden widths.
        activation: the activation unit's activation.
        normalize: ``"none"`` or ``"softmax"``.
        dropout: in the activation unit.
        device: where to make the parameters.

    Shapes:
        forward: history (B, L, D), mask (B, L) bool (True: a real item),
        candidate (B, D) -> (B, D); ``attention``: the same -> (B, L).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> din = TargetAttention(4, hidden=[8])
        >>> history, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [False, False, False]])
        >>> din(history, mask, torch.randn(2, 4)).shape
        torch.Size([2, 4])
        >>> din.attention(history, mask, torch.randn(2, 4))[1].tolist()   # an empty row: no weight anywhere
        [0.0, 0.0, 0.0]
    """

    input_format = "padded"

    def __init__(
        self,
        embedding_dim: int,
        *,
        hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        normalize: str = "none",
        dropout: float = 0.0,
        device: Any = None,
    ) -> None:
        super().__init__()
        if normalize not in ("none", "softmax"):
            raise ValueError(f"normalize must be 'none' or 'softmax', got {normalize!r}")
        self.unit = ActivationUnit(embedding_dim, hidden=hidden, activation=activation, dropout=dropout, device=device)
        self.normalize = normalize
        self.out_dim = embedding_dim

    def attention(self, history: torch.Tensor, mask: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """The weights ``w`` (B, L): 0 where ``mask`` is False."""
        history = torch.where(mask.unsqueeze(-1), history, 0.0)  # padding never reaches the unit's statistics
        scores = self.unit(history, candidate, mask)  # (B, L)
        if self.normalize == "softmax":
            # a finite floor, not -inf: an empty row gets a uniform softmax, then the mask zeroes it
            scores = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=1)
        return torch.where(mask, scores, 0.0)

    def forward(self, history: torch.Tensor, mask: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        w = self.attention(history, mask, candidate)  # (B, L)
        history = torch.where(mask.unsqueeze(-1), history, 0.0)  # (B, L, D)
        return (w.unsqueeze(-1) * history).sum(1)  # (B, D)


@technique(name="din", slot="sequence", params=DINParams, priority=PRIORITY)
class DIN:
    """DIN target attention over a history (Zhou et al., KDD 2018)."""

    @hookimpl
    def smt_sequence(self, ctx: SlotContext, params: DINParams, feature: SequenceFeature) -> nn.Module:
        return TargetAttention(
            ctx.embedding_dim,
            hidden=params.hidden,
            activation=params.activation,
            normalize=params.normalize,
            dropout=params.dropout,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [DIN()]
