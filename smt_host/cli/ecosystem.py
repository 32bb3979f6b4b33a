"""``smt ecosystem run``, ``tune`` and ``lock``: the technique x model
adoption loop at neutral capacity, multi-model tuning of one technique, and
the lock file of what was adopted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from smt_host.cli.common import console, load_ecosystem, make_host, overrides_option
from smt_host.errors import ConfigError, SmtError, TrainingError


@click.group("ecosystem")
def ecosystem_group() -> None:
    """The technique x model adoption loop at neutral capacity, multi-model tuning, and the lock."""


def _cells_run(fn, *args, **kwargs):
    """Runs cells: a worker's failure (a bare RuntimeError naming the cells)
    becomes a TrainingError, so it is reported as one ``error:`` line, exit 1."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        if isinstance(exc, SmtError):
            raise
        raise TrainingError(str(exc)) from exc


def _batch_trainer(host, eco, out: Path, progress, task, *, jobs: int, keep_checkpoints: str, on_done):
    """``train(batch) -> {cell key: fingerprint}``: runs a batch of cells found
    while the command goes (adopted sets, bisection points, tuning settings),
    growing the progress bar's total by the batch first."""
    from smt_host.ecosystem import cells as cells_mod

    def train(batch):
        progress.update(task, total=progress.tasks[task].total + len(batch))
        keys = cells_mod.fingerprints(host, eco, batch)
        _cells_run(
            cells_mod.run_cells,
            host,
            eco,
            out,
            batch,
            jobs=jobs,
            keep_checkpoints=keep_checkpoints,
            keys=keys,
            on_done=on_done,
        )
        return keys

    return train


def _alpha(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 < value < 0.5:
        raise click.BadParameter(f"must be in (0, 0.5), got {value}", ctx=ctx, param=param)
    return value


_out_option = click.option(
    "--out", "-o", type=click.Path(), default="runs/ecosystem", show_default=True, help="Folder for cells and reports."
)
_seeds_option = click.option(
    "--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per cell."
)
_jobs_option = click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Cells trained in parallel processes.",
)
_train_examples_option = click.option(
    "--train-examples",
    type=click.IntRange(min=100),
    help="Override the synthetic train size (valid and test scale with it).",
)


def _alpha_option(help: str):
    return click.option("--alpha", type=float, default=0.05, show_default=True, callback=_alpha, help=help)


def _keep_checkpoints_option(help: str):
    return click.option(
        "--keep-checkpoints", type=click.Choice(["none", "best", "all"]), default="best", show_default=True, help=help
    )


@ecosystem_group.command("run")
@click.argument("ecosystem", required=False, type=click.Path(exists=True))
@_out_option
@_seeds_option
@_jobs_option
@click.option("--models", help="Comma-separated model names (default: all).")
@_train_examples_option
@_alpha_option("Level of the one-sided paired t test that adopts a technique (in (0, 0.5)).")
@_keep_checkpoints_option(
    "What each cell keeps of its checkpoint: nothing, the best weights (what `smt export` reads), or all "
    "(with optimizer state)."
)
@click.option(
    "--capacity-saved",
    is_flag=True,
    help="Also bisect, for each adopted set, the smallest fraction of the neutral FLOPs at which it still "
    "matches the baseline's NE, and report the FLOPs saved (trains --capacity-steps more cells per model and seed).",
)
@click.option(
    "--capacity-steps",
    type=click.IntRange(min=1, max=10),
    default=3,
    show_default=True,
    help="Bisection steps of --capacity-saved.",
)
@click.option("--dry-run", is_flag=True, help="List the cells that would train and why; train nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the matrix (or, with --dry-run, the cells) as JSON.")
@overrides_option
def ecosystem_run_cmd(
    ecosystem,
    out,
    seeds,
    jobs,
    models,
    train_examples,
    alpha,
    keep_checkpoints,
    capacity_saved,
    capacity_steps,
    dry_run,
    as_json,
    overrides,
) -> None:
    """Train every model as baseline, with each applicable technique alone and
    with all of them, at neutral capacity over SEEDS seeds; write
    adoption.json, adoption.md and adoption.png (NE-change heatmap) to OUT.

    A cell is keyed by a hash of the model's spec, the arm's techniques
    (distribution versions, parameters), the data settings and the seed: a
    cell in OUT/cells whose key is the current one is not trained again
    (resume), one whose key changed is trained again and its old result is
    never reported. --dry-run says which would train and why.

    --capacity-saved adds the other kind of win: for each model whose
    adopted set was adopted, the FLOPs it saves at equal NE (bisected, its
    cells keyed and resumed like the others), beside its NE gain at equal
    FLOPs.
    """
    from smt_host.ecosystem import cells as cells_mod
    from smt_host.ecosystem.analysis import adopted_cells, analyse
    from smt_host.ecosystem.reports import capacity_table, summary_lines, table, write_reports

    host = make_host()
    eco = _sized(load_ecosystem(host, ecosystem, overrides), train_examples)
    chosen = models.split(",") if models else None
    if chosen:
        for name in chosen:
            eco.model(name)  # an unknown name is a ConfigError naming the models
    cells = cells_mod.matrix_cells(host, eco, seeds, chosen)
    fits = cells_mod.set_fits(host, eco)
    if dry_run:
        _dry_run(host, eco, Path(out), cells, seeds, alpha, as_json)
        if capacity_saved and not as_json:
            click.echo("capacity saved: its cells are chosen as the bisection goes, once the adopted sets are done")
        return
    started = time.perf_counter()
    saving_cells: list = []
    with _progress(as_json) as progress:
        task = progress.add_task("adoption matrix", total=len(cells))
        skipped = []

        def done(cell, was_skipped):
            if was_skipped:
                skipped.append(cell)
            progress.update(task, advance=1, description=f"adoption matrix: {cell.key}")

        train = _batch_trainer(
            host, eco, Path(out), progress, task, jobs=jobs, keep_checkpoints=keep_checkpoints, on_done=done
        )

        _cells_run(
            cells_mod.run_matrix,
            host,
            eco,
            Path(out),
            seeds=seeds,
            jobs=jobs,
            models=chosen,
            keep_checkpoints=keep_checkpoints,
            on_done=done,
        )
        keys = cells_mod.fingerprints(host, eco, cells)
        # the adopted set of each model, trained together at neutral capacity
        extra = adopted_cells(analyse(Path(out), cells, keys=keys, alpha=alpha, aa_pairs=0, fits=fits), seeds)
        if extra:
            keys.update(train(extra))
            cells = cells + extra
        saved = None
        if capacity_saved:
            from smt_host.ecosystem import saving

            def train_saving(batch):
                saving_cells.extend(batch)
                return train(batch)

            pre = analyse(Path(out), cells, keys=keys, alpha=alpha, aa_pairs=0, fits=fits)
            records = saving.bisect(Path(out), pre, seeds, train_saving, keys, steps=capacity_steps, alpha=alpha)
            saved = {"rule": saving.rule_text(alpha), "alpha": alpha, "steps": capacity_steps, "models": records}
    wall = time.perf_counter() - started
    matrix = analyse(Path(out), cells, keys=keys, alpha=alpha, fits=fits)
    matrix["wall_s"] = wall
    matrix["ecosystem"] = eco.name
    matrix["cells"] = len(cells) + len(saving_cells)
    matrix["cells_resumed"] = len(skipped)
    if saved is not None:
        saved["cells"] = len(saving_cells)
        saved["compute_s"] = _compute_s(Path(out), saving_cells)
        matrix["capacity_saved"] = saved
    paths = write_reports(Path(out), matrix)
    if as_json:
        from smt_host.files import strict_json

        click.echo(strict_json(matrix))
        return
    out_console = console()
    if not out_console.is_terminal:  # a log or a pipe: one line per row rather than 80 columns
        out_console.width = 200
    out_console.print(table(matrix))
    saved_table = capacity_table(matrix)
    if saved_table is not None:
        out_console.print(saved_table)
    elif saved is not None:
        click.echo("capacity saved: no adopted set was adopted at neutral capacity, no capacity to save")
    for line in summary_lines(matrix):
        click.echo(line)
    total = matrix["cells"]
    trained = total - len(skipped)
    click.echo(
        f"{len(matrix['pairs'])} technique x model pairs, {total} cells ({trained} trained, "
        f"{len(skipped)} already done) in {wall:.0f} s; reports: {', '.join(str(p) for p in paths)}"
    )


def _progress(disable: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        disable=disable,
    )


def _compute_s(out: Path, cells) -> float:
    """The training time recorded by the cells' results."""
    from smt_host.ecosystem.cells import read_cell

    return sum((read_cell(out, c) or {}).get("wall_s", 0.0) for c in cells)


def _sized(eco, train_examples):
    """``eco`` with ``--train-examples`` (valid and test scale with it)."""
    import attrs

    if train_examples:
        s = eco.synthetic
        eco = attrs.evolve(
            eco,
            synthetic=attrs.evolve(
                s,
                train_examples=train_examples,
                valid_examples=max(100, train_examples // 5),
                test_examples=max(100, train_examples * 2 // 5),
            ),
        )
    return eco


def _dry_run(host, eco, out: Path, cells, seeds: int, alpha: float, as_json: bool) -> None:
    """Prints each cell with why it would train (new, spec / manifest / data
    changed) or ``done``; the adopted sets too when the matrix is done."""
    from smt_host.ecosystem.analysis import adopted_cells, analyse
    from smt_host.ecosystem.cells import DONE, cell_statuses, fingerprints, set_fits

    fits = set_fits(host, eco)
    keys = fingerprints(host, eco, cells)
    status = cell_statuses(out, keys)
    pending = "adopted sets: decided once the matrix is done"
    if all(s == DONE for s in status.values()):
        extra = adopted_cells(analyse(out, cells, keys=keys, alpha=alpha, aa_pairs=0, fits=fits), seeds)
        status.update(cell_statuses(out, fingerprints(host, eco, extra)))
        pending = None
    rows = [{"cell": c.key, "model": c.model, "arm": c.arm, "seed": c.seed, "status": s} for c, s in status.items()]
    todo = [r for r in rows if r["status"] != DONE]
    if as_json:
        from smt_host.files import strict_json

        click.echo(strict_json({"cells": rows, "train": len(todo), "done": len(rows) - len(todo), "note": pending}))
        return
    from rich.table import Table

    t = Table(title=f"cells under {out}")
    for col in ("model", "arm", "seed", "status"):
        t.add_column(col, justify="right" if col == "seed" else "left")
    for r in rows:
        t.add_row(
            r["model"], r["arm"], str(r["seed"]), r["status"] if r["status"] == DONE else f"[bold]{r['status']}[/]"
        )
    console().print(t)
    reasons: dict[str, int] = {}
    for r in todo:
        reasons[r["status"]] = reasons.get(r["status"], 0) + 1
    why = ", ".join(f"{n} {s}" for s, n in sorted(reasons.items()))
    click.echo(f"would train {len(todo)} of {len(rows)} cells" + (f" ({why})" if why else "") + "; nothing trained")
    if pending:
        click.echo(pending)


@ecosystem_group.command("tune")
@click.argument("technique")
@click.argument("ecosystem", required=False, type=click.Path(exists=True))
@_out_option
@_seeds_option
@_jobs_option
@click.option(
    "--models",
    help="Comma-separated models to tune on (default: the fewest that cover the ecosystem's surfaces and tasks).",
)
@_train_examples_option
@_alpha_option("Level of the one-sided paired t tests (adoption, regression), in (0, 0.5).")
@click.option(
    "--per-model/--no-per-model",
    default=True,
    show_default=True,
    help="Also tune each model separately, to compare (every setting on every model).",
)
@_keep_checkpoints_option("What each cell keeps of its checkpoint.")
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False),
    help="Write a lock of the rollout (replacing the file): each model with the tuned technique where it gains "
    "beyond noise at neutral capacity, else its baseline; `smt train --locked` trains exactly that.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@overrides_option
def ecosystem_tune_cmd(
    technique,
    ecosystem,
    out,
    seeds,
    jobs,
    models,
    train_examples,
    alpha,
    per_model,
    keep_checkpoints,
    lock_path,
    as_json,
    overrides,
) -> None:
    """Tune TECHNIQUE once over a representative subset of models and roll the
    best setting out to every model it applies to (multi-model optimisation).

    The search space is the technique's own: the fields of its parameters
    class whose attrs metadata has "search" (a list of values); every
    combination is tried at neutral capacity over SEEDS seeds, and the one
    with the best mean NE change over the subset is rolled out. Reports the
    regression rate (the share of models whose NE got worse beyond noise)
    against tuning each model separately, with the compute each needed, to
    OUT/tune/TECHNIQUE.json and .md. Cells are keyed and resumed as in
    `smt ecosystem run`, and share its baselines.
    """
    from smt_host.ecosystem.reports import tune_lines, tune_tables, write_tune_reports
    from smt_host.ecosystem.tuning import tune

    host = make_host()
    eco = _sized(load_ecosystem(host, ecosystem, overrides), train_examples)
    chosen = models.split(",") if models else None
    for name in chosen or ():
        eco.model(name)
    with _progress(as_json) as progress:
        task = progress.add_task(f"tuning {technique}", total=0)

        def done(cell, was_skipped):
            progress.update(task, advance=1, description=f"tuning {technique}: {cell.key}")

        train = _batch_trainer(
            host, eco, Path(out), progress, task, jobs=jobs, keep_checkpoints=keep_checkpoints, on_done=done
        )

        result = tune(
            host, eco, Path(out), technique, train, seeds=seeds, models=chosen, per_model=per_model, alpha=alpha
        )
    lock_matrix = result.pop("lock_matrix")
    result["ecosystem"] = eco.name
    if lock_path:
        from smt_host.ecosystem.lock import make_lock, write_lock

        lock = make_lock(lock_matrix)
        lock["tuned"] = {
            technique: {
                "params": result["chosen"],
                "subset": result["subset"],
                "regression_rate": result["regression_rate"],
                "seeds": seeds,
            }
        }
        write_lock(lock, Path(lock_path))
        result["lock"] = str(lock_path)
    paths = write_tune_reports(Path(out), result)
    if as_json:
        from smt_host.files import strict_json

        click.echo(strict_json(result))
        return
    out_console = console()
    if not out_console.is_terminal:
        out_console.width = 200
    for t in tune_tables(result):
        out_console.print(t)
    for line in tune_lines(result):
        click.echo(line)
    if lock_path:
        click.echo(f"wrote {lock_path}")
    click.echo(f"reports: {', '.join(str(p) for p in paths)}")


@ecosystem_group.command("lock")
@click.option(
    "--out",
    "-o",
    type=click.Path(exists=True, file_okay=False),
    default="runs/ecosystem",
    show_default=True,
    help="The folder `smt ecosystem run` wrote.",
)
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False),
    default="smt.lock.json",
    show_default=True,
    help="Lock file to write.",
)
def ecosystem_lock_cmd(out, lock_path) -> None:
    """Write, per model, what was measured: the adopted technique set with
    distribution versions and parameters, the capacity its cells were
    trained at (budget, achieved FLOPs, over-arch scale), the hashes of the
    spec and data settings, and the host and template versions. `smt train
    --locked LOCK` then builds exactly that, and checks every model first."""
    from smt_host.ecosystem.lock import make_lock, write_lock

    path = Path(out) / "adoption.json"
    if not path.exists():
        raise ConfigError([f"{path} not found: run `smt ecosystem run --out {out}` first"])
    try:
        matrix = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError([f"{path}: not JSON: {exc}"]) from None
    lock = make_lock(matrix)
    write_lock(lock, Path(lock_path))
    for model, entry in lock["models"].items():
        names = ", ".join(f"{e['technique']} ({e['dist']} {e['version']})" for e in entry["techniques"])
        cap = entry["capacity"]
        click.echo(
            f"{model}: {names or 'baseline only'}; {cap['achieved']:,.0f} FLOPs/example "
            f"(over-arch scale {cap['scale']:.3g})"
        )
        if entry.get("left_out"):
            click.echo(f"  left out, over the budget with the set: {', '.join(entry['left_out'])}")
        if entry.get("note"):
            click.echo(f"  note: {entry['note']}")
    click.echo(f"wrote {lock_path}")
