"""smt technique ``embedding_reg``: L2 regularization of the embedding rows
looked up in each batch.

As the BARS benchmark applies it (Jieming Zhu, Quanyu Dai, Liangcai Su,
Rong Ma, Jinyang Liu, Guohao Cai, Xi Xiao, Rui Zhang. "BARS: Towards Open
Benchmarking for Recommender Systems", SIGIR 2022; its FuxiCTR models take
an ``embedding_regularizer``)::

    loss = base_loss + weight * sum_{lookups (f, i) in the batch} ||E_f[i]||_2^2

The sum runs over every id of every sparse feature of the batch (B x F ids
for single-valued features, each with its multiplicity), or over the
distinct rows when ``unique`` is set. Rows never looked up are not
regularized, so the cost is O(B F D), not O(table size).

Shapes: B batch, F sparse features, D embedding dim.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host import LossFn, LossInputs, SlotContext, at_least, hookimpl, technique


@attrs.frozen
class EmbeddingRegParams:
    """Parameters of ``embedding_reg``.

    Args:
        weight: the regularization weight (lambda >= 0).
        unique: count each looked-up row once per batch instead of once per
            lookup.
    """

    weight: float = attrs.field(default=1e-6, validator=at_least(0.0), metadata={"search": [1e-7, 1e-6, 1e-5]})
    unique: bool = False


def embedding_l2(model: Any, sparse: KeyedJaggedTensor, *, unique: bool = False) -> torch.Tensor:
    """Sum of squared L2 norms of the embedding rows the batch looks up.

    Runs the model's feature transforms first (so techniques that split a
    feature into several id streams are regularized on the tables they use).

    Args:
        model: a ``TemplateModel`` (``model.embedding`` a torchrec
            ``EmbeddingBagCollection``, ``model.feature_transforms``).
        sparse: the batch's ``KeyedJaggedTensor``.
        unique: count each row once.

    Returns:
        a scalar tensor, differentiable w.r.t. the tables.

    Example:
        >>> from smt_host import Host, example_batch
        >>> host = Host.create(load="")
        >>> spec = host.default_ecosystem().model("feed_ctr")
        >>> model = host.build(host.plan(spec), spec).members[0]
        >>> embedding_l2(model, example_batch(spec).sparse).dim()
        0
    """
    for transform in getattr(model, "feature_transforms", ()):
        sparse = transform(sparse)
    by_key = sparse.to_dict()
    ebc = model.embedding
    total: torch.Tensor | None = None
    for config in ebc.embedding_bag_configs():
        weight = ebc.embedding_bags[config.name].weight
        for feature in config.feature_names:
            if feature not in by_key:
                continue
            ids = by_key[feature].values().long()
            if unique:
                ids = torch.unique(ids)
            term = weight.index_select(0, ids).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        total = torch.zeros((), device=sparse.values().device)
    return total


@technique(name="embedding_reg", slot="loss", params=EmbeddingRegParams)
class EmbeddingReg:
    """L2 penalty on the embedding rows looked up in each batch (BARS / FuxiCTR embedding_regularizer)."""

    @hookimpl
    def smt_loss(self, ctx: SlotContext, params: EmbeddingRegParams, loss: LossFn | None) -> LossFn:
        weight, unique = params.weight, params.unique

        def regularized(inputs: LossInputs) -> torch.Tensor:
            term = weight * embedding_l2(inputs.model, inputs.batch.sparse, unique=unique)
            return term if loss is None else loss(inputs) + term

        return regularized


@hookimpl
def smt_techniques() -> list:
    return [EmbeddingReg()]
