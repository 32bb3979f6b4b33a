"""smt technique ``qr_embedding``: quotient-remainder compositional embeddings.

Hao-Jun Michael Shi, Dheevatsa Mudigere, Maxim Naumov, Jiyan Yang.
"Compositional Embeddings Using Complementary Partitions for
Memory-Efficient Recommendation Systems", KDD 2020 (Meta).

A sparse feature f with a large vocabulary V is served by two small tables
instead of one V x D table: with m remainder rows (the paper's
quotient-remainder trick, two complementary partitions of the ids),

    id i -> q = i // m  (table ``f__q``, ceil(V / m) rows)
            r = i %  m  (table ``f__r``, m rows)
    e(i) = W_q[q] + W_r[r]          (op "add", the default)
         = W_q[q] * W_r[r]          (op "mult", element-wise)

The paper combines the two by concatenation, addition or element-wise
multiplication; concatenation would change D, which the embedding slot
keeps. (q, r) is unique per id, so every id keeps a distinct embedding while
the tables hold (ceil(V/m) + m) x D numbers instead of V x D: about
2 sqrt(V) x D with the default m = ceil(sqrt(V)). Pooled (multi-valued)
features combine the two pooled vectors, as the paper's ``QREmbeddingBag``
does.

Initialisation, so that neither op stalls: ``add`` gives each table
``init_std / sqrt(2)``; for ``mult`` the quotient table stores
E_q = W_q - 1, so W_q starts at 1 (the identity of the product) and
e(i) = (1 + E_q[q]) * W_r[r] starts as the remainder row, which starts like
a row of the unsplit table (the spec's ``embedding_init_std``). Version 0.1
started both factors of the product small (std sqrt(s) each, s = 1e-4 on
Frappe): each factor's data gradient is scaled by the other factor (1e-2),
while L2 on the tables (``embedding_weight_decay``, 0.1 in the BARS recipe)
pulls each factor with lambda * 1e-2, 1e2 times the pull on a row of std s:
L2 won, the product decayed to zero and the model stayed at AUC 0.5.
``add`` is the default because L2 on two summed tables is L2 on their sum,
while L2 on the two factors of a product acts like an L1 penalty on it and
still holds W_q near 1 when the rows are small.

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
        min_vocab: features whose vocabulary is above this are split (if the
            split saves rows, see :func:`saves_rows`).
        num_collisions: m, rows of each remainder table (ids sharing a
            quotient row); unset: ceil(sqrt(V)) per feature, the smallest
            total ceil(V/m) + m.
        op: how the two embeddings combine: ``add`` (the default: each table
            gets the gradient of the embedding itself, and L2 on the tables
            is L2 on a sum) or ``mult`` (the element-wise product; L2 on
            the two factors of a product acts like an L1 penalty on it, and
            holds the quotient factor near 1 when the rows are small: on
            Frappe with the BARS recipe's
            ``embedding_weight_decay = 0.1``, valid AUC 0.786 after 2 epochs
            against 0.931 for ``add`` and 0.952 for the unsplit table).
    """

    min_vocab: int = attrs.field(default=1000, validator=at_least(1))
    num_collisions: int | None = attrs.field(default=None, validator=at_least(2))
    op: str = attrs.field(default="add", validator=one_of("add", "mult"))


def collisions(vocab: int, params: QRParams) -> int:
    """m for a feature of ``vocab`` ids.

    >>> collisions(4082, QRParams()), collisions(4082, QRParams(num_collisions=4))
    (64, 4)
    """
    return params.num_collisions or math.ceil(math.sqrt(vocab))


def split_rows(vocab: int, m: int) -> int:
    """Rows of the two tables that replace a table of ``vocab`` rows: ceil(V/m) + m.

    >>> split_rows(4082, 64), split_rows(20000, 142)
    (128, 283)
    """
    return math.ceil(vocab / m) + m


def saves_rows(vocab: int, m: int) -> bool:
    """Whether splitting a table of ``vocab`` rows with m remainder rows gives
    two tables with fewer rows than it (the only thing QR can gain: memory;
    a table it cannot shrink, it can only make worse).

    >>> saves_rows(4082, 64), saves_rows(6, 4), saves_rows(10, 3)
    (True, False, True)
    """
    return split_rows(vocab, m) < vocab


def part_init_std(init_std: float | None, op: str) -> tuple[float | None, float | None]:
    """(quotient, remainder) table stds such that their combination starts
    with the std the spec asks for (``features.embedding_init_std``).

    ``mult``: the remainder table gets ``init_std``, and the quotient table,
    which stores E_q = W_q - 1, the same (W_q = 1 + N(0, init_std^2) is 1 up
    to a tiny jitter), so the product starts as the remainder row, with std
    ``init_std``. ``add``: each table ``init_std / sqrt(2)`` (a sum of two
    independent N(0, a^2) has std a sqrt(2)). None: torchrec's default for
    both.

    >>> part_init_std(1e-4, "mult"), [round(s, 9) for s in part_init_std(1e-4, "add")]
    ((0.0001, 0.0001), [7.0711e-05, 7.0711e-05])
    """
    if init_std is None:
        return None, None
    if op == "mult":
        return init_std, init_std
    return init_std / math.sqrt(2), init_std / math.sqrt(2)


def split_features(model: Any, params: QRParams) -> dict[str, int]:
    """{feature: m} for every sparse feature of the spec with more than
    ``min_vocab`` ids whose split saves rows."""
    out = {}
    for f in model.features.sparse:
        m = collisions(f.vocab_size, params)
        if f.vocab_size > params.min_vocab and saves_rows(f.vocab_size, m):
            out[f.name] = m
    return out


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

    With ``q`` = the pooled rows of ``f__q`` (which store E_q = W_q - 1 for
    ``mult``) and ``r`` those of ``f__r``::

        mult: out = (1 + q) * r        (W_q * W_r of one id)
        add:  out = q + r

    For a bag of L ids with mean pooling, ``mult`` is the paper's
    ``QREmbeddingBag`` (the product of the two pooled vectors); with sum
    pooling the quotient factor is 1 + sum E_q rather than L + sum E_q.

    Args:
        features: names of the split features.
        op: ``mult`` or ``add``.

    Shapes:
        forward: dict with f__q, f__r (B, D) (and other keys) -> dict with f (B, D)

    Example:
        >>> t = QRPooledTransform(["u"], "mult")
        >>> out = t({"a": torch.ones(2, 3), "u__q": torch.full((2, 3), 2.0), "u__r": torch.full((2, 3), 3.0)})
        >>> sorted(out), out["u"][0].tolist()
        (['a', 'u'], [9.0, 9.0, 9.0])
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
            q, r = pooled[f + Q], pooled[f + R]  # (B, D) each
            out[f] = (1.0 + q) * r if self.op == "mult" else q + r  # (B, D)
        return out


def _params(model: Any) -> QRParams:
    """The spec's ``min_vocab`` and ``num_collisions`` for ``applies`` (which
    sees the raw spec table); values the converter will refuse fall back to
    the defaults here and are reported by the converter."""
    override = model.techniques.get("qr_embedding")
    if not isinstance(override, dict):
        return QRParams()
    ints = {k: v for k, v in override.items() if k in ("min_vocab", "num_collisions") and type(v) is int}
    try:
        return QRParams(**ints)
    except ValueError:
        return QRParams()


def _applies(model: Any) -> bool | str:
    params = _params(model)
    big = [f for f in model.features.sparse if f.vocab_size > params.min_vocab]
    if not big:
        return f"no sparse feature has more than {params.min_vocab} ids (min_vocab)"
    if not split_features(model, params):
        sizes = [
            f"{f.name} {f.vocab_size} -> {split_rows(f.vocab_size, collisions(f.vocab_size, params))}" for f in big
        ]
        listed = ", ".join(sizes[:3]) + (f", ... ({len(sizes)} features)" if len(sizes) > 3 else "")
        return f"no table would shrink: its two tables would have as many rows or more (rows {listed})"
    return True


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
            q_std, r_std = part_init_std(t.init_std, params.op)  # mult: f__q stores E_q = W_q - 1
            out.append(
                TableSpec(
                    name=t.name + Q,
                    feature_names=[f + Q for f in mine],
                    num_embeddings=math.ceil(t.num_embeddings / m),
                    embedding_dim=t.embedding_dim,
                    pooling=t.pooling,
                    init_std=q_std,
                )
            )
            out.append(
                TableSpec(
                    name=t.name + R,
                    feature_names=[f + R for f in mine],
                    num_embeddings=m,
                    embedding_dim=t.embedding_dim,
                    pooling=t.pooling,
                    init_std=r_std,
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
