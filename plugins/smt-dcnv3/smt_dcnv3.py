"""DCNv3: the exponential and linear cross networks as an smt interaction branch.

Paper: Honghao Li, Yiwen Zhang, Yi Zhang, Hanwei Li, Lei Sang, Jieming Zhu.
"DCNv3: Towards Next Generation Deep Cross Network for Click-Through Rate
Prediction" (2024; later versions retitled "FCN"). https://arxiv.org/abs/2407.13349

The layers follow the authors' reference code, FuxiCTR's
``model_zoo/DCNv3/src/DCNv3.py`` (2024, salmon1802), where the paper leaves
details open: where the bias sits, the layer norm inside the mask, the
dropout after each layer, the head layout of the input, the
initialisation.

Shapes: B batch, F features, D embedding dim, h heads (``num_heads``),
N = F*D, N_h = N / h (must be even), T tasks, ``*`` elementwise, ``[a, b]``
concatenation on the last dim.

**Input layout (the reference's multi-head embedding).** The (B, F, D)
embeddings are cut into h heads along D (d_h = D / h each); each head's
(B, F, d_h) is cut again into its first ceil(d_h / 2) and remaining
dimensions, each part flattened, and the two concatenated::

    x_1 = [flat(e[..., :ceil(d_h/2)]), flat(e[..., ceil(d_h/2):])]   (B, h, N_h)

so every feature has dimensions on both sides of the mask below. The heads
share every weight; h = 1 is the paper's model.

**Self-Mask** (section 3.3). With ``W_l`` (N_h/2, N_h) and no bias::

    H_l = W_l x_l                                  (B, h, N_h/2)
    H_l = BatchNorm_h(H_l)                          optional (``batch_norm``; one channel per head)
    M_l = max(0, LN_l(H_l))                         (B, h, N_h/2)   LayerNorm over N_h/2, with affine
                                                                    (``layer_norm = false``: max(0, H_l))
    c_l = [H_l, H_l * M_l] + b_l                    (B, h, N_h),   b_l (N_h,), b_l ~ U(0, 1) at init

The mask keeps about half of the second half's entries (LayerNorm centres
them, ReLU zeroes the negative ones), the paper's "half of the features".

**ECN**, the exponential cross network (deep; order 2^l after l layers)::

    x_{l+1} = x_l * c_l(x_l) + x_l        then dropout (``ecn_dropout``)

**LCN**, the linear cross network (shallow; order l + 1)::

    x_{l+1} = x_1 * c_l(x_l) + x_l        then dropout (``lcn_dropout``)

The two networks have their own weights (``ecn_layers`` and ``lcn_layers``
layers of them). Where their outputs x_E (B, h, N_h) and x_L go is the
``structure`` parameter:

* ``"logit"`` (default, the paper): each network ends in a linear logit per
  task, averaged over heads, and the branch gives their mean::

      y = 0.5 * (mean_h (x_E V_E + a_E) + mean_h (x_L V_L + a_L))     (B, T), V (N_h, T)

  The branch is a wide part (``to_logits``): the template adds y to the
  logits of the rest of the model (the flat embeddings through the
  over-arch and heads), as in DeepFM; the template always keeps a branch
  that feeds the over-arch, so DCNv3 alone (no DNN) is not buildable.
* ``"parallel"``: the branch gives ``[flat(x_E), flat(x_L)]`` (B, 2N) beside
  the over-arch's output (``to_task_arch``); with ``arch.task_tower =
  false`` the head is one linear logit on ``[MLP(x_1), x_E, x_L]``, which
  holds the paper's mean of two linear logits as a special case.
* ``"stacked"``: ``[flat(x_E), flat(x_L)]`` (B, 2N) feeds the over-arch.

**Tri-BCE** (section 3.4), the optional loss technique ``dcnv3_tri_bce``
(off unless a model enables it; ``"logit"`` only). With ``L`` the BCE of
the model's logits (the built-in ``bce``), ``L_E`` and ``L_L`` the BCE of
each network's own logit, per task (task weights as ``bce``)::

    loss = L + max(0, L_E - L) * L_E + max(0, L_L - L) * L_L

as the reference's ``add_loss`` (the weights are not detached). In the
paper ``L`` is the BCE of the DCNv3 mean alone; here it is that of the
whole model's logits, the prediction that is served.

Cost per example (FLOPs as the plan counts them, matrix products only):
``(ecn_layers + lcn_layers) * N^2 / h`` in the cross layers, plus
``2 * 2 * N * T`` in the two logits (``"logit"`` only).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from smt_host import FieldValueError, LossFn, LossInputs, SlotContext, at_least, hookimpl, in_range, one_of, technique

__all__ = [
    "STRUCTURES",
    "CrossNetwork",
    "DCNv3",
    "DCNv3Branch",
    "DCNv3Params",
    "SelfMaskLayer",
    "TriBCE",
    "head_layout",
    "smt_techniques",
    "tri_bce_terms",
]

#: where the branch's output goes: the paper's averaged logit (added to the
#: template's logits), beside the over-arch, or into it
STRUCTURES = ("logit", "parallel", "stacked")


@attrs.frozen
class DCNv3Params:
    """Parameters of the ``dcnv3`` technique.

    Args:
        ecn_layers: layers of the exponential cross network (>= 1; order
            2^L after L layers).
        lcn_layers: layers of the linear cross network (>= 1; order L + 1).
        ecn_dropout: dropout after each ECN layer, in [0, 0.9].
        lcn_dropout: dropout after each LCN layer, in [0, 0.9].
        layer_norm: LayerNorm inside the Self-Mask (``max(0, LN(H))``);
            false: ``max(0, H)``.
        batch_norm: BatchNorm over each head's ``W x`` before the mask.
        num_heads: heads h the embeddings are cut into along D (sharing the
            weights); must divide D, and F*D/h must be even.
        structure: ``"logit"`` (the paper's mean of the two networks'
            logits, added to the model's logits), ``"parallel"`` (beside
            the over-arch) or ``"stacked"`` (into the over-arch).

    Example:
        >>> DCNv3Params(ecn_layers=3, structure="parallel")
        DCNv3Params(ecn_layers=3, lcn_layers=4, ecn_dropout=0.1, lcn_dropout=0.3, layer_norm=True, batch_norm=False, num_heads=1, structure='parallel')
    """

    ecn_layers: int = attrs.field(
        default=4, validator=at_least(1), metadata={"doc": "ECN layers (>= 1).", "search": [2, 3, 4]}
    )
    lcn_layers: int = attrs.field(
        default=4, validator=at_least(1), metadata={"doc": "LCN layers (>= 1).", "search": [2, 4]}
    )
    ecn_dropout: float = attrs.field(
        default=0.1, validator=in_range(0.0, 0.9), metadata={"doc": "Dropout after each ECN layer."}
    )
    lcn_dropout: float = attrs.field(
        default=0.3, validator=in_range(0.0, 0.9), metadata={"doc": "Dropout after each LCN layer."}
    )
    layer_norm: bool = attrs.field(default=True, metadata={"doc": "LayerNorm inside the Self-Mask."})
    batch_norm: bool = attrs.field(default=False, metadata={"doc": "BatchNorm per head before the mask."})
    num_heads: int = attrs.field(default=1, validator=at_least(1), metadata={"doc": "Heads along D."})
    structure: str = attrs.field(
        default="logit", validator=one_of(*STRUCTURES), metadata={"doc": "Where the output goes."}
    )


def head_layout(features: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The reference's multi-head input: (B, F, D) -> (B, h, N_h).

    Head k takes dimensions ``[k d_h, (k+1) d_h)`` of every feature
    (d_h = D / h); its row is the flattened first ceil(d_h / 2) of them,
    then the flattened rest.

    Example:
        >>> e = torch.arange(8.0).reshape(1, 2, 4)  # features [0 1 2 3], [4 5 6 7]
        >>> head_layout(e, 1).tolist()
        [[[0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]]]
        >>> head_layout(e, 2).tolist()
        [[[0.0, 4.0, 1.0, 5.0], [2.0, 6.0, 3.0, 7.0]]]
    """
    b, f, d = features.shape
    heads = features.reshape(b, f, num_heads, d // num_heads).transpose(1, 2)  # (B, h, F, d_h)
    first = (d // num_heads + 1) // 2
    return torch.cat([heads[..., :first].flatten(2), heads[..., first:].flatten(2)], dim=-1)  # (B, h, N_h)


class SelfMaskLayer(nn.Module):
    """One cross layer's ``c_l(x) = [H, H * max(0, LN(H))] + b`` with ``H = W x``.

    Args:
        width: N_h (even).
        num_heads: h (BatchNorm's channels).
        layer_norm: LayerNorm inside the mask.
        batch_norm: BatchNorm over each head's H before the mask.
        device: where to make the parameters.

    Shapes:
        forward: (B, h, N_h) -> (B, h, N_h)

    Example:
        >>> _ = torch.manual_seed(0)
        >>> SelfMaskLayer(6, 2)(torch.randn(3, 2, 6)).shape
        torch.Size([3, 2, 6])
    """

    def __init__(
        self, width: int, num_heads: int = 1, *, layer_norm: bool = True, batch_norm: bool = False, device: Any = None
    ) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"the Self-Mask halves its input, so its width must be even and >= 2, got {width}")
        half = width // 2
        self.w = nn.Linear(width, half, bias=False, device=device)
        nn.init.xavier_normal_(self.w.weight)  # FuxiCTR's reset_parameters for every nn.Linear
        self.b = nn.Parameter(torch.rand(width, device=device))  # nn.init.uniform_: U(0, 1)
        self.norm = nn.LayerNorm(half, device=device) if layer_norm else None
        self.bn = nn.BatchNorm1d(num_heads, device=device) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w(x)  # (B, h, N_h/2)
        if self.bn is not None:
            h = self.bn(h)  # channels = heads
        mask = torch.relu(self.norm(h) if self.norm is not None else h)  # (B, h, N_h/2)
        return torch.cat([h, h * mask], dim=-1) + self.b  # (B, h, N_h)


class CrossNetwork(nn.Module):
    """The ECN (``exponential=True``: ``x_{l+1} = x_l * c_l(x_l) + x_l``) or
    the LCN (``x_{l+1} = x_1 * c_l(x_l) + x_l``), dropout after each layer.

    Args:
        width: N_h (even).
        num_layers: L (>= 1).
        exponential: ECN if True, else LCN.
        dropout: after each layer.
        num_heads: h.
        layer_norm, batch_norm: of each :class:`SelfMaskLayer`.
        device: where to make the parameters.

    Shapes:
        forward: (B, h, N_h) -> (B, h, N_h), x_{L+1}

    Example:
        >>> net = CrossNetwork(4, 2, exponential=True)
        >>> net(torch.ones(5, 1, 4)).shape
        torch.Size([5, 1, 4])
    """

    def __init__(
        self,
        width: int,
        num_layers: int,
        *,
        exponential: bool,
        dropout: float = 0.0,
        num_heads: int = 1,
        layer_norm: bool = True,
        batch_norm: bool = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.exponential = exponential
        self.layers = nn.ModuleList(
            SelfMaskLayer(width, num_heads, layer_norm=layer_norm, batch_norm=batch_norm, device=device)
            for _ in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        x = x1
        for layer in self.layers:
            anchor = x if self.exponential else x1
            x = self.dropout(anchor * layer(x) + x)  # (B, h, N_h)
        return x


class DCNv3Branch(nn.Module):
    """DCNv3's two cross networks over the embeddings, and their output.

    Args:
        num_features: F.
        embedding_dim: D.
        num_tasks: T (the logits of ``structure = "logit"``).
        ecn_layers, lcn_layers: layers of each network (>= 1).
        ecn_dropout, lcn_dropout: dropout after each layer of each.
        layer_norm, batch_norm: of the Self-Mask.
        num_heads: h; must divide D, and N_h = F*D/h must be even.
        structure: ``"logit"``, ``"parallel"`` or ``"stacked"`` (module doc).
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, T) for ``"logit"`` (``to_logits``), else
        (B, 2*F*D) (``to_task_arch`` for ``"parallel"``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> branch = DCNv3Branch(3, 4, 2, ecn_layers=2, lcn_layers=1)
        >>> branch(torch.randn(5, 3, 4)).shape, branch.out_dim, branch.to_logits
        (torch.Size([5, 2]), 2, True)
        >>> wide = DCNv3Branch(3, 4, 1, num_heads=2, structure="parallel")
        >>> wide(torch.randn(5, 3, 4)).shape, wide.to_task_arch, wide.to_logits
        (torch.Size([5, 24]), True, False)
    """

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        num_tasks: int = 1,
        *,
        ecn_layers: int = 4,
        lcn_layers: int = 4,
        ecn_dropout: float = 0.1,
        lcn_dropout: float = 0.3,
        layer_norm: bool = True,
        batch_norm: bool = False,
        num_heads: int = 1,
        structure: str = "logit",
        device: Any = None,
    ) -> None:
        super().__init__()
        if num_features < 1 or embedding_dim < 1 or num_tasks < 1:
            raise ValueError(
                f"num_features, embedding_dim and num_tasks must be >= 1, got {num_features}, {embedding_dim}, {num_tasks}"
            )
        if num_heads < 1 or embedding_dim % num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide D={embedding_dim}, got {num_heads}")
        width = num_features * embedding_dim // num_heads
        if width % 2:
            raise ValueError(
                f"the Self-Mask halves each head's F*D/h = {num_features}*{embedding_dim}/{num_heads} = {width}, "
                f"which must be even"
            )
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {', '.join(map(repr, STRUCTURES))}, got {structure!r}")
        common = {"num_heads": num_heads, "layer_norm": layer_norm, "batch_norm": batch_norm, "device": device}
        self.ecn = CrossNetwork(width, ecn_layers, exponential=True, dropout=ecn_dropout, **common)
        self.lcn = CrossNetwork(width, lcn_layers, exponential=False, dropout=lcn_dropout, **common)
        self.num_heads = num_heads
        self.structure = structure
        n = num_features * embedding_dim
        if structure == "logit":
            self.ecn_logit = nn.Linear(width, num_tasks, device=device)
            self.lcn_logit = nn.Linear(width, num_tasks, device=device)
            for fc in (self.ecn_logit, self.lcn_logit):
                nn.init.xavier_normal_(fc.weight)
                nn.init.zeros_(fc.bias)
        #: (B, T) for the paper's logit, else (B, 2N)
        self.out_dim = num_tasks if structure == "logit" else 2 * n
        #: the template's routing: a wide part added to the logits, or beside the over-arch
        self.to_logits = structure == "logit"
        self.to_task_arch = structure == "parallel"
        #: ``"logit"``, in training mode: the last forward's (ECN, LCN) logits, each (B, T), for Tri-BCE
        self.sub_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    def crosses(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, D) -> (x_E, x_L), each (B, h, N_h)."""
        x1 = head_layout(features, self.num_heads)  # (B, h, N_h)
        return self.ecn(x1), self.lcn(x1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        xe, xl = self.crosses(features)
        if self.structure == "logit":
            ecn = self.ecn_logit(xe).mean(dim=1)  # (B, T)
            lcn = self.lcn_logit(xl).mean(dim=1)  # (B, T)
            if self.training:  # what Tri-BCE reads; never in eval mode, so export sees no state
                self.sub_logits = (ecn, lcn)
            return 0.5 * (ecn + lcn)
        return torch.cat([xe.flatten(1), xl.flatten(1)], dim=1)  # (B, 2N)


def _applies(model: Any) -> bool | str:
    f = len(model.features.sparse) + len(model.features.sequence) + (1 if model.features.dense else 0)
    n = f * model.embedding_dim
    if n % 2:
        return f"F*D = {f}*{model.embedding_dim} = {n} is odd; the Self-Mask halves it"
    return True


@technique(name="dcnv3", slot="interaction", params=DCNv3Params, applies=_applies)
class DCNv3:
    """DCNv3 exponential and linear cross networks with Self-Mask (Li et al., 2024)."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: DCNv3Params) -> nn.Module:
        d, h = ctx.embedding_dim, params.num_heads
        if d % h:
            raise FieldValueError("num_heads", f"must divide D={d}, got {h}")
        if (ctx.num_features * d // h) % 2:
            raise FieldValueError(
                "num_heads", f"F*D/h = {ctx.num_features}*{d}/{h} must be even (the Self-Mask halves it), got {h}"
            )
        return DCNv3Branch(
            ctx.num_features,
            d,
            len(ctx.tasks),
            ecn_layers=params.ecn_layers,
            lcn_layers=params.lcn_layers,
            ecn_dropout=params.ecn_dropout,
            lcn_dropout=params.lcn_dropout,
            layer_norm=params.layer_norm,
            batch_norm=params.batch_norm,
            num_heads=h,
            structure=params.structure,
            device=ctx.device,
        )


def tri_bce_terms(
    logits: torch.Tensor, sub_logits: tuple[torch.Tensor, ...], labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Tri-BCE's extra terms: ``sum_t w_t sum_k max(0, L_k - L) L_k``.

    Args:
        logits: the model's logits (B, T); ``L`` is their mean BCE per task.
        sub_logits: each network's logits, (B, T) each; ``L_k`` likewise.
        labels: (B, T).
        weights: (T,) task weights.

    Returns:
        a scalar, to add to the model's loss.

    Example:
        >>> y = torch.tensor([[1.0], [0.0]])
        >>> good, bad = torch.tensor([[4.0], [-4.0]]), torch.tensor([[-1.0], [1.0]])
        >>> float(tri_bce_terms(good, (good,), y, torch.ones(1)))  # L_k = L: no extra term
        0.0
        >>> float(tri_bce_terms(good, (bad,), y, torch.ones(1))) > 0
        True
    """

    def bce(z: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(z, labels, reduction="none").mean(dim=0)  # (T,)

    main = bce(logits)
    extra = torch.zeros_like(main)
    for z in sub_logits:
        part = bce(z)
        extra = extra + torch.relu(part - main) * part  # the weight max(0, L_k - L), not detached
    return (extra * weights.to(extra.device)).sum()


@technique(name="dcnv3_tri_bce", slot="loss", requires=("dcnv3", "bce"), after=("bce",), default=False)
class TriBCE:
    """Tri-BCE: each DCNv3 network's own BCE, weighted by how much worse than the model's it is."""

    @hookimpl
    def smt_loss(self, ctx: SlotContext, loss: LossFn | None) -> LossFn:
        value = ctx.spec.techniques.get("dcnv3")
        structure = value.get("structure", "logit") if isinstance(value, dict) else "logit"
        if structure != "logit":
            raise ValueError(f'needs dcnv3 with structure = "logit" (the two networks\' logits), got {structure!r}')
        weights = torch.tensor([t.weight for t in ctx.spec.tasks])

        def tri_bce(inputs: LossInputs) -> torch.Tensor:
            total = loss(inputs) if loss is not None else torch.zeros(())
            branches = getattr(inputs.model, "branches", {})
            branch = branches["dcnv3"] if "dcnv3" in branches else None
            sub = getattr(branch, "sub_logits", None)
            if sub is None or sub[0].shape != inputs.logits.shape:
                raise ValueError(
                    "dcnv3_tri_bce reads the dcnv3 branch's logits of the same training-mode forward; "
                    f"found {None if sub is None else tuple(sub[0].shape)} for logits {tuple(inputs.logits.shape)}"
                )
            return total + tri_bce_terms(inputs.logits, sub, inputs.labels, weights)

        return tri_bce


@hookimpl
def smt_techniques() -> list:
    return [DCNv3(), TriBCE()]
