"""Serving cost per example and capacity-neutral scaling.

FLOPs are measured on the built module with ``torch.utils.flop_counter``
(embedding lookups count 0 FLOPs there; their cost shows as embedding bytes),
on :func:`~smt_host.model.template.example_batch`, whose histories hold
``max_length`` ids each: a sequence technique is counted at full length.
"""

from __future__ import annotations

from collections.abc import Callable

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
        flops: FLOPs per example of a forward pass (every member).
        dense_params: parameters outside the embedding tables.
        embedding_params: rows x dims of all tables.
        embedding_bytes: float32 bytes of all tables.
        parts: FLOPs per example by ``"slot:technique"``: each part of the
            first member (:meth:`TemplateModel.parts`), and the ensemble
            slot's technique with what the model costs beyond that member
            (0 for one network).
    """

    flops: float
    dense_params: int
    embedding_params: int
    embedding_bytes: int
    parts: dict[str, float] = attrs.Factory(dict)


def measure(model: nn.Module, spec: ModelSpec, combiner: str = "") -> Cost:
    """Counts FLOPs per example and parameters of a built model (a module
    with ``members``, see :func:`smt_host.model.template.build_model`).

    ``combiner`` names the ensemble slot's technique, whose part is the
    model's FLOPs beyond its first member.
    """
    from smt_host.model.template import example_batch

    batch = example_batch(spec, FLOP_BATCH)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(batch.dense, batch.sparse)
    model.train(was_training)
    # keys are "<root class>.<qualified name>"; the root itself is "<root class>"
    counts = {
        (name.split(".", 1)[1] if "." in name else ""): sum(c.values()) / FLOP_BATCH
        for name, c in counter.get_flop_counts().items()
        if name != "Global"
    }
    names = {id(m): n for n, m in model.named_modules()}

    def flops_of(module: nn.Module) -> float:
        name = names[id(module)]
        if name in counts:
            return counts[name]
        return float(sum(flops_of(child) for child in module.children()))  # a container that is not called itself

    flops = counter.get_total_flops() / FLOP_BATCH
    first = model.members[0]
    parts = {f"{slot}:{technique}": flops_of(module) for (slot, technique), module in first.parts().items()}
    if combiner:
        parts[f"ensemble:{combiner}"] = flops - flops_of(first)
    tables = [p for m in model.members for p in m.embedding.parameters()]
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
    flops_at: Callable[[float], float],
    budget: float,
    tolerance: float,
    *,
    max_steps: int = 40,
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
