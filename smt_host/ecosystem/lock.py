"""The lock: the adopted technique set per model, and training from it."""

from __future__ import annotations

from typing import Any

import attrs

from smt_host.ecosystem.analysis import adopted_sets
from smt_host.errors import LockError
from smt_host.spec.schema import ModelSpec


def make_lock(matrix: dict) -> dict:
    """``{"version": 1, "models": {model: [{technique, dist, version, params}]}}``."""
    return {"version": 1, "models": adopted_sets(matrix)}


def check_lock(lock: dict, host: Any) -> None:
    """Raises LockError when a locked technique is missing or its version differs."""
    problems = []
    for model, entries in lock.get("models", {}).items():
        for e in entries:
            reg = host.spm.techniques.get(e["technique"])
            if reg is None:
                problems.append(f"{model}: technique {e['technique']!r} ({e['dist']} {e['version']}) is locked but not installed")
            elif (reg.dist, reg.version) != (e["dist"], e["version"]):
                problems.append(f"{model}: technique {e['technique']!r} is locked at {e['dist']} {e['version']}, installed is {reg.dist} {reg.version}")
    if problems:
        raise LockError("; ".join(problems))


def locked_spec(spec: ModelSpec, lock: dict) -> tuple[ModelSpec, frozenset[str]]:
    """The spec with the locked parameters, and the set of techniques to use."""
    if spec.name not in lock.get("models", {}):
        raise LockError(f"model {spec.name!r} is not in the lock (models: {', '.join(lock.get('models', {}))})")
    entries = lock["models"][spec.name]
    techniques = dict(spec.techniques)
    for e in entries:
        techniques[e["technique"]] = e["params"] if e["params"] is not None else True
    return attrs.evolve(spec, techniques=techniques), frozenset(e["technique"] for e in entries)
