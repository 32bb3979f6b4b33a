"""The ecosystem loop: technique x model adoption at neutral capacity.

For every model it trains the baseline (built-ins only), the baseline plus
each applicable technique alone, and the baseline plus every applicable
technique, all at the baseline's serving FLOPs (capacity-neutral), over N
seeds. A *cell* is one (model, arm, seed) training run; each finished cell
writes ``cells/<model>/<arm>/seed<k>.json`` atomically, so an interrupted run
resumes without retraining finished cells.

Decision rule (written down, tested): a technique is **adopted** for a model
when, paired by seed, the mean relative NE change (arm - baseline) /
baseline, averaged over the model's tasks, is negative and its magnitude
exceeds twice its standard error (std / sqrt(n)); with one seed the
standard error is unknown and nothing is adopted.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import attrs

from smt_host.config import EcosystemSpec, ModelSpec
from smt_host.plugins import HOST_DIST
from smt_host.resolve import resolve
from smt_host.train.checkpoint import write_text_atomic

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
        return {"only": frozenset(arm[len(ADOPTED):].split("+"))}
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


def matrix_cells(host: Any, eco: EcosystemSpec, seeds: int, models: Optional[Iterable[str]] = None) -> list[Cell]:
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
    from smt_host.train.trainer import train_model

    from smt_host.capacity import CapacityError

    spec = neutral_spec(eco.model(cell.model), cell.seed)
    try:
        plan = host.plan(spec, **arm_kwargs(cell.arm))
    except CapacityError as exc:
        # the arm cannot run at neutral capacity: recorded, and rejected
        data = {"cell": attrs.asdict(cell), "over_budget": str(exc)}
        write_text_atomic(json.dumps(data, indent=2), cell_path(out, cell))
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
            for e in plan.entries if e.dist != HOST_DIST
        ],
    }
    write_text_atomic(json.dumps(data, indent=2), cell_path(out, cell))
    return data


def _worker(args: tuple) -> tuple[str, Optional[str]]:
    """Process-pool entry: trains one cell in a fresh host."""
    eco_source, eco_is_default, cell_dict, out, synthetic = args
    import torch

    torch.set_num_threads(1)
    from smt_host.host import Host

    host = Host.create()
    eco = host.default_ecosystem() if eco_is_default else host.load_ecosystem(eco_source)
    if synthetic is not None:
        eco = attrs.evolve(eco, synthetic=host.conv.structure(synthetic, type(eco.synthetic)))
    cell = Cell(**cell_dict)
    try:
        run_cell(host, eco, cell, Path(out))
        return cell.key, None
    except Exception as exc:  # noqa: BLE001 - reported per cell
        return cell.key, f"{type(exc).__name__}: {exc}"


def run_matrix(
    host: Any, eco: EcosystemSpec, out: Path, *, seeds: int = 3, jobs: int = 1,
    models: Optional[Iterable[str]] = None, on_done: Callable[[Cell, bool], None] = lambda c, skipped: None,
    eco_path: Optional[str] = None,
) -> list[Cell]:
    """Trains every unfinished cell of the matrix (``jobs`` processes);
    returns all cells. A cell whose result file exists is skipped (resume)."""
    cells = matrix_cells(host, eco, seeds, models)
    return run_cells(host, eco, out, cells, jobs=jobs, on_done=on_done, eco_path=eco_path)


def adopted_cells(matrix: dict, seeds: int) -> list[Cell]:
    """One arm per model that adopted at least one technique: the adopted set
    trained together, so its NE change can be measured against the baseline."""
    cells = []
    for model, entries in adopted_sets(matrix).items():
        names = sorted({e["technique"] for e in entries})
        if names:
            cells += [Cell(model, ADOPTED + "+".join(names), s) for s in range(seeds)]
    return cells


def run_cells(
    host: Any, eco: EcosystemSpec, out: Path, cells: list[Cell], *, jobs: int = 1,
    on_done: Callable[[Cell, bool], None] = lambda c, skipped: None, eco_path: Optional[str] = None,
) -> list[Cell]:
    """Trains the unfinished ``cells``; returns them."""
    out = Path(out)
    todo = []
    for cell in cells:
        if cell_path(out, cell).exists():
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

    synthetic = host.conv.unstructure(eco.synthetic)
    args = [(eco_path, eco_path is None, attrs.asdict(c), str(out), synthetic) for c in todo]
    errors = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, a): c for a, c in zip(args, todo)}
        for fut in as_completed(futures):
            key, err = fut.result()
            if err:
                errors.append(f"{key}: {err}")
            on_done(futures[fut], False)
    if errors:
        raise RuntimeError("cells failed: " + "; ".join(errors))
    return cells


# ------------------------------------------------------------------ analysis


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def decide(ne_deltas: list[float]) -> tuple[str, str]:
    """The adoption rule on paired relative NE changes (negative = better).

    Returns ("adopt" | "reject", reason).

    Example:
        >>> decide([-0.010, -0.012, -0.011])[0]
        'adopt'
        >>> decide([-0.010, 0.012, -0.001])[0]
        'reject'
    """
    n = len(ne_deltas)
    if n < 2:
        return "reject", "one seed: no standard error"
    mean, std = _mean_std(ne_deltas)
    se = std / math.sqrt(n)
    if mean < 0 and -mean > 2 * se:
        return "adopt", f"NE {mean:+.2%} beyond 2 SE ({2 * se:.2%})"
    if mean >= 0:
        return "reject", f"NE {mean:+.2%} (no gain)"
    return "reject", f"NE {mean:+.2%} within 2 SE ({2 * se:.2%})"


def _task_mean(test: dict, key: str) -> float:
    vals = [m[key] for m in test.values() if not math.isnan(m[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def analyse(out: Path, cells: list[Cell]) -> dict:
    """Reads the cell results; returns the adoption matrix as data."""
    results = {c.key: json.loads(cell_path(out, c).read_text()) for c in cells if cell_path(out, c).exists()}
    models = sorted({c.model for c in cells})
    pairs = []
    for model in models:
        arms = sorted({c.arm for c in cells if c.model == model and c.arm != BASELINE})
        seeds = sorted({c.seed for c in cells if c.model == model})
        for arm in arms:
            d_ne, d_auc, d_cal, flops = [], [], [], None
            base_flops = None
            over = [results[k]["over_budget"] for k in (f"{model}/{arm}/seed{s}" for s in seeds)
                    if k in results and "over_budget" in results[k]]
            if over:
                pairs.append({
                    "model": model, "technique": arm, "seeds": 0, "ne_delta": float("nan"), "ne_delta_std": float("nan"),
                    "auc_delta": float("nan"), "auc_delta_std": float("nan"), "calibration_error_delta": float("nan"),
                    "calibration_error_delta_std": float("nan"), "flops": None, "flops_delta": None,
                    "decision": "reject", "reason": f"over the capacity budget: {over[0]}", "techniques": [],
                })
                continue
            for s in seeds:
                b = results.get(f"{model}/{BASELINE}/seed{s}")
                a = results.get(f"{model}/{arm}/seed{s}")
                if not a or not b or "over_budget" in b:
                    continue
                bn, an = _task_mean(b["test"], "ne"), _task_mean(a["test"], "ne")
                d_ne.append((an - bn) / bn)
                d_auc.append(_task_mean(a["test"], "auc") - _task_mean(b["test"], "auc"))
                d_cal.append(abs(_task_mean(a["test"], "calibration") - 1) - abs(_task_mean(b["test"], "calibration") - 1))
                flops, base_flops = a["flops"], b["flops"]
                techniques = a["techniques"]
            if not d_ne:
                continue
            decision, reason = decide(d_ne)
            ne_m, ne_s = _mean_std(d_ne)
            auc_m, auc_s = _mean_std(d_auc)
            cal_m, cal_s = _mean_std(d_cal)
            pairs.append({
                "model": model, "technique": arm, "seeds": len(d_ne),
                "ne_delta": ne_m, "ne_delta_std": ne_s, "auc_delta": auc_m, "auc_delta_std": auc_s,
                "calibration_error_delta": cal_m, "calibration_error_delta_std": cal_s,
                "flops": flops, "flops_delta": (flops - base_flops) / base_flops if base_flops else None,
                "decision": decision, "reason": reason, "techniques": techniques,
            })
    return {
        "rule": "adopt when the mean relative NE change over seeds (paired with the baseline) is negative and "
                "its magnitude exceeds twice its standard error, at neutral capacity (baseline FLOPs ±2%)",
        "models": models,
        "pairs": pairs,
    }


def adopted_sets(matrix: dict) -> dict[str, list[dict]]:
    """Per model, the adopted single techniques (not the "all" arm)."""
    out: dict[str, list[dict]] = {m: [] for m in matrix["models"]}
    for p in matrix["pairs"]:
        if p["technique"] != ALL and not p["technique"].startswith(ADOPTED) and p["decision"] == "adopt":
            out[p["model"]].extend(p["techniques"])
    return out


def write_reports(out: Path, matrix: dict) -> list[Path]:
    """adoption.json, adoption.md and adoption.png (heatmap of the NE change)."""
    out = Path(out)
    paths = [out / "adoption.json", out / "adoption.md", out / "adoption.png"]
    write_text_atomic(json.dumps(matrix, indent=2), paths[0])
    lines = [
        "# Adoption matrix", "", f"Rule: {matrix['rule']}.", "",
        "| model | technique | seeds | NE change | AUC change | calibration error change | FLOPs change | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in matrix["pairs"]:
        fd = "" if p["flops_delta"] is None else f"{p['flops_delta']:+.1%}"
        if p["seeds"] == 0:
            lines.append(f"| {p['model']} | {p['technique']} | 0 | n/a | n/a | n/a | over budget | **reject** ({p['reason']}) |")
            continue
        lines.append(
            f"| {p['model']} | {p['technique']} | {p['seeds']} | {p['ne_delta']:+.2%} ± {p['ne_delta_std']:.2%} | "
            f"{p['auc_delta']:+.4f} ± {p['auc_delta_std']:.4f} | {p['calibration_error_delta']:+.3f} | {fd} | "
            f"**{p['decision']}** ({p['reason']}) |"
        )
    write_text_atomic("\n".join(lines) + "\n", paths[1])
    _heatmap(matrix, paths[2])
    return paths


def _heatmap(matrix: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = matrix["models"]

    def column(technique: str) -> str:
        return "adopted set" if technique.startswith(ADOPTED) else technique

    names = {column(p["technique"]) for p in matrix["pairs"]}
    techniques = sorted(names - {ALL, "adopted set"}) + [c for c in (ALL, "adopted set") if c in names]
    grid = np.full((len(models), max(1, len(techniques))), np.nan)
    marks = {}
    for p in matrix["pairs"]:
        i, j = models.index(p["model"]), techniques.index(column(p["technique"]))
        grid[i, j] = p["ne_delta"] * 100
        marks[(i, j)] = p["decision"]
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(techniques), 2.0 + 0.7 * len(models)))
    finite = grid[np.isfinite(grid)]
    lim = max(0.5, float(np.abs(finite).max())) if finite.size else 1.0
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(techniques)), techniques, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for (i, j), dec in marks.items():
        value = "over\nbudget" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.2f}%\n{'ADOPT' if dec == 'adopt' else 'reject'}"
        ax.text(j, i, value, ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="NE change vs baseline (%)")
    ax.set_title("technique x model: NE change at neutral capacity")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- lock


class LockError(RuntimeError):
    """A lock file that cannot be honoured; names the technique and versions."""


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
