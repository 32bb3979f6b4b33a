"""``smt ecosystem run`` and ``smt ecosystem lock``: the technique x model
adoption loop at neutral capacity, and the lock file of what was adopted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from smt_host.cli.common import console, load_ecosystem, make_host, overrides_option
from smt_host.errors import ConfigError, SmtError, TrainingError


@click.group("ecosystem")
def ecosystem_group() -> None:
    """The technique x model adoption loop at neutral capacity, and the lock."""


def _cells_run(fn, *args, **kwargs):
    """Runs cells: a worker's failure (a bare RuntimeError naming the cells)
    becomes a TrainingError, so it is reported as one ``error:`` line, exit 1."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        if isinstance(exc, SmtError):
            raise
        raise TrainingError(str(exc)) from exc


@ecosystem_group.command("run")
@click.argument("ecosystem", required=False, type=click.Path(exists=True))
@click.option(
    "--out", "-o", type=click.Path(), default="runs/ecosystem", show_default=True, help="Folder for cells and reports."
)
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per cell.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Cells trained in parallel processes.",
)
@click.option("--models", help="Comma-separated model names (default: all).")
@click.option(
    "--train-examples",
    type=click.IntRange(min=100),
    help="Override the synthetic train size (valid and test scale with it).",
)
@overrides_option
def ecosystem_run_cmd(ecosystem, out, seeds, jobs, models, train_examples, overrides) -> None:
    """Train every model as baseline, with each applicable technique alone and
    with all of them, at neutral capacity over SEEDS seeds; write
    adoption.json, adoption.md and adoption.png (NE-change heatmap) to OUT.

    Finished cells are kept in OUT/cells and not retrained when the command
    is run again (resume after an interruption).
    """
    import attrs
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from smt_host.ecosystem.analysis import adopted_cells, analyse
    from smt_host.ecosystem.cells import matrix_cells, run_cells, run_matrix
    from smt_host.ecosystem.reports import write_reports

    host = make_host()
    eco = load_ecosystem(host, ecosystem, overrides)
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
    chosen = models.split(",") if models else None
    cells = matrix_cells(host, eco, seeds, chosen)
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
    ) as progress:
        task = progress.add_task("adoption matrix", total=len(cells))
        skipped = []

        def done(cell, was_skipped):
            if was_skipped:
                skipped.append(cell)
            progress.update(task, advance=1, description=f"adoption matrix: {cell.key}")

        _cells_run(run_matrix, host, eco, Path(out), seeds=seeds, jobs=jobs, models=chosen, on_done=done)
        # the adopted set of each model, trained together at neutral capacity
        extra = adopted_cells(analyse(Path(out), cells), seeds)
        if extra:
            progress.update(task, total=len(cells) + len(extra))
            _cells_run(run_cells, host, eco, Path(out), extra, jobs=jobs, on_done=done)
            cells = cells + extra
    wall = time.perf_counter() - started
    matrix = analyse(Path(out), cells)
    matrix["wall_s"] = wall
    matrix["cells"] = len(cells)
    matrix["cells_resumed"] = len(skipped)
    paths = write_reports(Path(out), matrix)
    click.echo(Path(paths[1]).read_text())
    trained = len(cells) - len(skipped)
    click.echo(
        f"{len(matrix['pairs'])} technique x model pairs, {len(cells)} cells ({trained} trained, "
        f"{len(skipped)} already done) in {wall:.0f} s; reports: {', '.join(str(p) for p in paths)}"
    )


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
    """Write, per model, the adopted technique set with distribution versions
    and parameters. `smt train --locked LOCK` then trains exactly that set."""
    from smt_host.ecosystem.lock import make_lock, write_lock

    path = Path(out) / "adoption.json"
    if not path.exists():
        raise ConfigError([f"{path} not found: run `smt ecosystem run --out {out}` first"])
    lock = make_lock(json.loads(path.read_text()))
    write_lock(lock, Path(lock_path))
    for model, entries in lock["models"].items():
        names = ", ".join(f"{e['technique']} ({e['dist']} {e['version']})" for e in entries) or "baseline only"
        click.echo(f"{model}: {names}")
    click.echo(f"wrote {lock_path}")
