"""Serving cost per example and capacity-neutral scaling.

FLOPs are measured on the built module with ``torch.utils.flop_counter``
(embedding lookups count 0 FLOPs there; their cost shows as embedding bytes).
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from smt_host.errors import CapacityError
from smt_host.spec.schema import ModelSpec

#: batch used to count FLOPs (the count is divided by it)
FLOP_BATCH = 8


@attrs.frozen
class Cost:
    """Serving cost of one model.

    Args:
        flops: FLOPs per example of a forward pass.
        dense_params: parameters outside the embedding tables.
        embedding_params: rows x dims of all tables.
        embedding_bytes: float32 bytes of all tables.
        parts: FLOPs per example by top-level part (``branches.dcnv2``, ``over_arch``...).
    """

    flops: float
    dense_params: int
    embedding_params: int
    embedding_bytes: int
    parts: dict[str, float] = attrs.Factory(dict)


def measure(model: nn.Module, spec: ModelSpec) -> Cost:
    """Counts FLOPs per example and parameters of a built model.

    ``parts`` are a ``TemplateModel``'s; for an ensemble they are its first
    member's, plus ``ensemble``: the FLOPs of the other members and the
    combination (the total less one member).
    """
    from smt_host.model.template import example_batch, members_of

    batch = example_batch(spec, FLOP_BATCH)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=3)
    with torch.no_grad(), counter:
        model(batch.dense, batch.sparse)
    model.train(was_training)
    parts: dict[str, float] = {}
    for name, counts in counter.get_flop_counts().items():
        pieces = name.split(".")
        if len(pieces) == 2 and pieces[0] != "Global":
            key = pieces[1]
        elif len(pieces) == 3 and pieces[1] in ("branches", "heads"):
            key = f"{pieces[1]}.{pieces[2]}"
        else:
            continue
        parts[key] = parts.get(key, 0.0) + sum(counts.values()) / FLOP_BATCH
    flops = counter.get_total_flops() / FLOP_BATCH
    members = members_of(model)
    if members != [model]:
        first = measure(members[0], spec)
        parts = {**first.parts, "ensemble": flops - first.flops}
    tables = [p for m in members for p in m.embedding.parameters()]
    emb = sum(p.numel() for p in tables)
    total = sum(p.numel() for p in model.parameters())
    return Cost(
        flops=flops,
        dense_params=total - emb,
        embedding_params=emb,
        embedding_bytes=sum(p.numel() * p.element_size() for p in tables),
        parts={k: parts[k] for k in sorted(parts)},
    )


@attrs.frozen
class Scaled:
    """Result of neutral scaling: the chosen over-arch scale and the FLOPs it gives."""

    scale: float
    flops: float
    steps: int


MIN_SCALE = 1 / 64
MAX_SCALE = 16.0


def neutral_scale(
    flops_at: Callable[[float], float], budget: float, tolerance: float, *, max_steps: int = 40,
) -> Scaled:
    """Finds an over-arch width scale whose FLOPs land within ``tolerance``
    (relative) of ``budget`` by bisection on log(scale).

    ``flops_at(scale)`` builds the model at that scale and measures it; it
    must grow with the scale. Raises :class:`CapacityError` when even the
    smallest scale exceeds the budget, or the largest cannot reach it.
    """
    import math

    def ok(f: float) -> bool:
        return abs(f - budget) <= tolerance * budget

    f1 = flops_at(1.0)
    if ok(f1):
        return Scaled(1.0, f1, 1)
    lo, hi = math.log(MIN_SCALE), math.log(MAX_SCALE)
    f_lo = flops_at(MIN_SCALE)
    if f_lo > budget * (1 + tolerance):
        raise CapacityError(
            f"even with the over-arch at 1/{int(1 / MIN_SCALE)} of its width the model needs "
            f"{f_lo:,.0f} FLOPs per example, over the budget of {budget:,.0f}"
        )
    best = (abs(f1 - budget), 1.0, f1)
    if f1 < budget:
        lo = 0.0
    else:
        hi = 0.0
    steps = 2
    while steps < max_steps:
        mid = (lo + hi) / 2
        scale = math.exp(mid)
        f = flops_at(scale)
        steps += 1
        if abs(f - budget) < best[0]:
            best = (abs(f - budget), scale, f)
        if ok(f):
            return Scaled(scale, f, steps)
        if f < budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    _, scale, f = best
    if not ok(f):
        raise CapacityError(
            f"no over-arch scale in [1/{int(1 / MIN_SCALE)}, {MAX_SCALE:g}] lands within "
            f"{tolerance:.0%} of the budget {budget:,.0f} FLOPs (closest: {f:,.0f} at scale {scale:.3f})"
        )
    return Scaled(scale, f, steps)
