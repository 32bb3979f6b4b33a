"""The lock: what was measured per model, so that training reproduces it.

``smt ecosystem lock`` writes, from the adoption matrix, per model:

* ``techniques``: the adopted set, each with distribution, version and
  parameters: the techniques adopted alone that fit the neutral budget
  together (:func:`~smt_host.ecosystem.analysis.choose_adopted`; the others
  are in ``left_out`` with the reason), or, when that set measured together
  did not beat the baseline, its best technique alone (``note`` says so);
* ``capacity``: how the measured cells were sized (``mode``, ``budget`` in
  FLOPs per example, ``tolerance``) and what they achieved (``achieved``
  FLOPs, over-arch ``scale``);
* ``evaluated``: every technique the matrix tried alone on the model, with
  its distribution, version and decision, so a lock can tell a technique
  installed since (or upgraded) from one that was tried and rejected;
* ``spec_hash`` and ``data_hash`` (the hashes that key the cells,
  :mod:`smt_host.ecosystem.cells`), with the ``spec`` and ``data_settings``
  they were taken of, so a mismatch names the keys that differ;

and for the lock: ``host`` and ``template`` versions and the level ``alpha``
of the rule that adopted.

``smt train --locked LOCK`` (:func:`prepare_locked`) checks every model it
is asked to train before it trains any: the model is in the lock, the host
and template versions, the spec and data hashes, the installed techniques
(:meth:`Manifest.check`), and it plans each model at the locked budget and
tolerance and refuses a plan whose FLOPs or over-arch scale differ from the
measured ones. Each refusal names the model; all are reported at once.
An installed technique that applies to a model but was not evaluated there
(or at another version) is not refused: the locked run leaves it out, and
:attr:`Locked.unevaluated` says so, so the lock can be made again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from smt_host.ecosystem.analysis import adopted_arm, adopted_sets, is_single_arm
from smt_host.ecosystem.cells import data_settings, digest, spec_identity, template_version
from smt_host.errors import LockError, ManifestMismatch
from smt_host.files import write_json_atomic
from smt_host.plugins import HOST_DIST
from smt_host.spec.schema import EcosystemSpec, ModelSpec

#: the lock format written by this host (1: techniques only, no capacity)
LOCK_VERSION = 2
#: how close a rebuilt plan's FLOPs and scale must be to the locked ones (relative)
EXACT = 1e-9


def _capacity(report: Mapping | None) -> dict | None:
    if not report:
        return None
    return {k: report.get(k) for k in ("mode", "budget", "tolerance", "achieved", "scale")}


def _best_single(pairs: list[dict], model: str) -> dict:
    """The pair of ``model``'s technique adopted alone with the largest NE gain."""
    singles = [p for p in pairs if p["model"] == model and is_single_arm(p["technique"]) and p["decision"] == "adopt"]
    return min(singles, key=lambda p: (p["ne_delta"], p["technique"]))


def make_lock(matrix: dict) -> dict:
    """The lock of an adoption matrix (:func:`smt_host.ecosystem.analysis.analyse`).

    Raises:
        LockError: a model whose measurement the matrix does not hold
            (no baseline cells with a fingerprint, or an adopted set that
            was not trained together, or was over the budget), named.
    """
    info = matrix.get("model_info") or {}
    pairs = {(p["model"], p["technique"]): p for p in matrix["pairs"]}
    evaluated: dict[str, dict] = {}
    for p in matrix["pairs"]:
        if is_single_arm(p["technique"]):
            own = [e for e in p["techniques"] if e.get("technique") == p["technique"]]
            dist, version = (own[0].get("dist"), own[0].get("version")) if own else (None, None)
            evaluated.setdefault(p["model"], {})[p["technique"]] = {
                "dist": dist,
                "version": version,
                "decision": p["decision"],
            }
    models, problems = {}, []
    hosts, templates = set(), set()
    for model, entries in adopted_sets(matrix).items():
        mi = info.get(model)
        if mi is None:
            problems.append(f"model {model!r}: no baseline cell with a fingerprint (an older run?)")
            continue
        arm = adopted_arm(entries)
        pair, note = None, None
        if arm is None:
            capacity = _capacity(mi.get("baseline_capacity"))
        else:
            pair = pairs.get((model, arm))
            if pair is not None and pair.get("seeds") and pair["decision"] != "adopt":
                # the set together did not hold against the baseline: lock its best technique alone
                best = _best_single(matrix["pairs"], model)
                note = (
                    f"the adopted set {arm[len('adopted=') :]} together: {pair['reason']}; "
                    f"locked its best technique alone, {best['technique']}"
                )
                pair, entries = best, best["techniques"]
            capacity = _capacity(pair.get("capacity")) if pair else None
            if pair is None or capacity is None:
                why = "was not trained together" if pair is None else pair.get("reason", "has no capacity")
                problems.append(f"model {model!r}: its adopted set {arm[len('adopted=') :]} {why}")
                continue
        if capacity is None:
            problems.append(f"model {model!r}: its baseline cells record no capacity")
            continue
        hosts.add(mi.get("host"))
        templates.add(mi.get("template"))
        models[model] = {
            "techniques": [
                {k: e.get(k) for k in ("technique", "dist", "version", "params")}
                for e in sorted(entries, key=lambda e: e["technique"])
            ],
            "capacity": capacity,
            "evaluated": {k: v for k, v in sorted(evaluated.get(model, {}).items())},
            "spec_hash": mi["spec_hash"],
            "data_hash": mi["data_hash"],
            "spec": mi.get("spec"),
            "data_settings": mi.get("data_settings"),
            # what was measured, for a report beside a locked run: the baseline's mean test NE
            # and the adopted set's mean relative change of it (None: no set adopted)
            "baseline_ne": mi.get("baseline_ne"),
            "ne_delta": None if pair is None else pair.get("ne_delta"),
            # techniques adopted alone but left out of the set: over the budget with the others
            "left_out": ((matrix.get("adopted") or {}).get(model) or {}).get("left_out", {}),
        }
        if note:
            models[model]["note"] = note
    if problems:
        raise LockError("cannot write the lock: " + "; ".join(problems) + "; run `smt ecosystem run` again")
    if len(hosts) > 1 or len(templates) > 1:
        raise LockError(f"cannot write the lock: cells of several host versions ({', '.join(sorted(map(str, hosts)))})")
    return {
        "version": LOCK_VERSION,
        "host": next(iter(hosts), None),
        "template": next(iter(templates), None),
        "alpha": matrix.get("alpha"),
        "models": models,
    }


def write_lock(lock: dict, path: Path) -> None:
    """Writes ``lock`` to ``path`` as strict JSON, atomically: a failed write
    keeps the previous lock file whole."""
    write_json_atomic(lock, Path(path))


def read_lock(path: Path) -> dict:
    """The lock at ``path``. Raises LockError (naming the file) for a file
    that is not a lock of this format."""
    path = Path(path)
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LockError(f"{path}: not a lock file: {exc}") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("models"), dict):
        raise LockError(f"{path}: not a lock file (no models)")
    if lock.get("version") != LOCK_VERSION:
        raise LockError(
            f"{path}: lock format {lock.get('version')!r}, this host reads {LOCK_VERSION} (it records the capacity "
            f"too): write it again with `smt ecosystem lock`"
        )
    for model, entry in lock["models"].items():
        problem = _entry_problem(entry)
        if problem:
            where, what = problem
            raise LockError(f"{path}: {what} @ $.models.{model}{where}")
    return lock


#: what each model's entry of a lock holds, its techniques' keys, its capacity's keys
_ENTRY_KEYS = ("techniques", "capacity", "spec_hash", "data_hash")
_TECHNIQUE_KEYS = ("technique", "dist", "version", "params")
_CAPACITY_KEYS = ("mode", "budget", "tolerance", "achieved", "scale")


def _entry_problem(entry: Any) -> tuple[str, str] | None:
    """The first thing wrong in a lock's model entry: ``(path below the
    entry, what)``, e.g. ``(".capacity", "missing scale")``; None when whole.

    Example:
        >>> _entry_problem({"techniques": [], "capacity": {"mode": "baseline"}, "spec_hash": "", "data_hash": ""})
        ('.capacity', 'missing budget, tolerance, achieved, scale')
    """
    if not isinstance(entry, Mapping):
        return "", "not a table"
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        return "", f"missing {', '.join(missing)}"
    if not isinstance(entry["techniques"], list):
        return ".techniques", "not a list"
    for i, e in enumerate(entry["techniques"]):
        missing = [k for k in _TECHNIQUE_KEYS if not isinstance(e, Mapping) or k not in e]
        if missing:
            return f".techniques[{i}]", f"missing {', '.join(missing)}"
    cap = entry["capacity"]
    missing = [k for k in _CAPACITY_KEYS if not isinstance(cap, Mapping) or k not in cap]
    if missing:
        return ".capacity", f"missing {', '.join(missing)}"
    return None


def _manifest(model: str, entry: Mapping) -> Any:
    from smt_host.model.plan import Manifest, ManifestEntry

    return Manifest(
        host="",
        techniques=tuple(
            ManifestEntry(e["technique"], e["dist"], e["version"], e.get("params")) for e in entry["techniques"]
        ),
    )


def check_lock(lock: dict, host: Any) -> None:
    """Raises ManifestMismatch when the installed plugins differ from what
    the lock recorded for any model (:meth:`Manifest.check`, the comparison
    that build, resume and export use too)."""
    from smt_host.model.plan import installed_manifest

    for model, entry in lock.get("models", {}).items():
        recorded = _manifest(model, entry)
        recorded.check(installed_manifest(host.spm, recorded), f"model {model!r}", "cannot train it as locked")


def _diff_paths(old: Any, new: Any, path: str = "$") -> list[str]:
    """The paths where two plain data trees differ, with both values.

    Example:
        >>> _diff_paths({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 3]}, "d": 0})
        ['$.b.c[1]: 2 locked, 3 now', '$.d: absent locked, 0 now']
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in old:
                out.append(f"{path}.{k}: absent locked, {json.dumps(new[k])} now")
            elif k not in new:
                out.append(f"{path}.{k}: {json.dumps(old[k])} locked, absent now")
            else:
                out += _diff_paths(old[k], new[k], f"{path}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff_paths(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {json.dumps(old)} locked, {json.dumps(new)} now"]


def _differs(what: str, recorded: Any, now: Any) -> str:
    """``"its spec differs from the lock's ($.a: 1 locked, 2 now)"``: at most 3 paths shown."""
    paths = _diff_paths(recorded, now) if recorded is not None else []
    shown = "; ".join(paths[:3]) + (f"; and {len(paths) - 3} more" if len(paths) > 3 else "")
    verb = "differ" if what.endswith("s") else "differs"
    return f"its {what} {verb} from the lock's" + (f" ({shown})" if shown else "")


def locked_spec(spec: ModelSpec, entry: Mapping) -> tuple[ModelSpec, frozenset[str]]:
    """The spec with the locked techniques' parameters and the locked
    capacity (budget and tolerance), and the set of techniques to use."""
    techniques = dict(spec.techniques)
    for e in entry["techniques"]:
        techniques[e["technique"]] = e["params"] if e["params"] is not None else True
    cap = entry["capacity"]
    capacity = attrs.evolve(spec.capacity, budget=cap["budget"], tolerance=cap["tolerance"])
    spec = attrs.evolve(spec, techniques=techniques, capacity=capacity)
    return spec, frozenset(e["technique"] for e in entry["techniques"])


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=EXACT, abs_tol=0.0)


@attrs.frozen
class Locked:
    """The models of one ``smt train --locked`` run, each checked and planned
    at its locked capacity: ``{model: (locked spec, plan)}``."""

    models: Mapping[str, tuple[ModelSpec, Any]]
    #: per model, the installed techniques that apply to it but that the lock's
    #: matrix did not evaluate there (or evaluated at another version), as
    #: ``"name (dist version)"``; the locked run leaves them out
    unevaluated: Mapping[str, list[str]] = attrs.Factory(dict)

    def apply(self, spec: ModelSpec) -> tuple[ModelSpec, Any]:
        """The locked spec and plan of ``spec``'s model, with this run's
        training settings (``--epochs``, ``--seed``) taken from ``spec``."""
        locked, plan = self.models[spec.name]
        if spec.training.seed != plan.seed:
            plan = attrs.evolve(plan, seed=spec.training.seed)
        return attrs.evolve(locked, training=spec.training), plan


def prepare_locked(
    host: Any, eco: EcosystemSpec, specs: Iterable[ModelSpec], lock: Mapping, where: str = "lock"
) -> Locked:
    """Checks every model of ``specs`` against ``lock`` and plans each at its
    locked capacity, before anything trains.

    ``specs`` are the models as the ecosystem defines them (with ``--set``),
    before a run's ``--epochs`` / ``--seed``: those only change how long
    and from which seed it trains (:meth:`Locked.apply`).

    Raises:
        LockError: ``"<where>: model 'x': <problem>; model 'y': ..."``, every
            problem of every model: not in the lock, another host or
            template version, another spec or data settings (with the
            differing keys), other installed techniques, or a plan whose
            capacity is not the measured one.
    """
    from smt_host.errors import CapacityError

    models = lock.get("models", {})
    host_version = host.spm.distributions[HOST_DIST]
    problems = []
    if lock.get("host") != host_version:
        problems.append(f"made with smt-host {lock.get('host')}, this is smt-host {host_version}")
    if lock.get("template") != template_version():
        problems.append(f"made with template version {lock.get('template')}, this host's is {template_version()}")
    planned = {}
    for spec in specs:
        name = f"model {spec.name!r}"
        entry = models.get(spec.name)
        if entry is None:
            problems.append(f"{name} is not in the lock (models: {', '.join(models) or 'none'})")
            continue
        found = []
        identity = spec_identity(host, spec)
        if digest(identity) != entry.get("spec_hash"):
            found.append(_differs("spec", entry.get("spec"), identity))
        data = data_settings(host, spec, eco)
        if digest(data) != entry.get("data_hash"):
            found.append(_differs("data settings", entry.get("data_settings"), data))
        try:
            check_lock({"models": {spec.name: entry}}, host)
        except ManifestMismatch as exc:
            found.append(str(exc).removeprefix(f"{name}: "))
        if not found:
            locked, only = locked_spec(spec, entry)
            cap = entry["capacity"]
            try:
                plan = host.plan(locked, only=only)
            except CapacityError as exc:
                found.append(f"cannot be built at the locked capacity: {exc}")
            else:
                built = plan.capacity
                recorded = _manifest(spec.name, entry)
                current = [e for e in plan.manifest.techniques if e.dist != HOST_DIST]
                diff = recorded.diff(attrs.evolve(plan.manifest, techniques=tuple(current)))
                if diff:
                    found.append("cannot train it as locked: " + "; ".join(diff))
                elif not (_close(built.achieved, cap["achieved"]) and _close(built.scale, cap["scale"])):
                    found.append(
                        f"planned at {built.achieved:,.0f} FLOPs/example (over-arch scale {built.scale:.4g}), "
                        f"the lock measured {cap['achieved']:,.0f} (scale {cap['scale']:.4g})"
                    )
                else:
                    planned[spec.name] = (locked, plan)
        problems += [f"{name}: {f}" for f in found]
    if problems:
        raise LockError(f"{where}: " + "; ".join(problems))
    return Locked(planned, {m: u for m, u in ((s.name, unevaluated(host, s, models[s.name])) for s in specs) if u})


def unevaluated(host: Any, spec: ModelSpec, entry: Mapping) -> list[str]:
    """The installed techniques that apply to ``spec`` alone but that the
    lock ``entry`` did not evaluate: not tried, or tried at another version
    of their distribution (``"dcnv3 (smt-dcnv3 0.1.0)"``). Empty for a lock
    that does not record what it evaluated (written by an older host)."""
    from smt_host.ecosystem.cells import applicable_techniques

    tried = entry.get("evaluated")
    if tried is None:
        return []
    out = []
    records = {reg.name: reg for reg in host.spm.all_ordered()}
    for name in applicable_techniques(host, spec):
        reg = records[name]
        seen = tried.get(name)
        if seen is None or seen.get("version") not in (None, reg.version):
            out.append(f"{name} ({reg.dist} {reg.version})")
    return out
