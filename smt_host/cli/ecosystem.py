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


def _alpha(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 < value < 0.5:
        raise click.BadParameter(f"must be in (0, 0.5), got {value}", ctx=ctx, param=param)
    return value


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
@click.option(
    "--alpha",
    type=float,
    default=0.05,
    show_default=True,
    callback=_alpha,
    help="Level of the one-sided paired t test that adopts a technique (in (0, 0.5)).",
)
@click.option(
    "--keep-checkpoints",
    type=click.Choice(["none", "best", "all"]),
    default="best",
    show_default=True,
    help="What each cell keeps of its checkpoint: nothing, the best weights (what `smt export` reads), or all "
    "(with optimizer state).",
)
@click.option("--dry-run", is_flag=True, help="List the cells that would train and why; train nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the matrix (or, with --dry-run, the cells) as JSON.")
@overrides_option
def ecosystem_run_cmd(
    ecosystem, out, seeds, jobs, models, train_examples, alpha, keep_checkpoints, dry_run, as_json, overrides
) -> None:
    """Train every model as baseline, with each applicable technique alone and
    with all of them, at neutral capacity over SEEDS seeds; write
    adoption.json, adoption.md and adoption.png (NE-change heatmap) to OUT.

    A cell is keyed by a hash of the model's spec, the arm's techniques
    (distribution versions, parameters), the data settings and the seed: a
    cell in OUT/cells whose key is the current one is not trained again
    (resume), one whose key changed is trained again and its old result is
    never reported. --dry-run says which would train and why.
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

    from smt_host.ecosystem import cells as cells_mod
    from smt_host.ecosystem.analysis import adopted_cells, analyse
    from smt_host.ecosystem.reports import summary_lines, table, write_reports

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
    if chosen:
        for name in chosen:
            eco.model(name)  # an unknown name is a ConfigError naming the models
    cells = cells_mod.matrix_cells(host, eco, seeds, chosen)
    if dry_run:
        _dry_run(host, eco, Path(out), cells, seeds, alpha, as_json)
        return
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        disable=as_json,
    ) as progress:
        task = progress.add_task("adoption matrix", total=len(cells))
        skipped = []

        def done(cell, was_skipped):
            if was_skipped:
                skipped.append(cell)
            progress.update(task, advance=1, description=f"adoption matrix: {cell.key}")

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
        extra = adopted_cells(analyse(Path(out), cells, keys=keys, alpha=alpha, aa_pairs=0), seeds)
        if extra:
            progress.update(task, total=len(cells) + len(extra))
            extra_keys = cells_mod.fingerprints(host, eco, extra)
            _cells_run(
                cells_mod.run_cells,
                host,
                eco,
                Path(out),
                extra,
                jobs=jobs,
                keep_checkpoints=keep_checkpoints,
                keys=extra_keys,
                on_done=done,
            )
            cells, keys = cells + extra, {**keys, **extra_keys}
    wall = time.perf_counter() - started
    matrix = analyse(Path(out), cells, keys=keys, alpha=alpha)
    matrix["wall_s"] = wall
    matrix["ecosystem"] = eco.name
    matrix["cells"] = len(cells)
    matrix["cells_resumed"] = len(skipped)
    paths = write_reports(Path(out), matrix)
    if as_json:
        from smt_host.files import strict_json

        click.echo(strict_json(matrix))
        return
    out_console = console()
    if not out_console.is_terminal:  # a log or a pipe: one line per row rather than 80 columns
        out_console.width = 200
    out_console.print(table(matrix))
    for line in summary_lines(matrix):
        click.echo(line)
    trained = len(cells) - len(skipped)
    click.echo(
        f"{len(matrix['pairs'])} technique x model pairs, {len(cells)} cells ({trained} trained, "
        f"{len(skipped)} already done) in {wall:.0f} s; reports: {', '.join(str(p) for p in paths)}"
    )


def _dry_run(host, eco, out: Path, cells, seeds: int, alpha: float, as_json: bool) -> None:
    """Prints each cell with why it would train (new, spec / manifest / data
    changed) or ``done``; the adopted sets too when the matrix is done."""
    from smt_host.ecosystem.analysis import adopted_cells, analyse
    from smt_host.ecosystem.cells import DONE, cell_statuses, fingerprints

    keys = fingerprints(host, eco, cells)
    status = cell_statuses(out, keys)
    pending = "adopted sets: decided once the matrix is done"
    if all(s == DONE for s in status.values()):
        extra = adopted_cells(analyse(out, cells, keys=keys, alpha=alpha, aa_pairs=0), seeds)
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
    click.echo(f"wrote {lock_path}")
