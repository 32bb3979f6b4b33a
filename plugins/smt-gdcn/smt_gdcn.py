"""GDCN: the Gated Cross Network of the Gated Deep Cross Network as an smt interaction branch.

Paper: Fangye Wang, Hansu Gu, Dongsheng Li, Tun Lu, Peng Zhang, Ning Gu.
"Towards Deeper, Lighter and Interpretable Cross Network for CTR
Prediction". CIKM 2023. https://arxiv.org/abs/2311.04635
(reference code: github.com/anonctr/GDCN ``models/GDCN.py``; FuxiCTR
``model_zoo/GDCN/src/GDCN.py``, classes ``GDCN`` (stacked) and ``GDCNP``).

The branch flattens the feature embeddings, (B, F, D) -> (B, N) with
N = F*D, and runs L gated cross layers (the paper's Gated Cross Network, GCN).
With ``c_0`` the flat input, ``c_l`` (B, N) layer l's input,
``*`` elementwise and ``sigma`` the logistic sigmoid::

    c_{l+1} = c_0 * (W^c_l c_l + b_l) * sigma(W^g_l c_l) + c_l        l = 0 .. L-1

    W^c_l (N, N)   the feature-crossing matrix, b_l (N,) its bias
    W^g_l (N, N)   the information gate (no bias), g_l = sigma(W^g_l c_l) (B, N) in (0, 1)

Each layer raises the crossing order by one (c_L holds crosses up to order
L + 1); the gate weighs every element of the layer's cross, which is what
lets the paper stack GCN deeper than DCNv2's cross network (it is DCNv2's
layer with the gate fixed at 1) and read the gates as the importance of
each order's crosses (:meth:`GatedCrossNet.gates`).

Initialisation as FuxiCTR's (whose ``reset_parameters`` re-initialises
every ``nn.Linear``): ``W^c_l`` and ``W^g_l`` Xavier normal, ``b_l``
uniform on [0, 1) (the reference code's ``nn.init.uniform_``).

Shapes (B batch, F features, D embedding dim, N = F*D):
    (B, F, D) -> (B, N), the last layer's output c_L.

Where c_L goes is the paper's choice of structure (GDCN-S or GDCN-P), the
``structure`` parameter, as in smt-dcnv2:

* ``"stacked"`` (the default; GDCN-S with ``flat = false``): c_L feeds the over-arch
  MLP, the deep network: ``y = head(MLP(c_L))``. The over-arch reads every
  branch that feeds it, so beside the template's flat-embedding branch (on
  by default) it reads ``[c_L, c_0]``; with ``flat = false`` it reads c_L
  alone, the paper's GDCN-S.
* ``"parallel"`` (the paper's GDCN-P): c_L skips the over-arch
  (``to_task_arch``) and is concatenated with the deep network's output,
  the over-arch MLP on the flat embeddings: ``[MLP(c_0), c_L]`` (B, H + N);
  with ``arch.task_tower = false`` the head is one linear logit on that,
  ``y = w^T [MLP(c_0), c_L] + b``, the paper's GDCN-P.

The paper's Field-level Dimension Optimization (FDO: train once, keep for
each field as many PCA dimensions of its table as hold a chosen share of
its variance, retrain with those per-field widths; the authors'
``utils/FieldDimOpt.py``) is not implemented: it is a two-pass procedure on
the tables, and the template gives every interaction branch one width D
for all fields (see the README).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from smt_host import SlotContext, at_least, hookimpl, one_of, technique

__all__ = ["STRUCTURES", "GDCN", "GDCNBranch", "GDCNParams", "GatedCrossNet", "smt_techniques"]

#: where the gated cross network's output goes: into the deep network (the
#: over-arch, GDCN-S), or beside it (GDCN-P)
STRUCTURES = ("stacked", "parallel")


@attrs.frozen
class GDCNParams:
    """Parameters of the ``gdcn`` technique.

    Args:
        num_layers: gated cross layers L (>= 1); each adds one order of
            feature crossing (c_L holds crosses up to order L + 1).
        structure: ``"stacked"``: c_L feeds the over-arch (the deep
            network, GDCN-S); ``"parallel"``: it skips the over-arch and is
            concatenated with the over-arch's output (GDCN-P; see the module
            doc).

    Example:
        >>> GDCNParams(num_layers=4, structure="parallel")
        GDCNParams(num_layers=4, structure='parallel')
    """

    num_layers: int = attrs.field(
        default=3,
        validator=at_least(1),
        metadata={"doc": "Gated cross layers L (crossing order L + 1).", "search": [2, 3, 4]},
    )
    structure: str = attrs.field(
        default="stacked",
        validator=one_of(*STRUCTURES),
        metadata={
            "doc": "stacked: c_L feeds the over-arch (GDCN-S); parallel: beside it (GDCN-P).",
            "search": ["stacked", "parallel"],
        },
    )


class GatedCrossNet(nn.Module):
    """The Gated Cross Network (GCN): L gated cross layers on a flat input.

    ``c_{l+1} = c_0 * (W^c_l c_l + b_l) * sigmoid(W^g_l c_l) + c_l``; layer
    l's ``W^c_l`` and ``b_l`` are ``cross[l].weight`` (N, N) and
    ``cross[l].bias`` (N,), its ``W^g_l`` is ``gate[l].weight`` (N, N).

    Args:
        in_features: N.
        num_layers: L (>= 1).
        device: where to make the parameters.

    Shapes:
        forward: (B, N) -> (B, N)
        gates: (B, N) -> (L, B, N), each layer's sigmoid(W^g_l c_l)

    Example:
        >>> _ = torch.manual_seed(0)
        >>> gcn = GatedCrossNet(6, num_layers=2)
        >>> gcn(torch.randn(4, 6)).shape, gcn.gates(torch.randn(4, 6)).shape
        (torch.Size([4, 6]), torch.Size([2, 4, 6]))
        >>> sum(p.numel() for p in gcn.parameters())  # L * (2 N^2 + N)
        156
    """

    def __init__(self, in_features: int, num_layers: int = 3, *, device: Any = None) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        n = in_features
        #: W^c_l c_l + b_l: the feature crossing
        self.cross = nn.ModuleList(nn.Linear(n, n, device=device) for _ in range(num_layers))
        #: W^g_l c_l: the information gate's logits (no bias, as in the paper)
        self.gate = nn.ModuleList(nn.Linear(n, n, bias=False, device=device) for _ in range(num_layers))
        self.in_features = n
        self.num_layers = num_layers
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W^c, W^g Xavier normal; b uniform on [0, 1) (FuxiCTR's GDCN)."""
        for cross, gate in zip(self.cross, self.gate):
            nn.init.xavier_normal_(cross.weight)
            nn.init.uniform_(cross.bias)
            nn.init.xavier_normal_(gate.weight)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        c = x0  # (B, N)
        for cross, gate in zip(self.cross, self.gate):
            c = x0 * cross(c) * torch.sigmoid(gate(c)) + c  # (B, N)
        return c

    @torch.no_grad()
    def gates(self, x0: torch.Tensor) -> torch.Tensor:
        """Each layer's gate ``sigmoid(W^g_l c_l)`` on ``x0``, stacked: (L, B, N).

        The paper reads them as the importance of each element's cross at
        each order (its interpretability study); averaged over a batch and a field's D
        columns they rank the fields."""
        c, out = x0, []
        for cross, gate in zip(self.cross, self.gate):
            g = torch.sigmoid(gate(c))  # (B, N)
            out.append(g)
            c = x0 * cross(c) * g + c
        return torch.stack(out)  # (L, B, N)


class GDCNBranch(nn.Module):
    """The gated cross network over the flat feature embeddings.

    Args:
        num_features: F.
        embedding_dim: D.
        num_layers: gated cross layers L (>= 1).
        structure: ``"stacked"`` or ``"parallel"``; ``"parallel"`` sets
            ``to_task_arch``, so the template concatenates the output after
            the over-arch's instead of feeding the over-arch with it.
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, F*D)

    Example:
        >>> _ = torch.manual_seed(0)
        >>> branch = GDCNBranch(3, 4, num_layers=2)
        >>> branch(torch.randn(5, 3, 4)).shape
        torch.Size([5, 12])
        >>> branch.out_dim, branch.gcn.num_layers, branch.to_task_arch
        (12, 2, False)
        >>> GDCNBranch(3, 4, structure="parallel").to_task_arch
        True
    """

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        *,
        num_layers: int = 3,
        structure: str = "stacked",
        device: Any = None,
    ) -> None:
        super().__init__()
        if num_features < 1 or embedding_dim < 1:
            raise ValueError(f"num_features and embedding_dim must be >= 1, got {num_features} and {embedding_dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {', '.join(map(repr, STRUCTURES))}, got {structure!r}")
        n = num_features * embedding_dim
        self.gcn = GatedCrossNet(n, num_layers, device=device)
        self.in_features = n
        self.out_dim = n
        self.structure = structure
        #: the template's routing: True puts the output beside the over-arch's (parallel, GDCN-P)
        self.to_task_arch = structure == "parallel"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.gcn(features.flatten(1))  # (B, F, D) -> (B, N) -> (B, N)


@technique(name="gdcn", slot="interaction", params=GDCNParams)
class GDCN:
    """Gated cross network over the flat embeddings, stacked (GDCN-S) or parallel (GDCN-P) (Wang et al., CIKM 2023)."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: GDCNParams) -> nn.Module:
        return GDCNBranch(
            ctx.num_features,
            ctx.embedding_dim,
            num_layers=params.num_layers,
            structure=params.structure,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [GDCN()]
