"""DHEN for smt (technique ``dhen``, slot ``interaction``).

Paper: Buyun Zhang, Liang Luo, Xi Liu et al., "DHEN: A Deep and Hierarchical
Ensemble Network for Large-Scale Click-Through Rate Prediction", 2022 (Meta),
arXiv:2203.11014.

DHEN stacks *layers*; every layer runs several heterogeneous interaction
modules side by side on the same embeddings, ensembles their outputs, and
adds a shortcut with normalization, so the next layer interacts the outputs
of different kinds of interaction (a hierarchy)::

    X_{l+1} = LN(Ensemble(M_1(X_l), ..., M_k(X_l)) + ShortCut(X_l))

Modules (``modules`` parameter, in the order given), each mapping n input
embeddings to m = ``num_embeddings`` embeddings of width D:

* ``self_attention``: a transformer encoder block over the n features
  (multi-head attention, feed-forward, post-LayerNorm), then a linear
  recombination of the feature axis to m;
* ``dcn``: a DCNv2-style cross network (low rank) over the flattened
  features, ``x_{i+1} = x_0 * (U_i (V_i x_i) + b_i) + x_i``, then a linear
  layer to m * D;
* ``dot``: the pairwise dot products of the n features (upper triangle with
  the diagonal), then a linear layer to m * D;
* ``linear``: a linear recombination of the feature axis, ``W X``;
* ``mlp``: an MLP over the flattened features to m * D.

Ensemble ``concat`` stacks the k outputs along the feature axis
(F' = k * m), ``sum`` adds them (F' = m). The shortcut is the identity when
n == F', else a linear recombination of the feature axis.

With ``input_norm`` (the default) the first layer reads ``X_0 = LN(E)``
over D, the unit scale every later layer reads from the previous layer's
LayerNorm, so the modules (dot products, biases, attention) work the same
whatever scale the embedding tables have (see the README's design notes).

Shapes: B batch, F features, D embedding dim::

    (B, F, D) -> [LN over D] -> layer 1 -> (B, F', D) -> ... -> layer L -> (B, F' * D)

Example:
    >>> import torch
    >>> branch = DHENInteraction(11, 16, DHENParams())
    >>> branch(torch.randn(4, 11, 16)).shape
    torch.Size([4, 256])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from smt_host import (
    MLP,
    FieldValueError,
    SlotContext,
    at_least,
    hookimpl,
    one_of,
    positive_widths,
    technique,
)

__all__ = [
    "MODULES",
    "CrossModule",
    "DHEN",
    "DHENInteraction",
    "DHENLayer",
    "DHENParams",
    "DotProductModule",
    "FeatureProjection",
    "MLPModule",
    "SelfAttentionModule",
]

#: The interaction modules a DHEN layer can ensemble.
MODULES: tuple[str, ...] = ("self_attention", "dcn", "dot", "linear", "mlp")


def _check_modules(inst: Any, attribute: attrs.Attribute, value: tuple) -> None:
    allowed = ", ".join(repr(m) for m in MODULES)
    if not value:
        raise FieldValueError(attribute.name, f"must name at least one module; allowed: {allowed}")
    for i, name in enumerate(value):
        if name not in MODULES:
            raise FieldValueError(attribute.name, f"unknown module {name!r} at [{i}]; allowed: {allowed}")


@attrs.frozen
class DHENParams:
    """Parameters of the ``dhen`` technique (a model spec's
    ``[models.NAME.techniques.dhen]`` table).

    Args:
        num_layers: DHEN layers stacked (>= 1).
        modules: the interaction modules of every layer, from
            :data:`MODULES`, in ensemble order.
        ensemble: ``"concat"`` (F' = k * m embeddings) or ``"sum"`` (F' = m).
        num_embeddings: m, embeddings each module outputs (>= 1).
        attention_heads: heads of ``self_attention``; must divide D.
        cross_layers: cross layers of ``dcn`` (>= 1).
        cross_rank: rank of each ``dcn`` cross layer's weight (>= 1).
        mlp_widths: hidden widths of ``mlp`` (its last layer outputs m * D).
        input_norm: LayerNorm (over D) on the embeddings before the first
            layer. False: the raw embeddings (0.1.0's behaviour).
    """

    num_layers: int = attrs.field(default=2, validator=at_least(1))
    modules: tuple[str, ...] = attrs.field(
        default=("self_attention", "dcn", "dot", "mlp"), converter=tuple, validator=_check_modules
    )
    ensemble: str = attrs.field(default="concat", validator=one_of("concat", "sum"))
    num_embeddings: int = attrs.field(default=4, validator=at_least(1))
    attention_heads: int = attrs.field(default=2, validator=at_least(1))
    cross_layers: int = attrs.field(default=2, validator=at_least(1))
    cross_rank: int = attrs.field(default=16, validator=at_least(1))
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


class FeatureProjection(nn.Module):
    """A linear recombination of the feature axis, ``Y = W X``.

    Args:
        num_inputs: n. num_outputs: m. device: where to make the weight.

    Shapes:
        forward: (B, n, D) -> (B, m, D), ``Y[b] = weight @ X[b]``, weight (m, n)

    Example:
        >>> FeatureProjection(3, 5)(torch.ones(2, 3, 4)).shape
        torch.Size([2, 5, 4])
    """

    def __init__(self, num_inputs: int, num_outputs: int, *, device: Any = None) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, num_outputs=num_outputs)
        self.weight = nn.Parameter(torch.empty(num_outputs, num_inputs, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear(n, m)
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, x)


def _project(num_inputs: int, num_outputs: int, device: Any) -> nn.Module:
    return nn.Identity() if num_inputs == num_outputs else FeatureProjection(num_inputs, num_outputs, device=device)


class SelfAttentionModule(nn.Module):
    """Transformer encoder block over the features, then n -> m features.

    Args:
        num_inputs: n. embedding_dim: D. num_outputs: m.
        heads: attention heads; must divide D. device: where to make the parameters.

    Shapes:
        forward: (B, n, D) -> (B, m, D)

    Example:
        >>> SelfAttentionModule(5, 8, 3, heads=2)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self, num_inputs: int, embedding_dim: int, num_outputs: int, *, heads: int, device: Any = None
    ) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, embedding_dim=embedding_dim, num_outputs=num_outputs, heads=heads)
        if embedding_dim % heads:
            raise ValueError(f"attention heads ({heads}) must divide the embedding dim D={embedding_dim}")
        self.heads = heads
        self.head_dim = embedding_dim // heads
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim, device=device)
        self.attn_out = nn.Linear(embedding_dim, embedding_dim, device=device)
        self.norm1 = nn.LayerNorm(embedding_dim, device=device)
        self.ffn = MLP(embedding_dim, [2 * embedding_dim, embedding_dim], final_activation=False, device=device)
        self.norm2 = nn.LayerNorm(embedding_dim, device=device)
        self.project = _project(num_inputs, num_outputs, device)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the feature axis: (B, n, D) -> (B, n, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, n, d_h)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.attn_out((weights @ v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attention(x))
        h = self.norm2(h + self.ffn(h))
        return self.project(h)


class CrossModule(nn.Module):
    """DCNv2-style low-rank cross network over the flattened features.

    ``x_0 = flatten(X)``, ``x_{i+1} = x_0 * (U_i (V_i x_i) + b_i) + x_i``,
    then a linear layer to m * D.

    Args:
        num_inputs: n. embedding_dim: D. num_outputs: m.
        layers: cross layers. rank: rank of U_i V_i. device: where to make the parameters.

    Shapes:
        forward: (B, n, D) -> (B, m, D)

    Example:
        >>> CrossModule(5, 4, 2, layers=2, rank=3)(torch.randn(2, 5, 4)).shape
        torch.Size([2, 2, 4])
    """

    def __init__(
        self,
        num_inputs: int,
        embedding_dim: int,
        num_outputs: int,
        *,
        layers: int,
        rank: int,
        device: Any = None,
    ) -> None:
        super().__init__()
        _check_positive(
            num_inputs=num_inputs, embedding_dim=embedding_dim, num_outputs=num_outputs, layers=layers, rank=rank
        )
        width = num_inputs * embedding_dim
        self.down = nn.ModuleList(nn.Linear(width, rank, bias=False, device=device) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(rank, width, device=device) for _ in range(layers))
        self.out = nn.Linear(width, num_outputs * embedding_dim, device=device)
        self.num_outputs = num_outputs
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x.flatten(1)
        xi = x0
        for down, up in zip(self.down, self.up):
            xi = x0 * up(down(xi)) + xi
        return self.out(xi).view(x.shape[0], self.num_outputs, self.embedding_dim)


class DotProductModule(nn.Module):
    """Pairwise dot products of the features, then a linear layer to m * D.

    Args:
        num_inputs: n. embedding_dim: D. num_outputs: m. device: where to make the parameters.

    Shapes:
        dot_products: (B, n, D) -> (B, n(n+1)/2), the upper triangle of
        ``X X^T`` with its diagonal, row by row.
        forward: (B, n, D) -> (B, m, D)

    Example:
        >>> DotProductModule(4, 8, 3)(torch.randn(2, 4, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, num_inputs: int, embedding_dim: int, num_outputs: int, *, device: Any = None) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, embedding_dim=embedding_dim, num_outputs=num_outputs)
        rows, cols = torch.triu_indices(num_inputs, num_inputs, offset=0)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out = nn.Linear(len(rows), num_outputs * embedding_dim, device=device)
        self.num_outputs = num_outputs
        self.embedding_dim = embedding_dim

    def dot_products(self, x: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(x, x.transpose(1, 2))
        return gram[:, self.rows, self.cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dot_products(x)).view(x.shape[0], self.num_outputs, self.embedding_dim)


class MLPModule(nn.Module):
    """An MLP over the flattened features, reshaped to m embeddings.

    Args:
        num_inputs: n. embedding_dim: D. num_outputs: m.
        widths: hidden widths (the last layer outputs m * D). device: where to make the parameters.

    Shapes:
        forward: (B, n, D) -> (B, m, D)

    Example:
        >>> MLPModule(4, 8, 3, widths=[16])(torch.randn(2, 4, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        num_inputs: int,
        embedding_dim: int,
        num_outputs: int,
        *,
        widths: Sequence[int] = (),
        device: Any = None,
    ) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, embedding_dim=embedding_dim, num_outputs=num_outputs)
        self.mlp = MLP(
            num_inputs * embedding_dim, [*widths, num_outputs * embedding_dim], final_activation=False, device=device
        )
        self.num_outputs = num_outputs
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(1)).view(x.shape[0], self.num_outputs, self.embedding_dim)


ModuleFactory = Callable[[int, int, DHENParams, Any], nn.Module]

#: name -> factory(n, D, params, device) of a module mapping (B, n, D) to (B, m, D).
FACTORIES: dict[str, ModuleFactory] = {
    "self_attention": lambda n, d, p, dev: SelfAttentionModule(
        n, d, p.num_embeddings, heads=p.attention_heads, device=dev
    ),
    "dcn": lambda n, d, p, dev: CrossModule(
        n, d, p.num_embeddings, layers=p.cross_layers, rank=p.cross_rank, device=dev
    ),
    "dot": lambda n, d, p, dev: DotProductModule(n, d, p.num_embeddings, device=dev),
    "linear": lambda n, d, p, dev: FeatureProjection(n, p.num_embeddings, device=dev),
    "mlp": lambda n, d, p, dev: MLPModule(n, d, p.num_embeddings, widths=p.mlp_widths, device=dev),
}
assert tuple(FACTORIES) == MODULES  # invariant: one factory per allowed name


class DHENLayer(nn.Module):
    """One DHEN layer: ``LN(Ensemble(M_1(X), ..., M_k(X)) + ShortCut(X))``.

    Args:
        num_inputs: n, embeddings in.
        embedding_dim: D.
        params: a :class:`DHENParams` (modules, ensemble, module settings).
        device: where to make the parameters.

    Shapes:
        forward: (B, n, D) -> (B, F', D), F' = k * m (concat) or m (sum)

    Example:
        >>> layer = DHENLayer(5, 8, DHENParams(modules=("dot", "linear"), num_embeddings=3))
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 6, 8])
    """

    def __init__(self, num_inputs: int, embedding_dim: int, params: DHENParams, *, device: Any = None) -> None:
        super().__init__()
        _check_positive(num_inputs=num_inputs, embedding_dim=embedding_dim)
        unknown = [m for m in params.modules if m not in FACTORIES]
        if unknown or not params.modules:
            raise ValueError(f"modules must be a non-empty list from {list(MODULES)}, got {list(params.modules)}")
        self.module_names = list(params.modules)
        self.interactions = nn.ModuleList(
            FACTORIES[m](num_inputs, embedding_dim, params, device) for m in params.modules
        )
        self.concat = params.ensemble == "concat"
        k = len(params.modules)
        self.num_outputs = params.num_embeddings * (k if self.concat else 1)
        self.shortcut = _project(num_inputs, self.num_outputs, device)
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.interactions]
        mixed = torch.cat(outs, dim=1) if self.concat else torch.stack(outs, dim=0).sum(dim=0)
        return self.norm(mixed + self.shortcut(x))


class DHENInteraction(nn.Module):
    """The ``dhen`` interaction branch: stacked DHEN layers, flattened.

    Args:
        num_features: F, embeddings in (sparse features plus the dense arch's).
        embedding_dim: D.
        params: a :class:`DHENParams`.
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, out_dim), ``out_dim = F' * D``;
        ``X_0 = input_norm(features)`` (a LayerNorm over D, or the identity).

    Example:
        >>> branch = DHENInteraction(6, 8, DHENParams(ensemble="sum", num_embeddings=5))
        >>> branch(torch.randn(2, 6, 8)).shape
        torch.Size([2, 40])
    """

    def __init__(self, num_features: int, embedding_dim: int, params: DHENParams, *, device: Any = None) -> None:
        super().__init__()
        _check_positive(num_features=num_features, embedding_dim=embedding_dim)
        self.input_norm: nn.Module = (
            nn.LayerNorm(embedding_dim, eps=INPUT_NORM_EPS, device=device) if params.input_norm else nn.Identity()
        )
        layers = []
        n = num_features
        for _ in range(params.num_layers):
            layer = DHENLayer(n, embedding_dim, params, device=device)
            layers.append(layer)
            n = layer.num_outputs
        self.layers = nn.Sequential(*layers)
        self.num_outputs = n
        self.out_dim = int(n * embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x0 = self.input_norm(features)  # (B, F, D), each embedding at zero mean, unit variance over D
        return self.layers(x0).flatten(1)  # (B, F' * D)


@technique(name="dhen", slot="interaction", params=DHENParams)
class DHEN:
    """DHEN: layers of heterogeneous interaction modules, ensembled and stacked (Meta, 2022)."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: DHENParams) -> nn.Module:
        if "self_attention" in params.modules and ctx.embedding_dim % params.attention_heads:
            raise FieldValueError(
                "attention_heads", f"must divide the embedding dim D={ctx.embedding_dim}, got {params.attention_heads}"
            )
        return DHENInteraction(ctx.num_features, ctx.embedding_dim, params, device=ctx.device)


@hookimpl
def smt_techniques() -> list:
    return [DHEN()]
