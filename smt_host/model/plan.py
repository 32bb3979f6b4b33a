"""Spec + plugins -> plan: the inspectable description of one model.

A :class:`Plan` is pure data (attrs, unstructured to JSON by the host's
converter): for every slot the techniques with distribution, version and
parameters; widths; parameter count; FLOPs per example; the capacity budget
and the over-arch scale chosen to meet it; and the :class:`Manifest` a
checkpoint carries. :func:`build_from_plan` turns it back into a module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import cattrs
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from smt_host.errors import CapacityError, ConfigError, ManifestMismatch
from smt_host.model.capacity import FLOP_BATCH, Cost, measure, neutral_scale
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


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Intra-op threads set to 1 while planning: the plan measures batches of
    a few examples, where a thread pool only costs (and a busy machine makes
    spinning OpenMP threads collapse, about 10x slower at 2 threads)."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def _tail_flops(spec: ModelSpec, res: Resolution, spm: SmtPluginManager, member: nn.Module, scale: float) -> float:
    """FLOPs per example of one member's over-arch, task arch and heads at
    ``scale``: the parts the over-arch's width reaches (``ctx.width_scale``
    is the over-arch's knob, see ``smt_over_arch``; every other part is
    built the same at any scale). Built from the slot hooks as the template
    builds them on the meta device (no initialisation), then given zeroed
    weights on the CPU (a forward on meta tensors is slower than the CPU's)
    and run on a (FLOP_BATCH, in) input: the counts depend on shapes only.

    Args:
        member: a ``TemplateModel`` of the same resolution (any scale): where
            the over-arch's input width (its deep branches, sum out_i) and
            the task arch's extra input (its ``to_task_arch`` branches,
            sum out_j) are read.
    """
    ctx = base_context(spec, "meta", scale)
    width = sum(member.branches[n].out_dim for n in member.deep_branches)
    beside = sum(member.branches[n].out_dim for n in member.task_branches)
    (o,), (t,), (h,) = res.slot("over_arch"), res.slot("task_arch"), res.slot("heads")
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        over = spm.call(o.name, "smt_over_arch", ctx=ctx.evolve(in_dim=width), params=o.params)
        task = spm.call(t.name, "smt_task_arch", ctx=ctx.evolve(in_dim=over.out_dim + beside), params=t.params)
        heads = [
            spm.call(h.name, "smt_head", ctx=ctx.evolve(in_dim=d), params=h.params, task=name)
            for d, name in zip(task.out_dims, spec.task_names)
        ]
    over, task, *heads = (_zeroed(m) for m in (over, task, *heads))
    with torch.no_grad():
        x = torch.zeros(FLOP_BATCH, width)  # (B, sum out_i)
        with counter:
            hidden = over(x)  # (B, H)
            if beside:
                hidden = torch.cat([hidden, torch.zeros(FLOP_BATCH, beside)], dim=1)  # (B, H + sum out_j)
            for head, tower in zip(heads, task(hidden)):  # T x (B, H_t)
                head(tower)
    return counter.get_total_flops() / FLOP_BATCH


def _zeroed(module: nn.Module) -> nn.Module:
    """``module`` (on the meta device) on the CPU in eval mode, its tensors zeros."""
    module = module.to_empty(device="cpu").eval()
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.zero_()
    return module


class _Probe:
    """The FLOPs of ``spec`` at over-arch scales, for the neutral-capacity
    bisection, each scale measured once.

    ``built(scale)`` builds the whole model and measures it (cached by
    scale). ``flops(scale)`` is that model's FLOPs; on the fast path it is
    predicted instead, from the model at scale 1 and the parts the scale
    reaches (:func:`_tail_flops`, per member):
    ``flops(s) = flops(1) + members * (tail(s) - tail(1))``. The fast path
    is taken only when ``tail(1)`` equals what :func:`measure` counts for
    those parts of the real model, and the plan checks the prediction at the
    scale it settles on against a real build (:meth:`exact`).
    """

    def __init__(
        self, spec: ModelSpec, res: Resolution, spm: SmtPluginManager, seed: int, combiner: str, fast: bool
    ) -> None:
        self.spec, self.res, self.spm, self.seed, self.combiner = spec, res, spm, seed, combiner
        self.fast = fast
        self._built: dict[float, tuple[nn.Module, Cost]] = {}
        self._predicted: dict[float, float] = {}
        self._tail: tuple[float, float, int, nn.Module] | None = None  # flops(1), tail(1), members, member

    def built(self, scale: float) -> tuple[nn.Module, Cost]:
        if scale not in self._built:
            model = build_model(self.spec, self.res, self.spm, width_scale=scale, seed=self.seed)
            self._built[scale] = (model, measure(model, self.spec, self.combiner))
        return self._built[scale]

    def _tail_model(self) -> tuple[float, float, int, nn.Module] | None:
        if self._tail is None and self.fast:
            model, cost = self.built(1.0)
            first = model.members[0]
            names = {slot: self.res.slot(slot) for slot in ("over_arch", "task_arch", "heads")}
            if all(len(v) == 1 for v in names.values()):
                measured = sum(cost.parts.get(f"{slot}:{v[0].name}", 0.0) for slot, v in names.items())
                tail1 = _tail_flops(self.spec, self.res, self.spm, first, 1.0)
                if tail1 == measured:
                    self._tail = (cost.flops, tail1, len(model.members), first)
            if self._tail is None:
                self.fast = False
        return self._tail

    def flops(self, scale: float) -> float:
        if scale in self._built or not self.fast:
            return self.built(scale)[1].flops
        tail = self._tail_model()
        if tail is None:
            return self.built(scale)[1].flops
        f1, tail1, members, first = tail
        if scale not in self._predicted:
            self._predicted[scale] = f1 + members * (_tail_flops(self.spec, self.res, self.spm, first, scale) - tail1)
        return self._predicted[scale]

    def exact(self, scale: float) -> bool:
        """Whether the FLOPs given for ``scale`` are those of the real model
        (builds it); False turns the fast path off."""
        predicted = self._predicted.get(scale)
        ok = predicted is None or predicted == self.built(scale)[1].flops
        if not ok:
            self.fast = False
            self._predicted.clear()
        return ok


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
    fast: bool = True,
) -> Plan:
    """Plans ``spec`` with the installed techniques.

    ``budget`` overrides the spec's capacity budget (None: no budget,
    "baseline", or FLOPs). ``seed`` overrides ``spec.training.seed``.

    Under a budget the over-arch scale is bisected (:func:`neutral_scale`).
    ``fast`` (default) predicts the FLOPs at each scale from the model at
    scale 1 and the parts the scale reaches, building only those, on the
    meta device (see :class:`_Probe`); the scale found is checked with a
    real build, and bisected again by whole builds should the prediction be
    off, so the plan is the same as with ``fast=False``, which builds and
    measures the whole model at every scale tried. Each model is built once
    per scale either way; the baseline of a model without external
    techniques is the model itself.
    """
    with _one_thread():
        return _make_plan(spec, spm, conv, builtins_only, without, only, budget, seed, fast)


def _make_plan(
    spec: ModelSpec,
    spm: SmtPluginManager,
    conv: cattrs.Converter,
    builtins_only: bool,
    without: frozenset[str],
    only: frozenset[str] | None,
    budget: Any,
    seed: int | None,
    fast: bool,
) -> Plan:
    res = resolve(spec, spm, conv, builtins_only=builtins_only, without=without, only=only)
    seed = spec.training.seed if seed is None else seed
    budget = spec.capacity.budget if budget is ... else budget
    tolerance = spec.capacity.tolerance

    combiner = res.slot("ensemble")[0].name
    probe = _Probe(spec, res, spm, seed, combiner, fast)

    if budget is None:
        mode, target, scale = "none", None, 1.0
    else:
        if budget == "baseline":
            mode = "baseline"
            base = resolve(spec, spm, conv, builtins_only=True)
            if base.active == res.active:  # the same techniques: the baseline is this model
                target = probe.built(1.0)[1].flops
            else:
                target = measure(build_model(spec, base, spm, seed=seed), spec).flops
        else:
            mode, target = "flops", float(budget)
        try:
            scale = neutral_scale(probe.flops, target, tolerance).scale
            if not probe.exact(scale):  # the prediction was off: bisect again on whole builds
                scale = neutral_scale(probe.flops, target, tolerance).scale
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

    built, cost = probe.built(scale)
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
