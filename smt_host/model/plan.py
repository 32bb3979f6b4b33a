"""Spec + plugins -> plan: the inspectable description of one model.

A :class:`Plan` is pure data (attrs, unstructured to JSON by the host's
converter): for every slot the techniques with distribution, version and
parameters; widths; parameter count; FLOPs per example; the capacity budget
and the over-arch scale chosen to meet it; and the :class:`Manifest` a
checkpoint carries. :func:`build_from_plan` turns it back into a module.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import cattrs
from torch import nn

from smt_host.errors import CapacityError, ConfigError, ManifestMismatch
from smt_host.model.capacity import Cost, measure, neutral_scale
from smt_host.model.resolve import Active, Resolution, Skipped, resolve
from smt_host.model.template import base_context, build_model, members_of
from smt_host.plugins import SmtPluginManager
from smt_host.spec.converter import structure
from smt_host.spec.schema import ModelSpec


@attrs.frozen
class PlanEntry:
    """One technique in one slot of the plan."""

    slot: str
    technique: str
    dist: str
    version: str
    params: Optional[dict]
    out_dim: Optional[int] = None
    flops: float = 0.0


@attrs.frozen
class ManifestEntry:
    technique: str
    dist: str
    version: str
    params: Optional[dict]


@attrs.frozen
class Manifest:
    """The plugin set a plan was made with: every active technique with its
    distribution, version and parameters."""

    host: str
    techniques: tuple[ManifestEntry, ...]

    def diff(self, current: "Manifest") -> list[str]:
        """Differences from ``self`` (e.g. a checkpoint's) to ``current``."""
        old = {e.technique: e for e in self.techniques}
        new = {e.technique: e for e in current.techniques}
        out = []
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name), new.get(name)
            if b is None:
                out.append(f"technique {name!r} ({a.dist} {a.version}) was used but is not active now (not installed, disabled or opted out)")
            elif a is None:
                out.append(f"technique {name!r} ({b.dist} {b.version}) is active now but was not used")
            elif (a.dist, a.version) != (b.dist, b.version):
                out.append(f"technique {name!r}: {a.dist} {a.version} was used, {b.dist} {b.version} is installed")
            elif a.params != b.params:
                out.append(f"technique {name!r}: parameters were {a.params}, now {b.params}")
        return out


@attrs.frozen
class CapacityReport:
    """Budget (FLOPs per example, or None), how it was set (``none``,
    ``flops`` or ``baseline``), the FLOPs achieved and the over-arch scale."""

    mode: str
    budget: Optional[float]
    achieved: float
    scale: float
    tolerance: float


@attrs.frozen
class Plan:
    """The resolved description of one model. Pure data."""

    model: str
    entries: tuple[PlanEntry, ...]
    skipped: tuple[Skipped, ...]
    widths: dict[str, Any]
    cost: Cost
    capacity: CapacityReport
    manifest: Manifest
    seed: int

    def slot(self, slot: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.slot == slot]

    def techniques(self) -> list[str]:
        return [e.technique for e in self.entries]


def _params_dict(conv: cattrs.Converter, params: Any) -> Optional[dict]:
    return None if params is None else conv.unstructure(params)


def _manifest(spm: SmtPluginManager, res: Resolution, conv: cattrs.Converter) -> Manifest:
    from smt_host.plugins import HOST_DIST

    return Manifest(
        host=spm.distributions[HOST_DIST],
        techniques=tuple(ManifestEntry(a.name, a.dist, a.version, _params_dict(conv, a.params)) for a in res.active),
    )


def _external(res: Resolution) -> list[Active]:
    from smt_host.plugins import HOST_DIST

    return [a for a in res.active if a.dist != HOST_DIST]


def make_plan(
    spec: ModelSpec, spm: SmtPluginManager, conv: cattrs.Converter, *,
    builtins_only: bool = False, without: frozenset[str] = frozenset(),
    only: Optional[frozenset[str]] = None, budget: Any = ..., seed: Optional[int] = None,
) -> Plan:
    """Plans ``spec`` with the installed techniques.

    ``budget`` overrides the spec's capacity budget (None: no budget,
    "baseline", or FLOPs). ``seed`` overrides ``spec.training.seed``.
    """
    res = resolve(spec, spm, conv, builtins_only=builtins_only, without=without, only=only)
    seed = spec.training.seed if seed is None else seed
    budget = spec.capacity.budget if budget is ... else budget
    tolerance = spec.capacity.tolerance

    def flops_at(scale: float) -> float:
        return measure(build_model(spec, res, spm, width_scale=scale, seed=seed), spec).flops

    if budget is None:
        mode, target, scale = "none", None, 1.0
    else:
        if budget == "baseline":
            mode = "baseline"
            base = resolve(spec, spm, conv, builtins_only=True)
            target = measure(build_model(spec, base, spm, seed=seed), spec).flops
        else:
            mode, target = "flops", float(budget)
        try:
            scale = neutral_scale(flops_at, target, tolerance).scale
        except CapacityError as exc:
            smallest = build_model(spec, res, spm, width_scale=1 / 64, seed=seed)
            parts = measure(smallest, spec).parts
            costly = sorted(
                ((parts.get(f"branches.{a.name}", 0.0), a) for a in _external(res)),
                key=lambda x: -x[0],
            )
            named = "; ".join(f"{a.name} ({a.dist} {a.version}) needs {f:,.0f} FLOPs per example" for f, a in costly if f > 0)
            raise CapacityError(
                f"model {spec.name!r} cannot meet its capacity budget: {exc}"
                + (f". Costliest techniques: {named}" if named else "")
                + f" @ $.models.{spec.name}.capacity.budget"
            ) from None

    built = build_model(spec, res, spm, width_scale=scale, seed=seed)
    cost = measure(built, spec)
    members = members_of(built)
    model = members[0]  # widths and per-technique FLOPs are one member's
    entries = []
    for a in res.active:
        out_dim = None
        flops = 0.0
        if a.slot == "interaction":
            out_dim = model.branches[a.name].out_dim
            flops = cost.parts.get(f"branches.{a.name}", 0.0)
        elif a.slot == "dense_arch" and model.dense_arch is not None:
            out_dim, flops = model.dense_arch.out_dim, cost.parts.get("dense_arch", 0.0)
        elif a.slot == "over_arch":
            out_dim, flops = model.over_arch.out_dim, cost.parts.get("over_arch", 0.0)
        elif a.slot == "task_arch":
            flops = cost.parts.get("task_arch", 0.0)
        elif a.slot == "heads":
            flops = sum(v for k, v in cost.parts.items() if k.startswith("heads."))
        elif a.slot == "ensemble":
            flops = cost.parts.get("ensemble", 0.0)
        entries.append(PlanEntry(a.slot, a.name, a.dist, a.version, _params_dict(conv, a.params), out_dim, flops))
    ctx = base_context(spec)
    widths = {
        "embedding_dim": ctx.embedding_dim,
        "num_features": ctx.num_features,
        "num_dense": ctx.num_dense,
        "interaction": sum(model.branches[n].out_dim for n in model.deep_branches),
        "over_arch": model.over_arch.out_dim,
        "task_arch": list(model.task_arch.out_dims),
        "tables": len(model.embedding.embedding_bag_configs()),
    }
    if built is not model:
        widths["members"] = len(members)
    capacity = CapacityReport(mode=mode, budget=target, achieved=cost.flops, scale=scale, tolerance=tolerance)
    return Plan(
        model=spec.name, entries=tuple(entries), skipped=res.skipped, widths=widths, cost=cost,
        capacity=capacity, manifest=_manifest(spm, res, conv), seed=seed,
    )


def resolution_from_plan(plan: Plan, spm: SmtPluginManager, conv: cattrs.Converter) -> Resolution:
    """Rebuilds the resolution from a plan's entries, refusing a plugin set
    that differs from the plan's manifest."""
    problems = []
    active = []
    for e in plan.entries:
        reg = spm.techniques.get(e.technique)
        if reg is None:
            problems.append(f"technique {e.technique!r} ({e.dist} {e.version}) is not installed")
            continue
        if (reg.dist, reg.version) != (e.dist, e.version):
            problems.append(f"technique {e.technique!r}: plan has {e.dist} {e.version}, installed is {reg.dist} {reg.version}")
            continue
        params = None
        if reg.info.params is not None:
            params = structure(conv, e.params or {}, reg.info.params, f"$.plan.{e.technique}")
        active.append(Active(e.technique, e.slot, e.dist, e.version, params))
    if problems:
        raise ManifestMismatch(f"plan of model {plan.model!r} was made with another plugin set: " + "; ".join(problems))
    return Resolution(model=plan.model, active=tuple(active), skipped=plan.skipped)


def build_from_plan(plan: Plan, spec: ModelSpec, spm: SmtPluginManager, conv: cattrs.Converter, device: Any = "cpu") -> nn.Module:
    """The model a plan describes (same seed: same weights): a
    ``TemplateModel``, or an ensemble of them (see ``smt_ensemble``)."""
    res = resolution_from_plan(plan, spm, conv)
    return build_model(spec, res, spm, width_scale=plan.capacity.scale, device=device, seed=plan.seed)


def plan_to_dict(plan: Plan, conv: cattrs.Converter) -> dict:
    return conv.unstructure(plan)


def plan_from_dict(data: dict, conv: cattrs.Converter) -> Plan:
    try:
        return conv.structure(data, Plan)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError([f"not a valid plan: {exc}"]) from None
