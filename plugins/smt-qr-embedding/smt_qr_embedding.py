"""smt technique ``qr_embedding``: quotient-remainder compositional embeddings.

Hao-Jun Michael Shi, Dheevatsa Mudigere, Maxim Naumov, Jiyan Yang.
"Compositional Embeddings Using Complementary Partitions for
Memory-Efficient Recommendation Systems", KDD 2020 (Meta).

A sparse feature f with a large vocabulary V is served by two small tables
instead of one V x D table: with m remainder rows,

    id i -> q = i // m  (table ``f__q``, ceil(V / m) rows)
            r = i %  m  (table ``f__r``, m rows)
    e(i) = E_q[q] * E_r[r]          (op "mult", the paper's element-wise product)
         = E_q[q] + E_r[r]          (op "add")

(q, r) is unique per id, so every id keeps a distinct embedding while the
tables hold (ceil(V/m) + m) x D numbers instead of V x D: about 2 sqrt(V) x D
with the default m = ceil(sqrt(V)). Pooled (multi-valued) features combine
the two pooled vectors, as the paper's ``QREmbeddingBag`` does.

The technique fills the embedding slot with three hooks:

* ``smt_embedding_tables``: the big feature's table -> tables ``f__q``, ``f__r``;
* ``smt_feature_transform``: KJT key f -> keys f__q (ids // m), f__r (ids % m);
* ``smt_pooled_transform``: {f__q: (B, D), f__r: (B, D)} -> {f: (B, D)}.

Shapes: B batch, D embedding dim, V vocabulary, m remainder rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host import SlotContext, TableSpec, at_least, hookimpl, one_of, technique

Q, R = "__q", "__r"


@attrs.frozen
class QRParams:
    """Parameters of ``qr_embedding``.

    Args:
        min_vocab: features whose vocabulary is above this are split.
        num_collisions: m, rows of each remainder table (ids sharing a
            quotient row); unset: ceil(sqrt(V)) per feature, the smallest
            total ceil(V/m) + m.
        op: how the two embeddings combine: ``mult`` (element-wise product,
            the paper's default) or ``add``.
    """

    min_vocab: int = attrs.field(default=1000, validator=at_least(1))
    num_collisions: int | None = attrs.field(default=None, validator=at_least(2))
    op: str = attrs.field(default="mult", validator=one_of("mult", "add"))


def collisions(vocab: int, params: QRParams) -> int:
    """m for a feature of ``vocab`` ids."""
    return params.num_collisions or math.ceil(math.sqrt(vocab))


def part_init_std(init_std: float | None, op: str) -> float | None:
    """The std of each of the two tables such that their combination starts
    with the std the spec asks for (``features.embedding_init_std``): a
    product of two independent N(0, a^2) has std a^2, a sum a sqrt(2).
    (Copying a tiny std such as 1e-4 to both tables of a product would start
    every embedding near 1e-8 with gradients near 1e-4 of the usual: the
    model does not learn.) None: torchrec's default for both.

    >>> part_init_std(1e-4, "mult"), round(part_init_std(1e-4, "add"), 9)
    (0.01, 7.0711e-05)
    """
    if init_std is None:
        return None
    return math.sqrt(init_std) if op == "mult" else init_std / math.sqrt(2)


def split_features(model: Any, params: QRParams) -> dict[str, int]:
    """{feature: m} for every sparse feature of the spec with vocab > min_vocab."""
    return {f.name: collisions(f.vocab_size, params) for f in model.features.sparse if f.vocab_size > params.min_vocab}


class QRFeatureTransform(nn.Module):
    """Splits the ids of big features into quotient and remainder streams.

    Args:
        collisions: {feature: m}; other keys pass through unchanged.

    Shapes:
        forward: KJT (keys k_1..k_F, B rows each) -> KJT (each split key f
        replaced by f__q with ids // m and f__r with ids % m, same lengths)

    Example:
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["a", "u"], values=torch.tensor([1, 2, 25, 7]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> out = QRFeatureTransform({"u": 10})(kjt)
        >>> out.keys(), out.values().tolist()
        (['a', 'u__q', 'u__r'], [1, 2, 2, 0, 5, 7])
    """

    def __init__(self, collisions: Mapping[str, int]) -> None:
        super().__init__()
        bad = {k: m for k, m in collisions.items() if m < 1}
        if bad:
            raise ValueError(f"every m must be >= 1, got {bad}")
        self.collisions = dict(collisions)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        by_key = kjt.to_dict()
        keys: list[str] = []
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        weighted = kjt.weights_or_none() is not None
        weights: list[torch.Tensor] = []
        for key in kjt.keys():
            jt = by_key[key]
            m = self.collisions.get(key)
            if m is None:
                parts = [(key, jt.values())]
            else:
                ids = jt.values()
                parts = [(key + Q, torch.div(ids, m, rounding_mode="floor")), (key + R, torch.remainder(ids, m))]
            for name, vals in parts:
                keys.append(name)
                values.append(vals)
                lengths.append(jt.lengths())
                if weighted:
                    weights.append(jt.weights())
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            weights=torch.cat(weights) if weighted else None,
        )


class QRPooledTransform(nn.Module):
    """Combines the pooled quotient and remainder embeddings of split features.

    Args:
        features: names of the split features.
        op: ``mult`` or ``add``.

    Shapes:
        forward: dict with f__q, f__r (B, D) (and other keys) -> dict with f (B, D)

    Example:
        >>> t = QRPooledTransform(["u"], "mult")
        >>> out = t({"a": torch.ones(2, 3), "u__q": torch.full((2, 3), 2.0), "u__r": torch.full((2, 3), 3.0)})
        >>> sorted(out), out["u"][0].tolist()
        (['a', 'u'], [6.0, 6.0, 6.0])
    """

    def __init__(self, features: list[str], op: str = "mult") -> None:
        super().__init__()
        if op not in ("mult", "add"):
            raise ValueError(f"op must be 'mult' or 'add', got {op!r}")
        self.features = list(features)
        self.op = op

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in pooled.items() if not (k.endswith(Q) or k.endswith(R)) or k[:-3] not in self.features}
        for f in self.features:
            q, r = pooled[f + Q], pooled[f + R]
            out[f] = q * r if self.op == "mult" else q + r
        return out


def _min_vocab(model: Any) -> int:
    override = model.techniques.get("qr_embedding")
    if isinstance(override, dict) and "min_vocab" in override:
        return override["min_vocab"]
    return QRParams().min_vocab


def _applies(model: Any) -> bool | str:
    threshold = _min_vocab(model)
    if isinstance(threshold, int) and any(f.vocab_size > threshold for f in model.features.sparse):
        return True
    return f"no sparse feature has more than {threshold} ids (min_vocab)"


@technique(name="qr_embedding", slot="embedding", params=QRParams, applies=_applies)
class QREmbedding:
    """Quotient-remainder compositional embeddings (Shi et al., KDD 2020) for big vocabularies."""

    @hookimpl
    def smt_embedding_tables(self, ctx: SlotContext, params: QRParams, tables: list[TableSpec]) -> list[TableSpec]:
        split = split_features(ctx.spec, params)
        out: list[TableSpec] = []
        for t in tables:
            mine = [f for f in t.feature_names if f in split]
            if not mine:
                out.append(t)
                continue
            if len(mine) != len(t.feature_names):
                raise ValueError(
                    f"qr_embedding: table {t.name!r} serves {list(t.feature_names)}, of which only {mine} "
                    f"have more than {params.min_vocab} ids; split all or none"
                )
            m = collisions(t.num_embeddings, params)
            std = part_init_std(t.init_std, params.op)
            out.append(
                TableSpec(
                    name=t.name + Q,
                    feature_names=[f + Q for f in mine],
                    num_embeddings=math.ceil(t.num_embeddings / m),
                    embedding_dim=t.embedding_dim,
                    pooling=t.pooling,
                    init_std=std,
                )
            )
            out.append(
                TableSpec(
                    name=t.name + R,
                    feature_names=[f + R for f in mine],
                    num_embeddings=m,
                    embedding_dim=t.embedding_dim,
                    pooling=t.pooling,
                    init_std=std,
                )
            )
        return out

    @hookimpl
    def smt_feature_transform(self, ctx: SlotContext, params: QRParams) -> nn.Module:
        return QRFeatureTransform(split_features(ctx.spec, params))

    @hookimpl
    def smt_pooled_transform(self, ctx: SlotContext, params: QRParams) -> nn.Module:
        return QRPooledTransform(list(split_features(ctx.spec, params)), params.op)


@hookimpl
def smt_techniques() -> list:
    return [QREmbedding()]
