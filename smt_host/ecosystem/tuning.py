"""Multi-model optimisation: tune a technique once, roll it out everywhere.

A technique declares a search space for its parameters with attrs field
metadata on its parameters class, no host API (:func:`search_space`)::

    @attrs.frozen
    class Params:
        num_layers: int = attrs.field(default=3, metadata={"doc": "...", "search": [2, 3, 4]})

``smt ecosystem tune TECHNIQUE`` (:func:`tune`) then

1. tunes once over a representative subset of the models the technique
   applies to (named, or :func:`representative`: the fewest models that
   cover every surface and task of the ecosystem), at neutral capacity over
   seeds: each setting of the grid (:func:`grid`) is one arm
   (``technique~key=value;...``), a cell like any other (keyed, resumed,
   trained by the same workers), and the setting with the best mean NE
   change over the subset is chosen;
2. rolls that setting out to every model the technique applies to and
   reports the regression rate: the share of models whose NE got worse
   beyond noise (:func:`regressed`: the one-sided paired t test at
   ``alpha`` finds it worse, the mirror of the adoption rule);
3. does the same with each model tuned separately (the per-model approach,
   every setting on every model: n x the cost), with the compute each
   approach needed (the training time its cells record).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from smt_host.ecosystem.analysis import ALPHA, analyse
from smt_host.ecosystem.cells import (
    ADOPTED,
    BASELINE,
    Cell,
    Fingerprint,
    applicable_techniques,
    read_cell,
    tuned_arm,
)
from smt_host.errors import ConfigError
from smt_host.spec.schema import EcosystemSpec, ModelSpec

#: the metadata key of a parameter's search values
SEARCH = "search"
#: the rule that picks the subset when none is named, as reports state it
SUBSET_RULE = (
    "the fewest models that cover every surface and task of the models the technique applies to "
    "(greedy: the model covering most uncovered surfaces and tasks first, ecosystem order among equals)"
)


def search_space(params: type | None) -> dict[str, list]:
    """``{field: values}`` of the parameters class fields whose metadata has
    ``"search"``, in field order. Raises ValueError for a search entry that
    is not a non-empty list.

    Example:
        >>> @attrs.frozen
        ... class P:
        ...     layers: int = attrs.field(default=3, metadata={"search": [2, 3]})
        ...     rank: int = attrs.field(default=8)
        >>> search_space(P), search_space(None)
        ({'layers': [2, 3]}, {})
    """
    if params is None or not attrs.has(params):
        return {}
    out = {}
    for f in attrs.fields(params):
        values = f.metadata.get(SEARCH)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{params.__name__}.{f.name}: metadata 'search' must be a non-empty list, got {values!r}")
        out[f.name] = list(values)
    return out


def grid(space: Mapping[str, Sequence]) -> list[dict]:
    """Every setting of a search space (the product of its values).

    Example:
        >>> grid({"a": [1, 2], "b": ["x"]})
        [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]
    """
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def _surface(spec: ModelSpec) -> str:
    return spec.data.surface or spec.surface or f"source {spec.data.source}"


def representative(specs: Iterable[ModelSpec]) -> list[str]:
    """The fewest models (greedy set cover) whose surfaces (the data's
    surface, the model's, or for a file source ``source NAME``) and task
    names cover those of ``specs``; ties go to the earlier model.

    Example:
        >>> from smt_host.spec.schema import Features, ModelSpec, SparseFeature, Task
        >>> f = Features(sparse=(SparseFeature("u", 4),))
        >>> m = lambda n, s, *t: ModelSpec(name=n, surface=s, tasks=tuple(Task(x) for x in t), features=f)
        >>> representative([m("a", "feed", "click"), m("b", "feed", "click", "conversion"), m("c", "video", "click")])
        ['b', 'c']
    """
    specs = list(specs)
    items = {s.name: {("surface", _surface(s)), *(("task", t) for t in s.task_names)} for s in specs}
    left = set().union(*items.values()) if items else set()
    chosen: list[str] = []
    while left:
        best = max(specs, key=lambda s: (len(items[s.name] & left), -specs.index(s)))
        chosen.append(best.name)
        left -= items[best.name]
    return [s.name for s in specs if s.name in chosen]


def regressed(pair: Mapping) -> bool:
    """Whether a pair's NE got worse beyond noise: ``t >= t(1 - alpha, n -
    1)`` (the one-sided paired t test finds it worse); with one seed or no
    spread, a mean change above zero. An arm over the budget has no NE: not
    a regression (it cannot be rolled out; reports count it apart).

    Example:
        >>> regressed({"seeds": 3, "t": 4.9, "critical": 2.92, "ne_delta": 0.004})
        True
        >>> regressed({"seeds": 3, "t": 1.4, "critical": 2.92, "ne_delta": 0.003})
        False
    """
    if not pair.get("seeds"):
        return False
    t, crit = pair.get("t"), pair.get("critical")
    if t is None or crit is None:
        return pair["ne_delta"] > 0
    return t >= crit


def _pairs(out: Path, cells: list[Cell], keys: Mapping[Cell, Fingerprint], alpha: float) -> dict:
    matrix = analyse(out, cells, keys=keys, alpha=alpha, aa_pairs=0)
    return {"pairs": {(p["model"], p["technique"]): p for p in matrix["pairs"]}, "matrix": matrix}


def _outcome(pair: Mapping | None) -> dict:
    """What a rollout table shows of one model's pair."""
    if pair is None:
        return {"ne_delta": None, "ne_delta_std": None, "seeds": 0, "t": None, "critical": None, "status": "missing"}
    if not pair.get("seeds"):
        return {**_outcome(None), "status": "over budget", "reason": pair["reason"]}
    status = "regressed" if regressed(pair) else ("gain" if pair["decision"] == "adopt" else "no change")
    keys = ("ne_delta", "ne_delta_std", "seeds", "t", "critical", "flops")
    return {**{k: pair.get(k) for k in keys}, "status": status}


def _compute(out: Path, cells: Iterable[Cell]) -> dict:
    """Cells and their recorded training time (wall and CPU seconds)."""
    cells = set(cells)
    results = [read_cell(out, c) or {} for c in cells]
    return {
        "cells": len(cells),
        "compute_s": sum(r.get("wall_s", 0.0) for r in results),
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in results),
    }


def _rate(outcomes: Mapping[str, Mapping]) -> float | None:
    measured = [o for o in outcomes.values() if o["seeds"]]
    return sum(o["status"] == "regressed" for o in measured) / len(measured) if measured else None


def tune(
    host: Any,
    eco: EcosystemSpec,
    out: Path,
    technique: str,
    train: Callable[[list[Cell]], Mapping[Cell, Fingerprint]],
    *,
    seeds: int = 3,
    models: Sequence[str] | None = None,
    per_model: bool = True,
    alpha: float = ALPHA,
) -> dict:
    """Tunes ``technique`` once over a subset of models and rolls it out
    (see the module); returns the result as plain data.

    Args:
        host, eco: the host (with the technique installed) and the ecosystem.
        out: the folder of the cells (shared with ``smt ecosystem run``).
        technique: the technique's name.
        train: trains the cells it is given (those not done) and returns
            their fingerprints (``run_cells`` behind a progress bar).
        seeds: seeds per cell.
        models: the subset to tune on; None: :func:`representative`.
        per_model: also tune each model separately.
        alpha: the level of the regression test (:func:`regressed`).

    Raises:
        ConfigError: the technique is not installed, declares no search
            space, applies to no model, or a named model is not one it applies to.
    """
    reg = host.spm.techniques.get(technique)
    if reg is None:
        raise ConfigError([f"technique {technique!r} is not installed (installed: {', '.join(host.spm.techniques)})"])
    try:
        space = search_space(reg.info.params)
    except ValueError as exc:
        raise ConfigError([f"technique {technique!r} ({reg.dist} {reg.version}): {exc}"]) from None
    if not space:
        raise ConfigError(
            [
                f"technique {technique!r} ({reg.dist} {reg.version}) declares no search space: give a field of its "
                f'parameters class metadata={{"search": [...]}}'
            ]
        )
    settings = grid(space)
    try:
        arms = {tuned_arm(technique, s): s for s in settings}
    except ValueError as exc:
        raise ConfigError([f"technique {technique!r}: {exc}"]) from None
    applies = [s for s in eco.models.values() if technique in applicable_techniques(host, s)]
    names = [s.name for s in applies]
    if not applies:
        raise ConfigError([f"technique {technique!r} applies to no model of ecosystem {eco.name!r}"], eco.source)
    if models:
        unknown = [m for m in models if m not in names]
        if unknown:
            raise ConfigError(
                [f"technique {technique!r} does not apply to {', '.join(unknown)} (it applies to {', '.join(names)})"],
                eco.source,
            )
        subset, rule = [m for m in names if m in models], "named (--models)"
    else:
        subset, rule = representative(applies), SUBSET_RULE

    def cells_of(model_names: Iterable[str], arm_names: Iterable[str]) -> list[Cell]:
        arm_names = list(arm_names)
        return [Cell(m, a, s) for m in model_names for a in [BASELINE, *arm_names] for s in range(seeds)]

    keys: dict[Cell, Fingerprint] = {}
    # 1. tune once over the subset
    tune_cells = cells_of(subset, arms)
    keys.update(train(tune_cells))
    tuned = _pairs(out, tune_cells, keys, alpha)["pairs"]
    scores = []
    for arm, setting in arms.items():
        per = {m: tuned.get((m, arm)) for m in subset}
        fits = all(p is not None and p.get("seeds") for p in per.values())
        mean = sum(p["ne_delta"] for p in per.values()) / len(per) if fits else None
        scores.append(
            {
                "setting": setting,
                "arm": arm,
                "mean_ne_delta": mean,
                "models": {m: (p["ne_delta"] if p and p.get("seeds") else None) for m, p in per.items()},
            }
        )
    fitting = [s for s in scores if s["mean_ne_delta"] is not None]
    if not fitting:
        raise ConfigError([f"technique {technique!r}: no setting meets the neutral budget on every tuned model"])
    best = min(fitting, key=lambda s: s["mean_ne_delta"])
    # 2. roll it out to every model it applies to
    rollout_cells = cells_of(names, [best["arm"]])
    keys.update(train(rollout_cells))
    rolled = _pairs(out, rollout_cells, keys, alpha)
    rollout = {m: {"setting": best["setting"], **_outcome(rolled["pairs"].get((m, best["arm"])))} for m in names}
    result = {
        "technique": technique,
        "dist": reg.dist,
        "version": reg.version,
        "space": space,
        "alpha": alpha,
        "seeds": seeds,
        "subset": subset,
        "subset_rule": rule,
        "settings": scores,
        "chosen": best["setting"],
        "chosen_arm": best["arm"],
        "rollout": rollout,
        "regression_rate": _rate(rollout),
        "compute": {"mmo": _compute(out, tune_cells + rollout_cells)},
        "regression_rule": (
            f"worse beyond noise: the one-sided paired t test at level {alpha:g} finds the NE change above zero, "
            f"t >= t(1 - {alpha:g}, n - 1)"
        ),
    }
    result["lock_matrix"] = _lock_matrix(rolled["matrix"], best["arm"])
    # 3. each model tuned separately: every setting on every model
    if per_model:
        all_cells = cells_of(names, arms)
        keys.update(train(all_cells))
        each = _pairs(out, all_cells, keys, alpha)["pairs"]
        outcomes = {}
        for m in names:
            fit = [(each[(m, a)]["ne_delta"], a) for a in arms if each.get((m, a), {}).get("seeds")]
            if not fit:
                outcomes[m] = {"setting": None, **_outcome(None), "status": "over budget"}
                continue
            arm = min(fit)[1]
            outcomes[m] = {"setting": arms[arm], **_outcome(each[(m, arm)])}
        result["per_model"] = {"rollout": outcomes, "regression_rate": _rate(outcomes)}
        result["compute"]["per_model"] = _compute(out, all_cells)
    return result


def _lock_matrix(matrix: Mapping, arm: str) -> dict:
    """The rollout as an adoption matrix the lock is written from
    (:func:`smt_host.ecosystem.lock.make_lock`): a model adopts the tuned
    technique where its rollout pair passes the adoption rule, and the
    cells that measured it are its adopted set's (``adopted=<technique>``)."""
    pairs = []
    for p in matrix["pairs"]:
        if p["technique"] != arm:
            continue
        name = arm.partition("~")[0]
        pairs.append({**p, "technique": name})
        pairs.append({**p, "technique": f"{ADOPTED}{name}"})
    return {**matrix, "pairs": pairs}
