"""DCNv2: the cross network of DCN V2 as an smt interaction branch.

Paper: Ruoxi Wang, Rakesh Shivanna, Derek Z. Cheng, Sagar Jain, Dong Lin,
Lichan Hong, Ed H. Chi. "DCN V2: Improved Deep & Cross Network and Practical
Lessons for Web-scale Learning to Rank Systems". WWW 2021.
https://arxiv.org/abs/2008.13535

The branch flattens the feature embeddings and runs a stack of cross layers
on them. With ``x_0`` the flat input (N = F*D wide) and ``x_l`` layer l's
input, each layer computes (``*`` elementwise):

* full rank (section 3.2, eq. 1):
  ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with ``W_l`` (N, N);
* low rank (section 5.1): ``W_l = U_l V_l`` with ``U_l`` (N, r), ``V_l`` (r, N);
* low-rank mixture of experts (section 5.1, "DCN-Mix", eq. 4): K low-rank
  experts ``E_i = x_0 * (U_i g(C_i g(V_i x_l)) + b_l)`` (g = ReLU), mixed by a
  softmax gate on ``x_l``: ``x_{l+1} = sum_i G_i(x_l) E_i + x_l``.

The modules are torchrec's (:mod:`torchrec.modules.crossnet`): ``CrossNet``,
``LowRankCrossNet`` and ``LowRankMixtureCrossNet``.

Shapes (B batch, F features, D embedding dim):
    (B, F, D) -> (B, F*D), the output of the last cross layer.

Where the output goes is the paper's choice of structure (section 3.1,
figure 2), the ``structure`` parameter:

* ``"stacked"`` (the default): the cross output feeds the over-arch MLP, the
  deep network: cross network, then deep network. The over-arch reads every
  branch that feeds it, so beside the template's flat-embedding branch (on
  by default) it reads ``[x_L, x_0]``; with ``flat = false`` it reads
  ``x_L`` alone, the paper's stacked form.
* ``"parallel"``: the cross output skips the over-arch (``to_task_arch``)
  and is concatenated with the deep network's output, the over-arch MLP on
  the flat embeddings: ``[x_L, MLP(x_0)]``; with ``arch.task_tower = false``
  the head is one linear logit on that, the paper's parallel form and the
  DCNv2 of BARS/FuxiCTR.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

from smt_host import FieldValueError, SlotContext, at_least, hookimpl, one_of, technique

__all__ = ["STRUCTURES", "DCNv2", "DCNv2Branch", "DCNv2Params", "smt_techniques"]

#: where the cross network's output goes: into the deep network (the
#: over-arch), or beside it
STRUCTURES = ("stacked", "parallel")


def _experts_need_low_rank(inst: DCNv2Params, attribute: attrs.Attribute, value: int) -> None:
    if value > 1 and inst.low_rank is None:
        raise FieldValueError(
            attribute.name,
            f"a mixture of {value} experts needs low_rank (the experts are low rank), got low_rank=None",
        )


@attrs.frozen
class DCNv2Params:
    """Parameters of the ``dcnv2`` technique.

    Args:
        num_layers: cross layers L (>= 1); each adds one order of feature
            crossing.
        low_rank: None for full-rank (N, N) cross matrices, else the rank r
            (>= 1) of ``U V``; the paper finds r close to N/4 keeps the
            quality of full rank.
        num_experts: 1 for one cross matrix per layer (full or low rank);
            K > 1 for the low-rank mixture of K experts (needs ``low_rank``).
        structure: ``"stacked"``: the cross output feeds the over-arch (the
            deep network); ``"parallel"``: it skips the over-arch and is
            concatenated with the over-arch's output (see the module doc).

    Example:
        >>> DCNv2Params(num_layers=2, low_rank=32, num_experts=4)
        DCNv2Params(num_layers=2, low_rank=32, num_experts=4, structure='stacked')
    """

    num_layers: int = attrs.field(default=3, validator=at_least(1), metadata={"search": [2, 3, 4]})
    low_rank: int | None = attrs.field(default=None, validator=at_least(1))
    num_experts: int = attrs.field(default=1, validator=[at_least(1), _experts_need_low_rank])
    structure: str = attrs.field(
        default="stacked", validator=one_of(*STRUCTURES), metadata={"search": ["stacked", "parallel"]}
    )


class DCNv2Branch(nn.Module):
    """The DCNv2 cross network over the flat feature embeddings.

    Args:
        num_features: F.
        embedding_dim: D.
        num_layers: cross layers (>= 1).
        low_rank: None for full rank, else the rank (>= 1).
        num_experts: experts per layer (>= 1; > 1 needs ``low_rank``).
        structure: ``"stacked"`` or ``"parallel"``; ``"parallel"`` sets
            ``to_task_arch``, so the template concatenates the output after
            the over-arch's instead of feeding the over-arch with it.
        device: where to make the parameters.

    Shapes:
        forward: (B, F, D) -> (B, F*D)

    Example:
        >>> _ = torch.manual_seed(0)
        >>> branch = DCNv2Branch(3, 4, num_layers=2, low_rank=2, num_experts=3)
        >>> branch(torch.randn(5, 3, 4)).shape
        torch.Size([5, 12])
        >>> branch.out_dim, type(branch.cross).__name__, branch.to_task_arch
        (12, 'LowRankMixtureCrossNet', False)
        >>> DCNv2Branch(3, 4, structure="parallel").to_task_arch
        True
    """

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        *,
        num_layers: int = 3,
        low_rank: int | None = None,
        num_experts: int = 1,
        structure: str = "stacked",
        device: Any = None,
    ) -> None:
        super().__init__()
        if num_features < 1 or embedding_dim < 1:
            raise ValueError(f"num_features and embedding_dim must be >= 1, got {num_features} and {embedding_dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if low_rank is not None and low_rank < 1:
            raise ValueError(f"low_rank must be None or >= 1, got {low_rank}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if num_experts > 1 and low_rank is None:
            raise ValueError(f"num_experts={num_experts} needs low_rank (the mixture's experts are low rank), got None")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {', '.join(map(repr, STRUCTURES))}, got {structure!r}")
        n = num_features * embedding_dim
        cross: nn.Module
        if num_experts > 1:
            cross = LowRankMixtureCrossNet(n, num_layers, num_experts=num_experts, low_rank=low_rank)
        elif low_rank is not None:
            cross = LowRankCrossNet(n, num_layers, low_rank=low_rank)
        else:
            cross = CrossNet(n, num_layers)
        self.cross = cross.to(device) if device is not None else cross
        self.in_features = n
        self.out_dim = n
        self.structure = structure
        #: the template's routing: True puts the output beside the over-arch's (parallel)
        self.to_task_arch = structure == "parallel"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.cross(features.flatten(1))


@technique(name="dcnv2", slot="interaction", params=DCNv2Params)
class DCNv2:
    """DCNv2 cross network over the flat embeddings, stacked or parallel (Wang et al., WWW 2021)."""

    @hookimpl
    def smt_interaction(self, ctx: SlotContext, params: DCNv2Params) -> nn.Module:
        return DCNv2Branch(
            ctx.num_features,
            ctx.embedding_dim,
            num_layers=params.num_layers,
            low_rank=params.low_rank,
            num_experts=params.num_experts,
            structure=params.structure,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [DCNv2()]
