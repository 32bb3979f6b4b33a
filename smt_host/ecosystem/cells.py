"""The ecosystem loop: technique x model adoption at neutral capacity.

For every model it trains the baseline (built-ins only), the baseline plus
each applicable technique alone, and the baseline plus every applicable
technique, all at the baseline's serving FLOPs (capacity-neutral), over N
seeds. A *cell* is one (model, arm, seed) training run; each finished cell
writes ``cells/<model>/<arm>/seed<k>.json`` atomically (strict JSON,
:mod:`smt_host.files`), so an interrupted run resumes without
retraining finished cells. With ``jobs > 1`` cells train in spawned worker
processes that end when the main process does, even when it is killed
outright (:mod:`smt_host.ecosystem.workers`).

Decision rule (written down, tested): a technique is **adopted** for a model
when, paired by seed, the mean relative NE change (arm - baseline) /
baseline, averaged over the model's tasks, is negative and its magnitude
exceeds twice its standard error (std / sqrt(n)); with one seed the
standard error is unknown and nothing is adopted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from smt_host.ecosystem.workers import die_with_parent
from smt_host.errors import ExitCode, SmtError
from smt_host.files import write_json_atomic
from smt_host.model.resolve import resolve
from smt_host.plugins import HOST_DIST
from smt_host.spec.schema import EcosystemSpec, ModelSpec

log = logging.getLogger(__name__)

BASELINE = "baseline"
ALL = "all"
#: prefix of the arm that trains a model's adopted set together: "adopted=a+b"
ADOPTED = "adopted="


@attrs.frozen
class Cell:
    """One training run of the matrix."""

    model: str
    arm: str  # "baseline", a technique name, or "all"
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.arm}/seed{self.seed}"


def arm_kwargs(arm: str) -> dict:
    """Plan arguments of an arm."""
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


def cell_path(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / cell.model / cell.arm / f"seed{cell.seed}.json"


def run_cell(host: Any, eco: EcosystemSpec, cell: Cell, out: Path) -> dict:
    """Trains one cell and writes its result JSON; returns the result."""
    from smt_host.errors import CapacityError
    from smt_host.train.trainer import train_model

    spec = neutral_spec(eco.model(cell.model), cell.seed)
    try:
        plan = host.plan(spec, **arm_kwargs(cell.arm))
    except CapacityError as exc:
        # the arm cannot run at neutral capacity: recorded, and rejected
        data = {"cell": attrs.asdict(cell), "over_budget": str(exc)}
        write_json_atomic(data, cell_path(out, cell))
        return data
    started = time.perf_counter()
    run_dir = Path(out) / "runs" / cell.model / cell.arm / f"seed{cell.seed}"
    result = train_model(host, spec, eco, run_dir, plan=plan)
    data = {
        "cell": attrs.asdict(cell),
        "test": result.test,
        "epochs": result.epochs,
        "wall_s": time.perf_counter() - started,
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
    write_json_atomic(data, cell_path(out, cell))
    return data


def read_cell(out: Path, cell: Cell) -> dict | None:
    """The result of a finished cell; None when it has none, or one that cannot
    be read (it is trained again)."""
    path = cell_path(out, cell)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable cell result (%s); training the cell again", path, exc)
        return None
    return data if isinstance(data, dict) else None


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
    eco_data, cell_dict, out = args
    import torch

    torch.set_num_threads(1)
    from smt_host.host import Host

    host = Host.create()
    # the parent's ecosystem as it resolved it (layers, --set, sizes): never re-read from its file
    eco = host.conv.structure(eco_data, EcosystemSpec)
    cell = Cell(**cell_dict)
    try:
        run_cell(host, eco, cell, Path(out))
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
    on_done: Callable[[Cell, bool], None] = lambda c, skipped: None,
) -> list[Cell]:
    """Trains every unfinished cell of the matrix (``jobs`` processes);
    returns all cells. A cell whose result file exists is skipped (resume)."""
    cells = matrix_cells(host, eco, seeds, models)
    return run_cells(host, eco, out, cells, jobs=jobs, on_done=on_done)


def run_cells(
    host: Any,
    eco: EcosystemSpec,
    out: Path,
    cells: list[Cell],
    *,
    jobs: int = 1,
    on_done: Callable[[Cell, bool], None] = lambda c, skipped: None,
) -> list[Cell]:
    """Trains the unfinished ``cells``; returns them."""
    out = Path(out)
    todo = []
    for cell in cells:
        if read_cell(out, cell) is not None:
            on_done(cell, True)
        else:
            todo.append(cell)
    if jobs <= 1:
        for cell in todo:
            run_cell(host, eco, cell, out)
            on_done(cell, False)
        return cells
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    eco_data = host.conv.unstructure(eco)
    args = [(eco_data, attrs.asdict(c), str(out)) for c in todo]
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
