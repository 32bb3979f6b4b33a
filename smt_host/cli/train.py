"""``smt train``: train models, one process or ``--nproc-per-node N``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from smt_host.cli.common import (
    block_plugins,
    is_quiet,
    load_targets,
    make_host,
    on_interrupt,
    overrides_option,
    print_table,
)
from smt_host.cli.screen import duration, rate


def _finished_epochs(checkpoint: Path) -> int | None:
    """The epochs a checkpoint holds, or None when it cannot be read."""
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(saved["state"]["epoch"])
    except Exception:  # noqa: BLE001 - only for the message
        return None


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def interrupt_note(run_dir: Path, before: int | None, resume: bool) -> str:
    """What ``error: interrupted`` adds for the run in ``run_dir``: whether
    its checkpoint holds finished epochs. ``before`` is the checkpoint's
    mtime when the run started (None: there was none)."""
    path = run_dir / "checkpoint.pt"
    now = _mtime(path)
    # without --resume the run starts over: a checkpoint it did not write is not its own
    if now is None or (not resume and now == before):
        return f"in {run_dir}; nothing was saved yet"
    n = _finished_epochs(path)
    if n is None:
        return f"in {run_dir}; its checkpoint is there, continue with --resume"
    epochs = "1 finished epoch is" if n == 1 else f"{n} finished epochs are"
    return f"in {run_dir}; {epochs} checkpointed there, continue with --resume"


def position_note(position) -> str:
    """What ``error: interrupted`` adds when the trainer said where it was
    (a :class:`smt_host.train.trainer.RunPosition`): the epoch and step, and
    the last checkpoint this run wrote or resumed from, if any."""
    from smt_host.train.trainer import describe_position

    at = f"at epoch {position.epoch} step {position.step}" if position.epoch else "before training started"
    if position.saved is None:
        return f"{at}; nothing was saved yet"
    return f"{at}; last checkpoint: {describe_position(position.saved)} at {position.path}, continue with --resume"


def refuse_finished(run_dirs: list[Path]) -> None:
    """Raises :class:`~smt_host.train.runlock.RunFolderError` naming the
    first folder that holds a finished run (its ``metrics.json``)."""
    from smt_host.train.runlock import RunFolderError

    for run_dir in run_dirs:
        if (run_dir / "metrics.json").exists():
            raise RunFolderError(
                f"{run_dir} holds a finished run; pass --resume to keep it (a finished run is not retrained) "
                f"or --overwrite to train it again from scratch"
            )


def _train_run(host, spec, eco, run_dir: Path, plan, label: str, position, resume: bool, progress, parallel, device):
    """Trains one run folder: its screen section and log (``label`` at
    ``position``, ``(index, count)``), the note ``error: interrupted`` prints
    for it, and ``train_model``; returns its ``RunResult``."""
    from smt_host.train.trainer import train_model

    progress.start_model(*position, label, run_dir)
    before = _mtime(run_dir / "checkpoint.pt")
    on_interrupt(lambda: interrupt_note(run_dir, before, resume))
    try:
        return train_model(
            host,
            spec,
            eco,
            run_dir,
            plan=plan,
            resume=resume,
            progress=progress,
            parallel=parallel,
            log=progress.console.print,
            device=device,
        )
    except KeyboardInterrupt as exc:
        where = getattr(exc, "run_position", None)
        if where is not None:  # the trainer says where it was and what it saved
            on_interrupt(lambda: f"in {run_dir} {position_note(where)}")
        raise


def _baseline_columns(baseline, task: str, metrics: dict) -> dict:
    """The ``baseline`` and ``ne_change`` entries of a result row (none
    without ``--baseline``): the baseline's test metrics of ``task`` and the
    relative NE change, negative when the model beats its baseline."""
    if baseline is None:
        return {}
    run, same = baseline
    b = run.test[task]
    return {
        "baseline": {**{k: b[k] for k in ("ne", "logloss", "auc")}, "same_model": same, "out_dir": run.out_dir},
        "ne_change": (metrics["ne"] - b["ne"]) / b["ne"],
    }


@click.command("train")
@click.argument("targets", nargs=-1)
@click.option("--ecosystem", "-e", type=click.Path(), help="Ecosystem TOML or folder (default: the built-in one).")
@click.option(
    "--out",
    "-o",
    type=click.Path(),
    default="runs",
    show_default=True,
    help="Output folder; each model gets OUT/<ecosystem>/<model>/.",
)
@overrides_option
@click.option("--resume", is_flag=True, help="Continue runs from their checkpoints (finished runs are not retrained).")
@click.option("--overwrite", is_flag=True, help="Train again from scratch over finished runs (refused without it).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override training.epochs of every model.")
@click.option("--seed", type=int, help="Override training.seed of every model.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--no-progress", is_flag=True, help="No progress bars or progress lines.")
@click.option(
    "--no-tensorboard",
    is_flag=True,
    help="Write no TensorBoard events (the built-in reporter writes RUN/tensorboard/ when tensorboard is installed).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where a one-process run trains: cpu, cuda or cuda:N (tables, dense part, optimizers, evaluation).",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    help="Stop each epoch after N steps (sets training.max_steps_per_epoch of every model).",
)
@click.option(
    "--locked",
    "lockfile",
    type=click.Path(exists=True, dir_okay=False),
    help="Train exactly what this lock file (from `smt ecosystem lock`) measured: each model's technique set "
    "at its locked capacity; every model is checked against the lock before any trains.",
)
@click.option(
    "--baseline",
    "with_baseline",
    is_flag=True,
    help="Also train each model's built-ins-only baseline (same data, training settings, seed and FLOPs budget) "
    "into OUT/<ecosystem>+baseline/<model>/, and print each model's test NE beside the baseline's, with the "
    "change. A model no installed technique applies to is its own baseline (trained once).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train on N local processes (torchrec DistributedModelParallel, launched with torch.distributed.run).",
)
def train_cmd(
    targets,
    ecosystem,
    out,
    overrides,
    resume,
    overwrite,
    epochs,
    seed,
    as_json,
    no_progress,
    no_tensorboard,
    device,
    max_steps,
    lockfile,
    with_baseline,
    nproc_per_node,
) -> None:
    """Train models: with no TARGETS, every model of the default ecosystem.

    TARGETS are model names of the ecosystem, or one ecosystem TOML file or
    folder. For each model: progress, validation each epoch with early
    stopping, test NE / logloss / AUC / calibration. Each run folder
    OUT/<ecosystem>/<model>/ holds checkpoint.pt (model, optimizers, plan,
    manifest; the previous one as checkpoint.prev.pt), metrics.json (the
    results), metrics.jsonl (loss, learning rates, examples/s every tenth of
    an epoch, each validation), train.log (what the screen showed),
    spec.toml (the resolved spec: smt train spec.toml trains it again),
    environment.txt (versions), curves.png and tensorboard/ (when
    tensorboard is installed; --no-tensorboard or -p no:tensorboard).

    On a terminal the screen shows live bars (model i/n, steps, examples/s,
    ETA); on a pipe it prints a line every tenth of an epoch. A finished
    run folder is not trained again without --resume or --overwrite.

    With --baseline each model is compared with what the template gives it
    alone: the NE change is (NE - baseline NE) / baseline NE, negative is
    better. With --locked that is the comparison the lock's adoption made,
    at the same FLOPs (the lock's budget is the baseline's FLOPs).

    With --nproc-per-node N > 1 the command re-launches itself on N local
    ranks with torch.distributed.run (gloo on CPU, NCCL on GPUs); under
    torchrun the trainer shards the tables with torchrec DMP.
    """
    from smt_host.distributed import launch

    if with_baseline and (nproc_per_node > 1 or launch.launched()):
        raise click.UsageError("--baseline trains in one process: leave out --nproc-per-node")
    if nproc_per_node > 1 and not launch.launched():
        argv = launch.strip_option(sys.argv[1:], "--nproc-per-node")
        sys.exit(launch.relaunch(nproc_per_node, argv))
    if launch.launched():  # a rank: torchrun starts it in a session of its own, so it would outlive a killed launcher
        from smt_host.lifeline import die_with_parent

        die_with_parent()

    import attrs

    from smt_host.cli.screen import Screen
    from smt_host.train.trainer import check_device

    if no_tensorboard:
        block_plugins(["tensorboard"])
    host = make_host(quiet=False)
    device = check_device(device)
    eco, specs = load_targets(host, targets, ecosystem, overrides)
    parallel = None
    if launch.launched():  # one rank of a torchrun job: tables sharded with torchrec DMP
        from smt_host.distributed.parallel import Parallel

        parallel = Parallel.from_env()
    locked = None
    if lockfile:  # every model checked and planned at its locked capacity before any trains
        from smt_host.ecosystem.lock import prepare_locked, read_lock

        locked = prepare_locked(host, eco, specs, read_lock(Path(lockfile)), where=lockfile)
        for model, names in locked.unevaluated.items():
            host.notice(
                f"{lockfile}: model {model!r}: installed but not evaluated by the lock, left out: {', '.join(names)} "
                "(run `smt ecosystem run` and `smt ecosystem lock` again to evaluate them)"
            )
    results, baselines = [], {}
    baseline_root = Path(out) / f"{eco.name}+baseline"
    if not resume and not overwrite:
        refuse_finished([Path(out) / eco.name / spec.name for spec in specs])
        if with_baseline:
            refuse_finished([baseline_root / spec.name for spec in specs])
    started = time.perf_counter()
    progress = Screen(disable=no_progress or is_quiet())
    with progress:
        for index, spec in enumerate(specs, 1):
            changes = {
                k: v
                for k, v in (("epochs", epochs), ("seed", seed), ("max_steps_per_epoch", max_steps))
                if v is not None
            }
            if changes:
                spec = attrs.evolve(spec, training=attrs.evolve(spec.training, **changes))
            plan = None
            if locked is not None:
                spec, plan = locked.apply(spec)
            run_dir = Path(out) / eco.name / spec.name
            args = ((index, len(specs)), resume, progress, parallel, device)
            result = _train_run(host, spec, eco, run_dir, plan, spec.name, *args)
            results.append(result)
            if with_baseline:
                from smt_host.plugins import HOST_DIST

                if any(e.dist != HOST_DIST for e in result.plan.entries):
                    base = host.plan(spec, builtins_only=True)  # same training, seed and FLOPs budget
                    label = f"{spec.name} (built-ins only)"
                    baselines[spec.name] = (
                        _train_run(host, spec, eco, baseline_root / spec.name, base, label, *args),
                        False,
                    )
                else:  # no plugin technique applies: the model is its own baseline
                    baselines[spec.name] = (result, True)
        on_interrupt(None)
    wall = time.perf_counter() - started
    rows = [
        {
            "model": r.model,
            "task": t,
            **{k: m[k] for k in ("ne", "logloss", "auc", "calibration")},
            "epochs": r.epochs,
            "wall_s": round(r.wall_s, 2),
            "examples_per_s": round(r.examples_per_s, 1),
            "out_dir": r.out_dir,
            **_baseline_columns(baselines.get(r.model), t, m),
        }
        for r in results
        for t, m in r.test.items()
    ]
    if as_json:
        click.echo(json.dumps({"ecosystem": eco.name, "wall_s": round(wall, 2), "results": rows}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"test metrics, ecosystem {eco.name!r} ({len(results)} models, {duration(wall)} in all)")
    cols = ["model", "task", "NE", *(["baseline NE", "NE change"] if with_baseline else [])]
    for col in (*cols, "logloss", "AUC", "calibration", "epochs", "seconds", "examples/s"):
        table.add_column(col, justify="right" if col not in ("model", "task") else "left", no_wrap=True)
    for row in rows:
        vs = []
        if with_baseline:
            same = row["baseline"]["same_model"]
            vs = [f"{row['baseline']['ne']:.4f}", "same model" if same else f"{row['ne_change']:+.2%}"]
        table.add_row(
            row["model"],
            row["task"],
            f"{row['ne']:.4f}",
            *vs,
            f"{row['logloss']:.4f}",
            f"{row['auc']:.4f}",
            f"{row['calibration']:.3f}",
            str(row["epochs"]),
            f"{row['wall_s']:.1f}",
            rate(row["examples_per_s"]),
        )
    print_table(table)
    click.echo(f"runs written to {Path(out) / eco.name}" + (f", baselines to {baseline_root}" if baselines else ""))
