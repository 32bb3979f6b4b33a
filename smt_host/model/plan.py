"""Spec + plugins -> plan: the inspectable description of one model.

A :class:`Plan` is pure data (attrs, unstructured to JSON by the host's
converter): for every slot the techniques with distribution, version and
parameters; widths; parameter count; FLOPs per example; the capacity budget
and the over-arch scale chosen to meet it; and the :class:`Manifest` a
checkpoint carries. :func:`build_from_plan` turns it back into a module.
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
from torch import nn

from smt_host.errors import CapacityError, ConfigError, ManifestMismatch
from smt_host.model.capacity import Cost, measure, neutral_scale
from smt_host.model.resolve import ActiveTechnique, Resolution, SkippedTechnique, resolve
from smt_host.model.template import base_context, build_loss, build_model, build_optimizers
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
    params: dict | None
    out_dim: int | None = None
    flops: float = 0.0


@attrs.frozen
class ManifestEntry:
    """One active technique: distribution, version, parameters, and whether
    it shapes the saved and exported model (``shapes_model``; True in
    manifests written before it was recorded, so nothing is assumed away)."""

    technique: str
    dist: str
    version: str
    params: dict | None
    shapes_model: bool = True


@attrs.frozen
class Manifest:
    """The plugin set a plan was made with: every active technique with its
    distribution, version and parameters."""

    host: str
    techniques: tuple[ManifestEntry, ...]

    def shaping(self) -> Manifest:
        """The entries that shape the saved and exported model: what export
        and serving compare (a training-only technique, such as a loss term,
        need not be installed to export a run it trained).

        Example:
            >>> m = Manifest("0.3.0", (ManifestEntry("flat", "smt-host", "0.3.0", None),
            ...                        ManifestEntry("l2", "smt-l2", "1.0", None, shapes_model=False)))
            >>> [e.technique for e in m.shaping().techniques]
            ['flat']
        """
        return attrs.evolve(self, techniques=tuple(e for e in self.techniques if e.shapes_model))

    def check(self, current: Manifest, where: str, doing: str) -> None:
        """Raises :class:`ManifestMismatch` naming every difference from
        ``self`` (what a plan, checkpoint, export or lock recorded) to
        ``current`` (what is installed, or what a run now plans): the one
        comparison behind build, resume, export and ``--locked``.

        ``where`` names the file or model, ``doing`` what cannot be done
        (``"cannot resume"``...)."""
        diff = self.diff(current)
        if diff:
            raise ManifestMismatch(f"{where}: {doing}: it was made under another plugin set: " + "; ".join(diff))

    def diff(self, current: Manifest) -> list[str]:
        """Differences from ``self`` (e.g. a checkpoint's) to ``current``."""
        old = {e.technique: e for e in self.techniques}
        new = {e.technique: e for e in current.techniques}
        out = []
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name), new.get(name)
            if b is None:
                out.append(
                    f"technique {name!r} ({a.dist} {a.version}) was used but is not active now (not installed, disabled or opted out)"
                )
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
    budget: float | None
    achieved: float
    scale: float
    tolerance: float


@attrs.frozen
class Plan:
    """The resolved description of one model. Pure data."""

    model: str
    entries: tuple[PlanEntry, ...]
    skipped: tuple[SkippedTechnique, ...]
    widths: dict[str, Any]
    cost: Cost
    capacity: CapacityReport
    manifest: Manifest
    seed: int

    def slot(self, slot: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.slot == slot]

    def techniques(self) -> list[str]:
        return [e.technique for e in self.entries]


def _params_dict(conv: cattrs.Converter, params: Any) -> dict | None:
    return None if params is None else conv.unstructure(params)


def _manifest(spm: SmtPluginManager, res: Resolution, conv: cattrs.Converter) -> Manifest:
    from smt_host.plugins import HOST_DIST

    return Manifest(
        host=spm.distributions[HOST_DIST],
        techniques=tuple(
            ManifestEntry(
                a.name,
                a.dist,
                a.version,
                _params_dict(conv, a.params),
                shapes_model=spm.techniques[a.name].shapes_model,
            )
            for a in res.active
        ),
    )


def _external(res: Resolution) -> list[ActiveTechnique]:
    from smt_host.plugins import HOST_DIST

    return [a for a in res.active if a.dist != HOST_DIST]


def make_plan(
    spec: ModelSpec,
    spm: SmtPluginManager,
    conv: cattrs.Converter,
    *,
    builtins_only: bool = False,
    without: frozenset[str] = frozenset(),
    only: frozenset[str] | None = None,
    budget: Any = ...,
    seed: int | None = None,
) -> Plan:
    """Plans ``spec`` with the installed techniques.

    ``budget`` overrides the spec's capacity budget (None: no budget,
    "baseline", or FLOPs). ``seed`` overrides ``spec.training.seed``.
    """
    res = resolve(spec, spm, conv, builtins_only=builtins_only, without=without, only=only)
    seed = spec.training.seed if seed is None else seed
    budget = spec.capacity.budget if budget is ... else budget
    tolerance = spec.capacity.tolerance

    combiner = res.slot("ensemble")[0].name

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
            parts = measure(smallest, spec, combiner).parts
            costly = sorted(((parts.get(f"{a.slot}:{a.name}", 0.0), a) for a in _external(res)), key=lambda x: -x[0])
            named = "; ".join(
                f"{a.name} ({a.dist} {a.version}) needs {f:,.0f} FLOPs per example" for f, a in costly if f > 0
            )
            raise CapacityError(
                f"model {spec.name!r} cannot meet its capacity budget: {exc}"
                + (f". Costliest techniques: {named}" if named else "")
                + f" @ $.models.{spec.name}.capacity.budget"
            ) from None

    built = build_model(spec, res, spm, width_scale=scale, seed=seed)
    cost = measure(built, spec, combiner)
    parts = built.members[0].parts()  # widths and per-technique FLOPs are one member's
    entries = []
    for a in res.active:
        out_dim = getattr(parts.get((a.slot, a.name)), "out_dim", None)
        flops = cost.parts.get(f"{a.slot}:{a.name}", 0.0)
        entries.append(PlanEntry(a.slot, a.name, a.dist, a.version, _params_dict(conv, a.params), out_dim, flops))
    ctx = base_context(spec)
    first = built.members[0]
    widths = {
        "embedding_dim": ctx.embedding_dim,
        "num_features": ctx.num_features,
        "num_dense": ctx.num_dense,
        "interaction": sum(parts[("interaction", n)].out_dim for n in first.deep_branches),
        "over_arch": parts[("over_arch", res.slot("over_arch")[0].name)].out_dim,
        "task_arch": list(parts[("task_arch", res.slot("task_arch")[0].name)].out_dims),
        "tables": len(first.embedding.embedding_bag_configs()),
        "members": len(built.members),
    }
    capacity = CapacityReport(mode=mode, budget=target, achieved=cost.flops, scale=scale, tolerance=tolerance)
    return Plan(
        model=spec.name,
        entries=tuple(entries),
        skipped=res.skipped,
        widths=widths,
        cost=cost,
        capacity=capacity,
        manifest=_manifest(spm, res, conv),
        seed=seed,
    )


def installed_manifest(spm: SmtPluginManager, recorded: Manifest) -> Manifest:
    """The manifest the installed plugins give the techniques of ``recorded``
    (same parameters; a technique that is not installed is left out)."""
    from smt_host.plugins import HOST_DIST

    entries = tuple(
        ManifestEntry(
            e.technique,
            spm.techniques[e.technique].dist,
            spm.techniques[e.technique].version,
            e.params,
            shapes_model=e.shapes_model,
        )
        for e in recorded.techniques
        if e.technique in spm.techniques
    )
    return Manifest(host=spm.distributions[HOST_DIST], techniques=entries)


def resolution_from_plan(
    plan: Plan, spm: SmtPluginManager, conv: cattrs.Converter, *, shaping_only: bool = False
) -> Resolution:
    """The resolution a plan records, refusing installed plugins that differ
    from the plan's manifest (:meth:`Manifest.check`). With ``shaping_only``
    only the techniques that shape the model (:meth:`Manifest.shaping`) are
    compared and resolved: enough to build the module, not to train it."""
    manifest = plan.manifest.shaping() if shaping_only else plan.manifest
    manifest.check(installed_manifest(spm, manifest), f"model {plan.model!r}", "cannot build its plan")
    keep = {e.technique for e in manifest.techniques}
    active = []
    for e in plan.entries:
        if e.technique not in keep:
            continue
        reg = spm.techniques[e.technique]
        params = None
        if reg.info.params is not None:
            params = structure(conv, e.params or {}, reg.info.params, f"$.plan.{e.technique}")
        active.append(ActiveTechnique(e.technique, e.slot, e.dist, e.version, params))
    return Resolution(model=plan.model, active=tuple(active), skipped=plan.skipped)


@attrs.frozen
class Built:
    """What a plan builds, resolved once: the model (a module with
    ``members``, each a ``TemplateModel``), its loss, its optimizers (every
    member's, in member order) and the resolution the lifecycle hooks use.

    Example:
        >>> from smt_host import Host
        >>> host = Host.create(load="")
        >>> spec = host.default_ecosystem().model("feed_ctr")
        >>> built = host.build(host.plan(spec), spec)
        >>> len(built.model.members), [type(o).__name__ for o in built.optimizers]
        (1, ['Adam', 'Adagrad'])
    """

    model: nn.Module
    loss: Any
    optimizers: list
    resolution: Resolution

    @property
    def members(self) -> list[nn.Module]:
        return list(self.model.members)


def build_from_plan(
    plan: Plan, spec: ModelSpec, spm: SmtPluginManager, conv: cattrs.Converter, device: Any = "cpu"
) -> Built:
    """The model a plan describes (same seed: same weights), with its loss
    and optimizers."""
    res = resolution_from_plan(plan, spm, conv)
    model = build_model(spec, res, spm, width_scale=plan.capacity.scale, device=device, seed=plan.seed)
    return Built(model, build_loss(spec, res, spm), build_optimizers(spec, res, spm, model), res)


def build_model_from_plan(
    plan: Plan, spec: ModelSpec, spm: SmtPluginManager, conv: cattrs.Converter, device: Any = "cpu"
) -> nn.Module:
    """The module a plan describes, built from the techniques that shape it
    only (what export and serving load: a training-only technique of the
    plan need not be installed). Same seed: same initial weights as
    :func:`build_from_plan`'s model."""
    res = resolution_from_plan(plan, spm, conv, shaping_only=True)
    return build_model(spec, res, spm, width_scale=plan.capacity.scale, device=device, seed=plan.seed)


def plan_to_dict(plan: Plan, conv: cattrs.Converter) -> dict:
    return conv.unstructure(plan)


def plan_from_dict(data: dict, conv: cattrs.Converter) -> Plan:
    try:
        return conv.structure(data, Plan)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError([f"not a valid plan: {exc}"]) from None
