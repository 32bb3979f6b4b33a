"""The ecosystem loop: technique x model adoption at neutral capacity.

For every model it trains the baseline (built-ins only), the baseline plus
each applicable technique alone, and the baseline plus every applicable
technique, all at the baseline's serving FLOPs (capacity-neutral), over N
seeds. A *cell* is one (model, arm, seed) training run; each finished cell
writes ``cells/<model>/<arm>/seed<k>.json`` atomically (strict JSON,
:mod:`smt_host.files`). With ``jobs > 1`` cells train in spawned worker
processes that end when the main process does, even when it is killed
outright (:mod:`smt_host.lifeline`).

A cell is keyed by what determines its result (:class:`Fingerprint`): a
hash of the model's resolved spec at neutral capacity, of the arm's
manifest (techniques, distribution versions, parameters; host and template
version), of the data settings, and the seed. A finished cell whose stored
key is the current one is not trained again (resume); one whose key
differs is stale, is trained again, and is never read as a result
(:func:`cell_status` says why: ``spec changed``, ``manifest changed``,
``data changed``).

The decision rule is in :mod:`smt_host.ecosystem.analysis`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from smt_host.errors import ExitCode, SmtError
from smt_host.files import write_json_atomic
from smt_host.lifeline import die_with_parent
from smt_host.model.resolve import resolve
from smt_host.plugins import HOST_DIST
from smt_host.spec.schema import EcosystemSpec, ModelSpec

log = logging.getLogger(__name__)

BASELINE = "baseline"
ALL = "all"
#: prefix of the arm that trains a model's adopted set together: "adopted=a+b"
ADOPTED = "adopted="
#: what ``--keep-checkpoints`` accepts: no checkpoint, the best weights only
#: (what ``smt export`` needs, no optimizer state), or the whole checkpoint
KEEP_CHECKPOINTS = ("none", "best", "all")
#: a cell's status when its stored result is the current one
DONE = "done"
NEW = "new"


@attrs.frozen
class Cell:
    """One training run of the matrix."""

    model: str
    #: "baseline", a technique name, "all" or "adopted=a+b"; a technique with
    #: parameters set, "x~k=v;k2=v2" (tuning); any of them at a fraction of
    #: the neutral FLOPs, "adopted=a+b@0.25" (capacity saved)
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.arm}/seed{self.seed}"


def digest(obj: Any) -> str:
    """A short, stable hash of plain data (16 hex digits of SHA-256 over
    canonical JSON: sorted keys, no spaces).

    Example:
        >>> digest({"b": 1, "a": [1.0, None]}) == digest({"a": [1.0, None], "b": 1})
        True
        >>> len(digest({}))
        16
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def template_version() -> str:
    """The version of the template that builds every model: the host's
    ``smt_host.model.template.TEMPLATE_VERSION`` where it declares one, else
    the host version (the template ships with the host)."""
    from smt_host._version import __version__
    from smt_host.model import template

    return str(getattr(template, "TEMPLATE_VERSION", None) or __version__)


#: separates an arm from the technique parameters it sets: "dcnv2~num_layers=2;rank=8"
SETTING = "~"
#: separates an arm from the fraction of the neutral FLOPs it is trained at: "adopted=a+b@0.25"
FRACTION = "@"


def _toml(value: Any) -> str:
    """``value`` as the TOML text ``--set`` reads back (:func:`smt_host.spec.layers.parse_override`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value and all(c.isalnum() or c in "_-." for c in value) else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise ValueError(f"a search value must be a number, a boolean, a string or a list of them, got {value!r}")


def setting_label(setting: Mapping[str, Any]) -> str:
    """A technique setting as the text of an arm (``key=value;...``, keys
    sorted, values as TOML). Raises ValueError for a value it cannot write
    and read back unchanged.

    Example:
        >>> setting_label({"rank": 8, "num_layers": 2, "kind": "adam"})
        'kind=adam;num_layers=2;rank=8'
        >>> parse_setting(setting_label({"widths": [64, 32], "on": True}))
        {'on': True, 'widths': [64, 32]}
    """
    label = ";".join(f"{k}={_toml(setting[k])}" for k in sorted(setting))
    if parse_setting(label) != {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}:
        raise ValueError(f"the setting {dict(setting)} cannot be written as an arm name")
    return label


def parse_setting(label: str) -> dict[str, Any]:
    """The setting an arm's ``key=value;...`` text names (:func:`setting_label`)."""
    from smt_host.spec.layers import parse_override

    out = {}
    for part in filter(None, label.split(";")):
        (key, *_), value = parse_override(part)
        out[key] = value
    return out


def tuned_arm(technique: str, setting: Mapping[str, Any]) -> str:
    """The arm that trains ``technique`` alone with the parameters ``setting``."""
    return f"{technique}{SETTING}{setting_label(setting)}"


def scaled_arm(arm: str, fraction: float) -> str:
    """``arm`` trained at ``fraction`` of the neutral FLOPs (rounded to 4 digits).

    Example:
        >>> scaled_arm("adopted=a+b", 1 / 3), arm_parts(scaled_arm("adopted=a+b", 1 / 3))
        ('adopted=a+b@0.3333', ('adopted=a+b', {}, 0.3333))
    """
    return f"{arm_parts(arm)[0]}{FRACTION}{fraction:.4g}"


def arm_parts(arm: str) -> tuple[str, dict[str, Any], float | None]:
    """``(base arm, technique setting, fraction of the neutral FLOPs or None)``
    of an arm: ``"dcnv2~num_layers=2@0.5"`` is ``("dcnv2", {"num_layers": 2}, 0.5)``."""
    base, _, fraction = arm.partition(FRACTION)
    base, _, label = base.partition(SETTING)
    return base, parse_setting(label), (float(fraction) if fraction else None)


def arm_kwargs(arm: str) -> dict:
    """Plan arguments of an arm."""
    arm = arm_parts(arm)[0]
    if arm == BASELINE:
        return {"builtins_only": True}
    if arm == ALL:
        return {}
    if arm.startswith(ADOPTED):
        return {"only": frozenset(arm[len(ADOPTED) :].split("+"))}
    return {"only": frozenset({arm})}


def applicable_techniques(host: Any, spec: ModelSpec) -> list[str]:
    """External techniques that are active in ``spec`` when installed alone."""
    names = []
    for reg in host.spm.all_ordered():
        if reg.builtin:
            continue
        try:
            res = resolve(spec, host.spm, host.conv, only=frozenset({reg.name}))
        except Exception:  # noqa: BLE001 - a technique that cannot stand alone is not an arm
            continue
        if reg.name in res.names():
            names.append(reg.name)
    return names


def matrix_cells(host: Any, eco: EcosystemSpec, seeds: int, models: Iterable[str] | None = None) -> list[Cell]:
    """Every cell of the matrix, in a fixed order."""
    cells = []
    for spec in eco.models.values():
        if models is not None and spec.name not in models:
            continue
        techniques = applicable_techniques(host, spec)
        arms = [BASELINE, *techniques] + ([ALL] if len(techniques) > 1 else [])
        for arm in arms:
            for seed in range(seeds):
                cells.append(Cell(spec.name, arm, seed))
    return cells


def neutral_spec(spec: ModelSpec, seed: int) -> ModelSpec:
    """The spec at neutral capacity ("baseline" FLOPs unless it has a budget) and ``seed``."""
    capacity = spec.capacity if spec.capacity.budget is not None else attrs.evolve(spec.capacity, budget="baseline")
    return attrs.evolve(spec, capacity=capacity, training=attrs.evolve(spec.training, seed=seed))


def with_setting(spec: ModelSpec, arm: str) -> ModelSpec:
    """``spec`` with the technique parameters an arm sets (``"x~k=v"``)
    merged over the spec's own table for that technique."""
    base, setting, _ = arm_parts(arm)
    if not setting:
        return spec
    own = spec.techniques.get(base)
    table = {**(own if isinstance(own, Mapping) else {}), **setting}
    return attrs.evolve(spec, techniques={**spec.techniques, base: table})


def neutral_flops(host: Any, spec: ModelSpec) -> float:
    """The neutral budget of ``spec`` in FLOPs per example: its own budget
    when it is a number, else the FLOPs of its built-ins-only baseline."""
    budget = spec.capacity.budget
    if budget is not None and budget != "baseline":
        return float(budget)
    unbudgeted = attrs.evolve(spec, capacity=attrs.evolve(spec.capacity, budget=None))
    return host.plan(unbudgeted, builtins_only=True).cost.flops


def cell_spec(host: Any, spec: ModelSpec, cell: Cell) -> ModelSpec:
    """The spec a cell trains: at neutral capacity and the cell's seed, with
    its arm's technique setting, and for an arm at a fraction of the
    neutral FLOPs (``"...@0.25"``) that budget in FLOPs."""
    out = with_setting(neutral_spec(spec, cell.seed), cell.arm)
    fraction = arm_parts(cell.arm)[2]
    if fraction is not None:
        budget = fraction * neutral_flops(host, out)
        out = attrs.evolve(out, capacity=attrs.evolve(out.capacity, budget=budget))
    return out


# ------------------------------------------------------------ fingerprints


def spec_identity(host: Any, spec: ModelSpec) -> dict:
    """The part of a model's resolved spec that determines what it learns,
    as plain data: the spec at neutral capacity without its description,
    its data settings (:func:`data_settings`) and its seed (each keyed
    apart)."""
    data = host.conv.unstructure(neutral_spec(spec, 0))
    data.pop("description", None)
    data.pop("data", None)
    data["training"].pop("seed", None)
    return data


def data_settings(host: Any, spec: ModelSpec, eco: EcosystemSpec) -> dict:
    """What determines a model's batches, as plain data: its data source
    (with the distribution and version that provide it), the source's
    options and surface, and for the synthetic source the ecosystem's
    synthetic settings (seed and split sizes). Settings, not file contents:
    a data file rewritten in place under the same name is not noticed."""
    record = host.spm.data_sources.get(spec.data.source)
    return {
        "source": spec.data.source,
        "provider": None if record is None else f"{record.dist} {record.version}",
        "surface": spec.data.surface or spec.surface,
        "options": host.conv.unstructure(dict(spec.data.options)),
        "synthetic": host.conv.unstructure(eco.synthetic) if spec.data.source == "synthetic" else None,
    }


def arm_manifest(host: Any, spec: ModelSpec, arm: str) -> dict:
    """The techniques an arm trains (every active one, built-ins too, with
    distribution, version and parameters) and the host and template
    versions, as plain data. Resolved, not planned: nothing is built."""
    res = resolve(with_setting(neutral_spec(spec, 0), arm), host.spm, host.conv, **arm_kwargs(arm))
    return {
        "host": host.spm.distributions[HOST_DIST],
        "template": template_version(),
        "techniques": [
            {
                "technique": a.name,
                "slot": a.slot,
                "dist": a.dist,
                "version": a.version,
                "params": None if a.params is None else host.conv.unstructure(a.params),
            }
            for a in res.active
        ],
    }


#: the parts of a fingerprint, in the order :func:`cell_status` names them
PARTS = ("spec", "manifest", "data", "seed")


@attrs.frozen
class Fingerprint:
    """What determines one cell's result, hashed (:func:`digest`).

    Args:
        spec: hash of :func:`spec_identity`.
        manifest: hash of :func:`arm_manifest` (techniques with distribution
            versions and parameters, host and template version).
        data: hash of :func:`data_settings`.
        seed: the training seed.
        host, template: the host and template versions (also inside ``manifest``).
    """

    spec: str
    manifest: str
    data: str
    seed: int
    host: str = ""
    template: str = ""

    @property
    def key(self) -> str:
        """One hash of the four parts: the cell's key."""
        return digest([self.spec, self.manifest, self.data, self.seed])

    def to_dict(self) -> dict:
        return {"key": self.key, **attrs.asdict(self)}


def fingerprint(host: Any, eco: EcosystemSpec, cell: Cell) -> Fingerprint:
    """The fingerprint of ``cell`` with the installed plugins and ``eco`` as it is now."""
    spec = eco.model(cell.model)
    manifest = arm_manifest(host, spec, cell.arm)
    identity = spec_identity(host, spec)
    fraction = arm_parts(cell.arm)[2]
    if fraction is not None:  # trained at a fraction of the neutral FLOPs: another capacity
        identity["capacity"]["fraction"] = fraction
    return Fingerprint(
        spec=digest(identity),
        manifest=digest(manifest),
        data=digest(data_settings(host, spec, eco)),
        seed=cell.seed,
        host=manifest["host"],
        template=manifest["template"],
    )


def cell_status(stored: Mapping | None, current: Fingerprint) -> str:
    """Why a cell would train: ``new`` (no result), ``old format`` (a result
    written before cells had keys), ``spec changed``, ``manifest changed``,
    ``data changed`` (several joined by ``", "``), or ``done`` (its stored
    key is the current one: not trained again).

    Example:
        >>> now = Fingerprint("s1", "m1", "d1", 0)
        >>> cell_status(None, now), cell_status({"fingerprint": now.to_dict()}, now)
        ('new', 'done')
        >>> cell_status({"fingerprint": Fingerprint("s0", "m1", "d0", 0).to_dict()}, now)
        'spec changed, data changed'
    """
    if stored is None:
        return NEW
    old = stored.get("fingerprint")
    if not isinstance(old, Mapping):
        return "old format"
    if old.get("key") == current.key:
        return DONE
    changed = [f"{part} changed" for part in PARTS if old.get(part) != getattr(current, part)]
    return ", ".join(changed) or "key changed"


def cell_path(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / cell.model / cell.arm / f"seed{cell.seed}.json"


def run_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "runs" / cell.model / cell.arm / f"seed{cell.seed}"


def keep_checkpoint(folder: Path, keep: str) -> None:
    """Trims the checkpoint a finished run left in ``folder``: ``none``
    removes it, ``best`` keeps the best weights with the plan, manifest and
    spec (what ``smt export`` reads) and drops the optimizer state, the copy
    of the best weights and the previous checkpoint, ``all`` keeps them."""
    from smt_host.train import checkpoint as ckpt

    if keep not in KEEP_CHECKPOINTS:
        raise ValueError(f"keep must be one of {', '.join(KEEP_CHECKPOINTS)}, got {keep!r}")
    path = Path(folder) / ckpt.CHECKPOINT
    if keep == "all" or not path.exists():
        return
    if keep == "none":
        ckpt.remove(path)  # and the previous checkpoint kept beside it
        return
    saved = ckpt.load(path)
    if "model" not in saved:  # sharded weights (DCP): left as they are
        return
    slim = {k: v for k, v in saved.items() if k not in ("optimizers", "best_model", "rng")}
    ckpt.save_atomic(slim, path, keep_previous=False)


def _identity(host: Any, eco: EcosystemSpec, cell: Cell) -> dict:
    """What a cell's result JSON records of what determined it."""
    model = eco.model(cell.model)
    return {
        "cell": attrs.asdict(cell),
        "fingerprint": fingerprint(host, eco, cell).to_dict(),
        "spec": spec_identity(host, model),
        "data_settings": data_settings(host, model, eco),
    }


def cell_record(host: Any, eco: EcosystemSpec, cell: Cell, plan: Any, **result: Any) -> dict:
    """The result JSON of a cell trained with ``plan``: its fingerprint, the
    spec and data settings it was keyed by, the plan's cost, capacity and
    external techniques, and ``result`` (``test``, ``epochs``, ``wall_s``)."""
    return {
        **_identity(host, eco, cell),
        **result,
        "flops": plan.cost.flops,
        "dense_params": plan.cost.dense_params,
        "embedding_bytes": plan.cost.embedding_bytes,
        "capacity": host.conv.unstructure(plan.capacity),
        "techniques": [
            {"technique": e.technique, "dist": e.dist, "version": e.version, "params": e.params}
            for e in plan.entries
            if e.dist != HOST_DIST
        ],
    }


def plan_cell(host: Any, eco: EcosystemSpec, cell: Cell) -> tuple[ModelSpec, Any]:
    """The spec a cell trains (:func:`cell_spec`) and its plan, with the
    arm's techniques only. Raises CapacityError when the arm cannot meet
    the budget."""
    spec = cell_spec(host, eco.model(cell.model), cell)
    return spec, host.plan(spec, **arm_kwargs(cell.arm))


def set_fits(host: Any, eco: EcosystemSpec) -> Any:
    """``fits(model, names)`` for :func:`smt_host.ecosystem.analysis.choose_adopted`:
    None when ``model`` with the techniques ``names`` together plans within
    its neutral budget, else the capacity error's message."""
    from smt_host.errors import CapacityError

    def fits(model: str, names: frozenset) -> str | None:
        try:
            plan_cell(host, eco, Cell(model, ADOPTED + "+".join(sorted(names)), 0))
        except CapacityError as exc:
            return str(exc)
        return None

    return fits


def run_cell(host: Any, eco: EcosystemSpec, cell: Cell, out: Path, *, keep_checkpoints: str = "best") -> dict:
    """Trains one cell and writes its result JSON (:func:`cell_record`);
    returns the result. An arm that cannot meet the neutral budget is
    recorded as ``over_budget`` (rejected, not fatal)."""
    from smt_host.errors import CapacityError
    from smt_host.train.trainer import train_model

    started, cpu = time.perf_counter(), time.process_time()
    try:
        spec, plan = plan_cell(host, eco, cell)
    except CapacityError as exc:
        data = {**_identity(host, eco, cell), "over_budget": str(exc)}
        write_json_atomic(data, cell_path(out, cell))
        return data
    folder = run_dir(out, cell)
    result = train_model(host, spec, eco, folder, plan=plan)
    keep_checkpoint(folder, keep_checkpoints)
    data = cell_record(
        host,
        eco,
        cell,
        plan,
        test=result.test,
        epochs=result.epochs,
        wall_s=time.perf_counter() - started,
        cpu_s=time.process_time() - cpu,  # this process's CPU time: what the cell costs on a busy machine
    )
    write_json_atomic(data, cell_path(out, cell))
    return data


def read_cell(out: Path, cell: Cell, current: Fingerprint | None = None) -> dict | None:
    """The result of a finished cell; None when it has none, or one that cannot
    be read (it is trained again). With ``current``, also None when the
    stored result is not that fingerprint's (stale: it is trained again)."""
    path = cell_path(out, cell)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable cell result (%s); training the cell again", path, exc)
        return None
    if not isinstance(data, dict):
        return None
    if current is not None and cell_status(data, current) != DONE:
        return None
    return data


def fingerprints(host: Any, eco: EcosystemSpec, cells: Iterable[Cell]) -> dict[Cell, Fingerprint]:
    """The current fingerprint of each cell (resolved once per model and arm)."""
    memo: dict[tuple[str, str], Fingerprint] = {}
    out = {}
    for cell in cells:
        base = memo.get((cell.model, cell.arm))
        if base is None:
            base = memo[(cell.model, cell.arm)] = fingerprint(host, eco, attrs.evolve(cell, seed=0))
        out[cell] = attrs.evolve(base, seed=cell.seed)
    return out


def cell_statuses(out: Path, keys: Mapping[Cell, Fingerprint]) -> dict[Cell, str]:
    """Each cell's :func:`cell_status` against what ``out`` holds (the dry run)."""
    return {cell: cell_status(read_cell(out, cell), fp) for cell, fp in keys.items()}


class CellsFailed(SmtError, RuntimeError):
    """Cells that failed in the worker processes (``"cells failed: <key>: <error>; ..."``).

    ``exit_code`` is 2 (bad input) when every failure was bad input (a data
    file, a spec...), as the same error in one process would be; else 1.
    """

    def __init__(self, errors: list[str], exit_code: int = ExitCode.FAILED) -> None:
        self.errors = list(errors)
        self.exit_code = ExitCode(exit_code)
        super().__init__("cells failed: " + "; ".join(self.errors))


def _worker(args: tuple) -> tuple[str, str | None, int]:
    """Process-pool entry: trains one cell in a fresh host."""
    eco_data, cell_dict, out, keep = args
    import torch

    torch.set_num_threads(1)
    from smt_host.host import Host

    host = Host.create()
    # the parent's ecosystem as it resolved it (layers, --set, sizes): never re-read from its file
    eco = host.conv.structure(eco_data, EcosystemSpec)
    cell = Cell(**cell_dict)
    try:
        run_cell(host, eco, cell, Path(out), keep_checkpoints=keep)
        return cell.key, None, 0
    except Exception as exc:  # noqa: BLE001 - reported per cell
        code = int(exc.exit_code) if isinstance(exc, SmtError) else int(ExitCode.FAILED)
        return cell.key, f"{type(exc).__name__}: {exc}", code


def _stop_workers(pool: Any) -> None:
    """Cancels the cells not started and terminates the workers of ``pool``."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError):  # already gone
            proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def run_matrix(
    host: Any,
    eco: EcosystemSpec,
    out: Path,
    *,
    seeds: int = 3,
    jobs: int = 1,
    models: Iterable[str] | None = None,
    keep_checkpoints: str = "best",
    on_done: Callable[[Cell, bool], None] = lambda c, skipped: None,
) -> list[Cell]:
    """Trains every cell of the matrix that is not done with its current
    fingerprint (``jobs`` processes); returns all cells."""
    cells = matrix_cells(host, eco, seeds, models)
    return run_cells(host, eco, out, cells, jobs=jobs, keep_checkpoints=keep_checkpoints, on_done=on_done)


def run_cells(
    host: Any,
    eco: EcosystemSpec,
    out: Path,
    cells: list[Cell],
    *,
    jobs: int = 1,
    keep_checkpoints: str = "best",
    keys: Mapping[Cell, Fingerprint] | None = None,
    on_done: Callable[[Cell, bool], None] = lambda c, skipped: None,
) -> list[Cell]:
    """Trains the ``cells`` whose stored result is not their current
    fingerprint's (``keys``; default: computed now); returns them."""
    out = Path(out)
    if keep_checkpoints not in KEEP_CHECKPOINTS:
        raise ValueError(f"keep_checkpoints must be one of {', '.join(KEEP_CHECKPOINTS)}, got {keep_checkpoints!r}")
    keys = fingerprints(host, eco, cells) if keys is None else keys
    todo = []
    for cell in cells:
        if read_cell(out, cell, keys[cell]) is not None:
            on_done(cell, True)
        else:
            todo.append(cell)
    if jobs <= 1:
        for cell in todo:
            run_cell(host, eco, cell, out, keep_checkpoints=keep_checkpoints)
            on_done(cell, False)
        return cells
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    eco_data = host.conv.unstructure(eco)
    args = [(eco_data, attrs.asdict(c), str(out), keep_checkpoints) for c in todo]
    errors, codes = [], set()
    # each worker ends when this process does, even killed outright (SIGKILL)
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=mp.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        futures = {pool.submit(_worker, a): c for a, c in zip(args, todo)}
        try:
            for fut in as_completed(futures):
                key, err, code = fut.result()
                if err:
                    errors.append(f"{key}: {err}")
                    codes.add(code)
                on_done(futures[fut], False)
        except BaseException:  # Ctrl-C, a broken pool...: do not wait for the cells still training
            _stop_workers(pool)
            raise
    if errors:
        raise CellsFailed(errors, ExitCode.USAGE_ERROR if codes == {ExitCode.USAGE_ERROR} else ExitCode.FAILED)
    return cells
