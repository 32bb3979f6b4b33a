"""The lock: the adopted technique set per model, and training from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from smt_host.ecosystem.analysis import adopted_sets
from smt_host.errors import LockError
from smt_host.files import write_json_atomic
from smt_host.spec.schema import ModelSpec


def make_lock(matrix: dict) -> dict:
    """``{"version": 1, "models": {model: [{technique, dist, version, params}]}}``."""
    return {"version": 1, "models": adopted_sets(matrix)}


def write_lock(lock: dict, path: Path) -> None:
    """Writes ``lock`` to ``path`` as strict JSON, atomically: a failed write
    keeps the previous lock file whole."""
    write_json_atomic(lock, Path(path))


def check_lock(lock: dict, host: Any) -> None:
    """Raises ManifestMismatch when the installed plugins differ from what
    the lock recorded for any model (:meth:`Manifest.check`, the comparison
    that build, resume and export use too)."""
    from smt_host.model.plan import Manifest, ManifestEntry, installed_manifest

    for model, entries in lock.get("models", {}).items():
        recorded = Manifest(
            host="",
            techniques=tuple(ManifestEntry(e["technique"], e["dist"], e["version"], e.get("params")) for e in entries),
        )
        recorded.check(installed_manifest(host.spm, recorded), f"model {model!r}", "cannot train it as locked")


def locked_spec(spec: ModelSpec, lock: dict) -> tuple[ModelSpec, frozenset[str]]:
    """The spec with the locked parameters, and the set of techniques to use."""
    if spec.name not in lock.get("models", {}):
        raise LockError(f"model {spec.name!r} is not in the lock (models: {', '.join(lock.get('models', {}))})")
    entries = lock["models"][spec.name]
    techniques = dict(spec.techniques)
    for e in entries:
        techniques[e["technique"]] = e["params"] if e["params"] is not None else True
    return attrs.evolve(spec, techniques=techniques), frozenset(e["technique"] for e in entries)
