"""``smt train``: train models, one process or ``--nproc-per-node N``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from smt_host.cli.common import console, load_targets, make_host, on_interrupt, overrides_option


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
@click.option("--epochs", type=click.IntRange(min=1), help="Override training.epochs of every model.")
@click.option("--seed", type=int, help="Override training.seed of every model.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option(
    "--locked",
    "lockfile",
    type=click.Path(exists=True, dir_okay=False),
    help="Train exactly the technique set of this lock file (from `smt ecosystem lock`).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train on N local processes (torchrec DistributedModelParallel, launched with torch.distributed.run).",
)
def train_cmd(
    targets, ecosystem, out, overrides, resume, epochs, seed, as_json, no_progress, lockfile, nproc_per_node
) -> None:
    """Train models: with no TARGETS, every model of the default ecosystem.

    TARGETS are model names of the ecosystem, or one ecosystem TOML file or
    folder. For each model: progress, validation each epoch with early
    stopping, test NE / logloss / AUC / calibration. Each run folder holds
    checkpoint.pt (model, optimizer, plan, manifest) and metrics.json.

    With --nproc-per-node N > 1 the command re-launches itself on N local
    ranks with torch.distributed.run (gloo on CPU, NCCL on GPUs); under
    torchrun the trainer shards the tables with torchrec DMP.
    """
    from smt_host.distributed import launch

    if nproc_per_node > 1 and not launch.launched():
        argv = launch.strip_option(sys.argv[1:], "--nproc-per-node")
        sys.exit(launch.relaunch(nproc_per_node, argv))

    import attrs
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from smt_host.errors import LockError, ManifestMismatch
    from smt_host.train.trainer import train_model

    host = make_host(quiet=False)
    eco, specs = load_targets(host, targets, ecosystem, overrides)
    parallel = None
    if launch.launched():  # one rank of a torchrun job: tables sharded with torchrec DMP
        from smt_host.distributed.parallel import Parallel

        parallel = Parallel.from_env()
    lock = None
    if lockfile:
        from smt_host.ecosystem.lock import check_lock, locked_spec

        lock = json.loads(Path(lockfile).read_text())
        try:
            check_lock(lock, host)
        except ManifestMismatch as exc:
            raise ManifestMismatch(f"{lockfile}: {exc}") from exc
    results = []
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
        disable=no_progress,
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
            before = _mtime(run_dir / "checkpoint.pt")
            on_interrupt(lambda run_dir=run_dir, before=before: interrupt_note(run_dir, before, resume))
            plan = None
            if lock is not None:
                try:
                    spec, only = locked_spec(spec, lock)
                except LockError as exc:
                    raise LockError(f"{lockfile}: {exc}") from exc
                plan = host.plan(spec, only=only)
            results.append(
                train_model(
                    host,
                    spec,
                    eco,
                    run_dir,
                    plan=plan,
                    resume=resume,
                    progress=progress,
                    parallel=parallel,
                    log=progress.console.print,
                )
            )
        on_interrupt(None)
    wall = time.perf_counter() - started
    rows = [
        {
            "model": r.model,
            "task": t,
            **{k: m[k] for k in ("ne", "logloss", "auc", "calibration")},
            "epochs": r.epochs,
            "wall_s": round(r.wall_s, 2),
            "out_dir": r.out_dir,
        }
        for r in results
        for t, m in r.test.items()
    ]
    if as_json:
        click.echo(json.dumps({"ecosystem": eco.name, "wall_s": round(wall, 2), "results": rows}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"test metrics, ecosystem {eco.name!r} ({wall:.1f} s)")
    for col in ("model", "task", "NE", "logloss", "AUC", "calibration", "epochs", "seconds"):
        table.add_column(col, justify="right" if col not in ("model", "task") else "left")
    for row in rows:
        table.add_row(
            row["model"],
            row["task"],
            f"{row['ne']:.4f}",
            f"{row['logloss']:.4f}",
            f"{row['auc']:.4f}",
            f"{row['calibration']:.3f}",
            str(row["epochs"]),
            f"{row['wall_s']:.1f}",
        )
    console().print(table)
    click.echo(f"runs written to {Path(out) / eco.name}")
