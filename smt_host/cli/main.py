"""The ``smt`` command.

Every command prints a header naming the host and plugin versions (on
stderr, so ``--json`` output stays clean). Errors in specs, plugins or
training print one ``error: ...`` message naming the file, path or
distribution, and exit with status 2 (bad input) or 1 (failure).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click

from smt_host.errors import CapacityError, ConfigError, PluginError
from smt_host.spec.schema import EcosystemSpec, ModelSpec


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _host(quiet: bool = False):
    from smt_host.host import Host

    try:
        host = Host.create()
    except PluginError as exc:
        _fail(str(exc), 2)
    if not quiet:
        click.echo(host.spm.header(), err=True)
    return host


def _ecosystem(host, path: Optional[str]) -> EcosystemSpec:
    try:
        return host.load_ecosystem(path)
    except (ConfigError, PluginError) as exc:
        _fail(str(exc), 2)
    raise AssertionError  # unreachable


def _targets(host, targets: tuple[str, ...], ecosystem: Optional[str]) -> tuple[EcosystemSpec, list[ModelSpec]]:
    """TARGETS: spec files/folders (each an ecosystem) or model names of the
    ecosystem (default: the built-in one)."""
    files = [t for t in targets if t.endswith(".toml") or Path(t).is_dir()]
    names = [t for t in targets if t not in files]
    if files and ecosystem:
        _fail("give spec files as TARGETS or --ecosystem, not both", 2)
    if len(files) > 1:
        _fail("give one ecosystem file or folder at a time", 2)
    eco = _ecosystem(host, files[0] if files else ecosystem)
    if not names:
        return eco, list(eco.models.values())
    try:
        return eco, [eco.model(n) for n in names]
    except ConfigError as exc:
        _fail(str(exc), 2)
    raise AssertionError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smt-host", prog_name="smt")
def cli() -> None:
    """smt: the Standard Model Template, a plugin host for ads ranking models.

    Every model of an ecosystem is generated from one template with standard
    slots (embedding, dense_arch, interaction, over_arch, task_arch, heads,
    loss, optimizer, training). Techniques are pip-installable plugins (entry
    point group "smt"): install one and every model it applies to uses it.

    Environment: SMT_LOAD_PLUGINS (unset: all; empty: none; "a,b": only these),
    SMT_DISABLE_PLUGINS ("a,b": block these), SMT_DATA_DIR (real data sets).
    """


# ------------------------------------------------------------------ plugins


@cli.command("plugins")
@click.option("--ecosystem", "-e", type=click.Path(), help="Ecosystem TOML (default: the built-in one), to list which models each technique applies to.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(ecosystem: Optional[str], as_json: bool) -> None:
    """List installed distributions, their techniques and slots, and the
    models of the ecosystem each technique is used in."""
    from smt_host.model.resolve import resolve

    host = _host(quiet=as_json)
    eco = _ecosystem(host, ecosystem)
    used: dict[str, list[str]] = {n: [] for n in host.spm.techniques}
    notes: dict[str, dict[str, str]] = {n: {} for n in host.spm.techniques}
    shadowed: dict[str, list[str]] = {}
    for spec in eco.models.values():
        try:
            res = resolve(spec, host.spm, host.conv)
        except (ConfigError, PluginError) as exc:
            _fail(str(exc), 2)
        for a in res.active:
            used[a.name].append(spec.name)
        for s in res.skipped:
            notes[s.name][spec.name] = s.reason
            if s.reason.startswith("shadowed by "):
                shadowed.setdefault(s.name, []).append(spec.name)
    dists: dict[str, dict[str, Any]] = {}
    for reg in host.spm.all_ordered():
        d = dists.setdefault(reg.dist, {"distribution": reg.dist, "version": reg.version, "techniques": []})
        d["techniques"].append({
            "name": reg.name, "slot": reg.info.slot, "plugin": reg.plugin,
            "description": reg.info.description, "priority": reg.info.priority,
            "default": reg.info.default,
            # applies: active, or applicable but shadowed in an exclusive slot
            "applies_to": sorted(used[reg.name] + shadowed.get(reg.name, []), key=list(eco.models).index),
            "active_in": used[reg.name], "skipped": notes[reg.name],
        })
    rows = sorted(dists.values(), key=lambda d: (d["distribution"] != "smt-host", d["distribution"]))
    if as_json:
        click.echo(json.dumps({"ecosystem": eco.name, "distributions": rows}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"installed techniques (ecosystem {eco.name!r}, {len(eco.models)} models)")
    for col in ("distribution", "version", "technique", "slot", "models"):
        table.add_column(col)
    for d in rows:
        for t in d["techniques"]:
            models = ", ".join(
                m if m in t["active_in"] else f"{m} ({t['skipped'][m]})" for m in t["applies_to"]) or (
                "(none)" if t["default"] else "(off by default: a model enables it in its spec)")
            table.add_row(d["distribution"], d["version"], t["name"], t["slot"], models)
    _console().print(table)


# --------------------------------------------------------------------- plan


def _fmt_params(params: Optional[dict]) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in params.items())


def print_plan(plan, console=None) -> None:
    from rich.table import Table

    console = console or _console()
    cap = plan.capacity
    budget = "none" if cap.budget is None else f"{cap.budget:,.0f} ({cap.mode}, ±{cap.tolerance:.0%})"
    table = Table(title=f"plan: {plan.model}", caption=(
        f"FLOPs/example {plan.cost.flops:,.0f}  budget {budget}  over-arch scale {cap.scale:.3f}\n"
        f"dense params {plan.cost.dense_params:,}  embedding params {plan.cost.embedding_params:,} "
        f"({plan.cost.embedding_bytes / 2**20:.1f} MiB)  widths {plan.widths}"
    ))
    for col in ("slot", "technique", "distribution", "parameters", "out", "FLOPs/ex"):
        table.add_column(col)
    for e in plan.entries:
        table.add_row(e.slot, e.technique, f"{e.dist} {e.version}", _fmt_params(e.params),
                      "" if e.out_dim is None else str(e.out_dim), f"{e.flops:,.0f}" if e.flops else "")
    console.print(table)
    shown = [s for s in plan.skipped if s.reason != "built-ins only"]
    if shown:
        console.print("not used: " + "; ".join(f"{s.name} ({s.dist}): {s.reason}" for s in shown))


@cli.command("plan")
@click.argument("models", nargs=-1)
@click.option("--ecosystem", "-e", type=click.Path(), help="Ecosystem TOML or folder (default: the built-in one).")
@click.option("--json", "as_json", is_flag=True, help="Print the plans as JSON.")
@click.option("--shard", help="Print torchrec's sharding plan for a topology instead, e.g. world_size=128,device=cuda[,hbm_gb=80] (no table is allocated).")
def plan_cmd(models: tuple[str, ...], ecosystem: Optional[str], as_json: bool, shard: Optional[str] = None) -> None:
    """Show which technique fills what in MODELS (default: every model):
    distribution, version, parameters, widths, parameter count and FLOPs per
    example. A MODEL may also be a spec file."""
    host = _host(quiet=as_json)
    eco, specs = _targets(host, models, ecosystem)
    if shard:
        from smt_host.distributed.shard import shard_command

        return shard_command(host, specs, shard, as_json)
    plans = []
    for spec in specs:
        try:
            plans.append(host.plan(spec))
        except (ConfigError, PluginError, CapacityError) as exc:
            _fail(str(exc), 2)
    if as_json:
        out = [host.plan_dict(p) for p in plans]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return
    console = _console()
    for p in plans:
        print_plan(p, console)


# -------------------------------------------------------------------- train


@cli.command("train")
@click.argument("targets", nargs=-1)
@click.option("--ecosystem", "-e", type=click.Path(), help="Ecosystem TOML or folder (default: the built-in one).")
@click.option("--out", "-o", type=click.Path(), default="runs", show_default=True, help="Output folder; each model gets OUT/<ecosystem>/<model>/.")
@click.option("--resume", is_flag=True, help="Continue runs from their checkpoints (finished runs are not retrained).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override training.epochs of every model.")
@click.option("--seed", type=int, help="Override training.seed of every model.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--locked", "lockfile", type=click.Path(exists=True, dir_okay=False),
              help="Train exactly the technique set of this lock file (from `smt ecosystem lock`).")
def train_cmd(targets, ecosystem, out, resume, epochs, seed, as_json, no_progress, lockfile) -> None:
    """Train models: with no TARGETS, every model of the default ecosystem.

    TARGETS are model names of the ecosystem, or one ecosystem TOML file or
    folder. For each model: progress, validation each epoch with early
    stopping, test NE / logloss / AUC / calibration. Each run folder holds
    checkpoint.pt (model, optimizer, plan, manifest) and metrics.json.
    """
    import attrs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from smt_host.errors import ManifestMismatch, TrainingError
    from smt_host.train.trainer import train_model

    host = _host(quiet=False)
    eco, specs = _targets(host, targets, ecosystem)
    lock = None
    if lockfile:
        from smt_host.ecosystem.lock import check_lock
        from smt_host.errors import LockError

        lock = json.loads(Path(lockfile).read_text())
        try:
            check_lock(lock, host)
        except LockError as exc:
            _fail(f"{lockfile}: {exc}", 2)
    results = []
    started = time.perf_counter()
    console = _console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=no_progress,
    )
    with progress:
        for spec in specs:
            if epochs is not None or seed is not None:
                changes = {}
                if epochs is not None:
                    changes["epochs"] = epochs
                if seed is not None:
                    changes["seed"] = seed
                spec = attrs.evolve(spec, training=attrs.evolve(spec.training, **changes))
            run_dir = Path(out) / eco.name / spec.name
            try:
                plan = None
                if lock is not None:
                    from smt_host.ecosystem.lock import locked_spec
                    from smt_host.errors import LockError

                    try:
                        spec, only = locked_spec(spec, lock)
                    except LockError as exc:
                        _fail(f"{lockfile}: {exc}", 2)
                    plan = host.plan(spec, only=only)
                r = train_model(host, spec, eco, run_dir, plan=plan, resume=resume, progress=progress, log=progress.console.print)
            except (ConfigError, PluginError, CapacityError, ManifestMismatch) as exc:
                _fail(str(exc), 2)
            except TrainingError as exc:
                _fail(str(exc), 1)
            except KeyboardInterrupt:
                _fail(f"interrupted; finished epochs are checkpointed in {run_dir}, continue with --resume", 130)
            results.append(r)
    wall = time.perf_counter() - started
    rows = [
        {"model": r.model, "task": t, **{k: m[k] for k in ("ne", "logloss", "auc", "calibration")},
         "epochs": r.epochs, "wall_s": round(r.wall_s, 2), "out_dir": r.out_dir}
        for r in results for t, m in r.test.items()
    ]
    if as_json:
        click.echo(json.dumps({"ecosystem": eco.name, "wall_s": round(wall, 2), "results": rows}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"test metrics, ecosystem {eco.name!r} ({wall:.1f} s)")
    for col in ("model", "task", "NE", "logloss", "AUC", "calibration", "epochs", "seconds"):
        table.add_column(col, justify="right" if col not in ("model", "task") else "left")
    for row in rows:
        table.add_row(row["model"], row["task"], f"{row['ne']:.4f}", f"{row['logloss']:.4f}", f"{row['auc']:.4f}",
                      f"{row['calibration']:.3f}", str(row["epochs"]), f"{row['wall_s']:.1f}")
    _console().print(table)
    click.echo(f"runs written to {Path(out) / eco.name}")


# ---------------------------------------------------------------- ecosystem


@cli.group("ecosystem")
def ecosystem_group() -> None:
    """The technique x model adoption loop at neutral capacity, and the lock."""


@ecosystem_group.command("run")
@click.argument("ecosystem", required=False, type=click.Path(exists=True))
@click.option("--out", "-o", type=click.Path(), default="runs/ecosystem", show_default=True, help="Folder for cells and reports.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per cell.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Cells trained in parallel processes.")
@click.option("--models", help="Comma-separated model names (default: all).")
@click.option("--train-examples", type=click.IntRange(min=100), help="Override the synthetic train size (valid and test scale with it).")
def ecosystem_run_cmd(ecosystem, out, seeds, jobs, models, train_examples) -> None:
    """Train every model as baseline, with each applicable technique alone and
    with all of them, at neutral capacity over SEEDS seeds; write
    adoption.json, adoption.md and adoption.png (NE-change heatmap) to OUT.

    Finished cells are kept in OUT/cells and not retrained when the command
    is run again (resume after an interruption).
    """
    import attrs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from smt_host.ecosystem.analysis import analyse
    from smt_host.ecosystem.cells import matrix_cells, run_matrix
    from smt_host.ecosystem.reports import write_reports

    host = _host()
    eco = _ecosystem(host, ecosystem)
    if train_examples:
        s = eco.synthetic
        eco = attrs.evolve(eco, synthetic=attrs.evolve(
            s, train_examples=train_examples, valid_examples=max(100, train_examples // 5),
            test_examples=max(100, train_examples * 2 // 5)))
    chosen = models.split(",") if models else None
    try:
        cells = matrix_cells(host, eco, seeds, chosen)
    except (ConfigError, PluginError, CapacityError) as exc:
        _fail(str(exc), 2)
    started = time.perf_counter()
    console = _console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("adoption matrix", total=len(cells))
        skipped = []

        def done(cell, was_skipped):
            if was_skipped:
                skipped.append(cell)
            progress.update(task, advance=1, description=f"adoption matrix: {cell.key}")

        try:
            run_matrix(host, eco, Path(out), seeds=seeds, jobs=jobs, models=chosen, on_done=done,
                       eco_path=ecosystem)
        except (ConfigError, PluginError, CapacityError, RuntimeError) as exc:
            _fail(str(exc), 1)
        # the adopted set of each model, trained together at neutral capacity
        from smt_host.ecosystem.analysis import adopted_cells
        from smt_host.ecosystem.cells import run_cells

        extra = adopted_cells(analyse(Path(out), cells), seeds)
        if extra:
            progress.update(task, total=len(cells) + len(extra))
            try:
                run_cells(host, eco, Path(out), extra, jobs=jobs, on_done=done, eco_path=ecosystem)
            except (ConfigError, PluginError, CapacityError, RuntimeError) as exc:
                _fail(str(exc), 1)
            cells = cells + extra
    wall = time.perf_counter() - started
    matrix = analyse(Path(out), cells)
    matrix["wall_s"] = wall
    matrix["cells"] = len(cells)
    matrix["cells_resumed"] = len(skipped)
    paths = write_reports(Path(out), matrix)
    click.echo(Path(paths[1]).read_text())
    trained = len(cells) - len(skipped)
    click.echo(f"{len(matrix['pairs'])} technique x model pairs, {len(cells)} cells ({trained} trained, "
               f"{len(skipped)} already done) in {wall:.0f} s; reports: {', '.join(str(p) for p in paths)}")


@ecosystem_group.command("lock")
@click.option("--out", "-o", type=click.Path(exists=True, file_okay=False), default="runs/ecosystem", show_default=True,
              help="The folder `smt ecosystem run` wrote.")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False), default="smt.lock.json", show_default=True,
              help="Lock file to write.")
def ecosystem_lock_cmd(out, lock_path) -> None:
    """Write, per model, the adopted technique set with distribution versions
    and parameters. `smt train --locked LOCK` then trains exactly that set."""
    from smt_host.ecosystem.lock import make_lock
    from smt_host.train.checkpoint import write_text_atomic

    path = Path(out) / "adoption.json"
    if not path.exists():
        _fail(f"{path} not found: run `smt ecosystem run --out {out}` first", 2)
    lock = make_lock(json.loads(path.read_text()))
    write_text_atomic(json.dumps(lock, indent=2) + "\n", Path(lock_path))
    for model, entries in lock["models"].items():
        names = ", ".join(f"{e['technique']} ({e['dist']} {e['version']})" for e in entries) or "baseline only"
        click.echo(f"{model}: {names}")
    click.echo(f"wrote {lock_path}")


from smt_host.authoring.scaffold import new_plugin_cmd  # noqa: E402

cli.add_command(new_plugin_cmd)

from smt_host.cli.serve import export_cmd, install_train_options, predict_cmd  # noqa: E402

cli.add_command(export_cmd)
cli.add_command(predict_cmd)
install_train_options(cli)


def main() -> None:
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
