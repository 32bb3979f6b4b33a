"""Which techniques fill which slot of one model (the first half of planning).

Pure decisions on data: the installed techniques (with what they declare) and
the model spec in, a :class:`Resolution` out. No module is built here.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import cattrs

from smt_host.errors import ConfigError, PluginError
from smt_host.plugins import SmtPluginManager, TechniqueRecord
from smt_host.spec.converter import structure
from smt_host.spec.schema import ModelSpec
from smt_host.technique import EXCLUSIVE_SLOTS, OPTIONAL_SLOTS, SLOTS


def distribution_hint(technique: str) -> str:
    """The distribution that by convention ships ``technique``."""
    return "smt-" + technique.replace("_", "-")


@attrs.frozen
class ActiveTechnique:
    """A technique chosen for a slot, with its structured parameters."""

    name: str
    slot: str
    dist: str
    version: str
    params: Any


@attrs.frozen
class SkippedTechnique:
    """A technique not used by the model, and why (``reason``):
    ``opted out``, ``not applicable: ...``, ``off by default``,
    ``shadowed by NAME``, ``built-ins only``."""

    name: str
    slot: str
    dist: str
    reason: str


@attrs.frozen
class Resolution:
    """The active techniques in host order, and the skipped ones."""

    model: str
    active: tuple[ActiveTechnique, ...]
    skipped: tuple[SkippedTechnique, ...]

    def slot(self, slot: str) -> list[ActiveTechnique]:
        return [a for a in self.active if a.slot == slot]

    def names(self) -> list[str]:
        return [a.name for a in self.active]


def embedding_view(spec: ModelSpec) -> ModelSpec:
    """``spec`` as the embedding slot sees it: without the sparse features a
    history shares (the host builds their tables itself, outside the
    embedding chain) and without sequence features. ``spec`` itself when it
    has no sequence features. The view may have no sparse feature left."""
    if not spec.features.sequence:
        return spec
    shared = {s.candidate for s in spec.features.sequence}
    features = attrs.evolve(
        spec.features, sparse=tuple(f for f in spec.features.sparse if f.name not in shared), sequence=()
    )
    view = copy.copy(spec)
    object.__setattr__(view, "features", features)  # the view skips ModelSpec's "at least one sparse" check
    return view


def _override(spec: ModelSpec, name: str) -> Any:
    return spec.techniques.get(name)


def _canonical(dist: str) -> str:
    return dist.replace("_", "-").lower()


def unmet_requirements(requirements: tuple[str, ...], spm: SmtPluginManager) -> list[str]:
    """What is wrong with each ``required_plugins`` entry (``"smt-dcnv2>=0.1"``,
    as pytest's ``required_plugins``): not installed, disabled, or another
    version. Empty when every requirement is met."""
    from packaging.requirements import InvalidRequirement, Requirement

    installed = {_canonical(d): v for d, v in spm.distributions.items()}
    filtered = {_canonical(d): why for d, why in spm.filtered.values()}
    problems = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            problems.append(f"{text!r} is not a requirement ({exc})")
            continue
        have = installed.get(_canonical(req.name))
        if have is None and _canonical(req.name) in filtered:
            problems.append(f"{text} is required but {filtered[_canonical(req.name)]}")
        elif have is None:
            problems.append(f"{text} is required but not installed (pip install '{text}')")
        elif req.specifier and have not in req.specifier:
            problems.append(f"{text} is required but {req.name} {have} is installed")
    return problems


def _absent(name: str, spm: SmtPluginManager) -> tuple[str, str]:
    """(distribution, why) for a technique a spec names that is not loaded:
    an entry point filtered out by the environment, or not installed (the
    distribution by convention, with a did-you-mean for a likely typo)."""
    import difflib

    hint = distribution_hint(name)
    for ep, (dist, why) in spm.filtered.items():
        if ep == name or _canonical(dist) == hint:
            return dist, why
    close = difflib.get_close_matches(name, list(spm.techniques), n=1)
    if close:
        return hint, f"not installed (did you mean {close[0]!r}? if not: pip install {hint})"
    return hint, f"not installed (pip install {hint})"


def _check_configured(spec: ModelSpec, spm: SmtPluginManager) -> list[SkippedTechnique]:
    """Checks the spec's technique table; returns the entries that name a
    technique that is absent (uninstalled or disabled): their opt-outs and
    parameters are skipped, so uninstalling a plugin never breaks a spec.
    ``required_plugins`` turns an absent distribution into an error."""
    problems = unmet_requirements(spec.required_plugins, spm)
    if problems:
        raise PluginError(f"model {spec.name!r}: " + "; ".join(problems) + f" @ $.models.{spec.name}.required_plugins")
    errors, absent = [], []
    for name, value in spec.techniques.items():
        path = f"$.models.{spec.name}.techniques.{name}"
        if not isinstance(value, (bool, dict)):
            errors.append(f"must be true, false or a table of parameters, got {type(value).__name__} @ {path}")
        elif name not in spm.techniques:
            dist, why = _absent(name, spm)
            absent.append(SkippedTechnique(name, "", dist, f"{why}; its settings at {path} are skipped"))
    if errors:
        raise ConfigError(errors)
    return absent


def structure_params(conv: cattrs.Converter, reg: TechniqueRecord, value: Any, path: str) -> Any:
    """The technique's parameters from a spec value (True/None: defaults)."""
    cls = reg.info.params
    table = value if isinstance(value, dict) else {}
    if cls is None:
        if table:
            raise ConfigError([f"technique {reg.name!r} takes no parameters, got ({', '.join(table)}) @ {path}"])
        return None
    return structure(conv, table, cls, path)


def resolve(
    spec: ModelSpec,
    spm: SmtPluginManager,
    conv: cattrs.Converter,
    *,
    builtins_only: bool = False,
    without: frozenset[str] = frozenset(),
    only: frozenset[str] | None = None,
) -> Resolution:
    """Chooses the techniques of ``spec``.

    Args:
        spec: the model spec.
        spm: the plugin manager.
        conv: the host's converter (with plugin parameter classes).
        builtins_only: ignore external techniques (the baseline template).
        without: technique names to leave out (as if the spec opted out).
        only: if given, external techniques outside this set are left out
            (the ecosystem loop's "baseline + one technique").

    A technique the spec configures that is not loaded (uninstalled, or
    filtered by ``SMT_DISABLE_PLUGINS`` / ``SMT_LOAD_PLUGINS``) is skipped
    with the reason, unless the spec's ``required_plugins`` names it.

    Raises:
        ConfigError: a technique's parameters do not validate, or it is
            enabled where it does not apply.
        PluginError: ``required_plugins`` is not met, or requirements or
            conflicts between techniques fail.
    """
    skipped: list[SkippedTechnique] = _check_configured(spec, spm)
    chosen: list[ActiveTechnique] = []
    candidates: dict[str, list[tuple[TechniqueRecord, bool]]] = {s: [] for s in SLOTS}
    for reg in spm.all_ordered():
        name, info = reg.name, reg.info
        path = f"$.models.{spec.name}.techniques.{name}"
        value = _override(spec, name)
        explicit = value is True or isinstance(value, dict)
        if not reg.builtin and builtins_only:
            skipped.append(SkippedTechnique(name, info.slot, reg.dist, "built-ins only"))
            continue
        if name in without or (only is not None and not reg.builtin and name not in only):
            skipped.append(SkippedTechnique(name, info.slot, reg.dist, "left out"))
            continue
        if value is False:
            skipped.append(SkippedTechnique(name, info.slot, reg.dist, "opted out"))
            continue
        if not info.default and not explicit:
            skipped.append(SkippedTechnique(name, info.slot, reg.dist, "off by default"))
            continue
        ok, why = info.check_applies(embedding_view(spec) if info.slot == "embedding" else spec)
        if info.slot == "dense_arch" and not spec.features.dense:
            ok, why = False, "the model has no dense features"
        if info.slot == "sequence" and not spec.features.sequence:
            ok, why = False, "no sequence features"
        if not ok:
            if explicit:
                raise ConfigError([f"technique {name!r} is enabled but does not apply to this model: {why} @ {path}"])
            skipped.append(SkippedTechnique(name, info.slot, reg.dist, f"not applicable: {why}"))
            continue
        candidates[info.slot].append((reg, explicit))

    for slot in SLOTS:
        regs = candidates[slot]
        if slot in EXCLUSIVE_SLOTS and len(regs) > 1:
            picked = [r for r, explicit in regs if explicit]
            if len(picked) > 1:
                names = ", ".join(r.name for r in picked)
                raise ConfigError(
                    [
                        f"slot {slot!r} takes one technique but the spec enables several: {names} @ $.models.{spec.name}.techniques"
                    ]
                )
            winner = picked[0] if picked else regs[0][0]
            for r, _ in regs:
                if r is not winner:
                    skipped.append(SkippedTechnique(r.name, slot, r.dist, f"shadowed by {winner.name}"))
            regs = [(winner, True)]
        for reg, _ in regs:
            path = f"$.models.{spec.name}.techniques.{reg.name}"
            params = structure_params(conv, reg, _override(spec, reg.name), path)
            chosen.append(ActiveTechnique(reg.name, slot, reg.dist, reg.version, params))

    names = {a.name for a in chosen}
    for a in chosen:
        info = spm.techniques[a.name].info
        missing = [r for r in info.requires if r not in names]
        if missing:
            raise PluginError(
                f"technique {a.name!r} ({a.dist} {a.version}) requires {', '.join(missing)}, "
                f"which is not active in model {spec.name!r}"
            )
        clash = [c for c in info.conflicts if c in names]
        if clash:
            raise PluginError(
                f"technique {a.name!r} ({a.dist} {a.version}) conflicts with {', '.join(clash)} "
                f"in model {spec.name!r}; opt out of one of them in the spec"
            )
    order = spm.ordered(names)
    chosen.sort(key=lambda a: order.index(a.name))
    for slot in SLOTS:
        if slot in EXCLUSIVE_SLOTS and slot not in OPTIONAL_SLOTS and not any(a.slot == slot for a in chosen):
            raise ConfigError(
                [
                    f"slot {slot!r} has no technique for model {spec.name!r} (all opted out?) @ $.models.{spec.name}.techniques"
                ]
            )
    if not any(a.slot == "interaction" for a in chosen):
        raise ConfigError(
            [f"slot 'interaction' has no branch for model {spec.name!r} @ $.models.{spec.name}.techniques"]
        )
    if spec.features.sequence and not any(a.slot == "sequence" for a in chosen):
        raise ConfigError(
            [f"slot 'sequence' has no technique but the model has sequence features @ $.models.{spec.name}.techniques"]
        )
    if spec.features.dense and not any(a.slot == "dense_arch" for a in chosen):
        raise ConfigError(
            [f"slot 'dense_arch' has no technique but the model has dense features @ $.models.{spec.name}.techniques"]
        )
    return Resolution(model=spec.name, active=tuple(chosen), skipped=tuple(skipped))
