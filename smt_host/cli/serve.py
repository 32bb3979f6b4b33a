"""``smt export`` and ``smt predict``: a trained run as a ``torch.export``
program, and scoring data with it."""

from __future__ import annotations

from pathlib import Path

import click

from smt_host.cli.common import make_host
from smt_host.errors import ConfigError, SmtError

FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet", ".libfm": "libfm"}


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Output file (default: RUN_DIR/model.pt2).")
@click.option(
    "--ecosystem",
    "-e",
    type=click.Path(exists=True),
    help="Ecosystem holding the model's spec, for checkpoints written before checkpoints carried their spec.",
)
def export_cmd(run_dir: str, out: str | None, ecosystem: str | None) -> None:
    """Export the trained model of RUN_DIR (its checkpoint.pt, one-process or
    distributed) with torch.export, for serving. The file carries the plan,
    manifest and spec; a model trained under other plugins is refused."""
    from smt_host.serve.export import export_run

    host = make_host()
    path = export_run(host, Path(run_dir), Path(out) if out else None, ecosystem)
    click.echo(f"exported {path}")


def _data_source(host, info: dict, data: str, model: str | None):
    """(source, split-less spec) for ``--data``: an ecosystem TOML/folder, or a file
    read with the export's spec (its file-source options, or the format of
    the file's extension)."""
    import attrs

    from smt_host.data import open_source
    from smt_host.spec.converter import structure
    from smt_host.spec.schema import ModelSpec

    spec = structure(host.conv, info["spec"], ModelSpec, "$.spec")
    if data.endswith(".toml") or Path(data).is_dir():
        eco = host.load_ecosystem(data)
        name = model or (spec.name if spec.name in eco.models else None)
        if name is None:
            if len(eco.models) != 1:
                raise click.UsageError(f"{data} has models {', '.join(eco.models)}; pick one with --model")
            name = next(iter(eco.models))
        spec_d = eco.model(name)
        return open_source(spec_d, eco, host.spm.data_sources), spec_d
    eco = host.default_ecosystem()
    p = Path(data).resolve()
    suffixes = [s.lower() for s in p.suffixes if s.lower() != ".gz"]
    kind = (
        spec.data.source
        if spec.data.source in ("csv", "criteo", "parquet", "libfm")
        else FILE_KINDS.get(suffixes[-1] if suffixes else "")
    )
    if kind is None:
        raise ConfigError(
            [f"cannot tell the format of {data}: give an ecosystem TOML naming its data source and options"]
        )
    opts = {
        k: v for k, v in spec.data.options.items() if k not in ("train", "valid", "test", "file", "split", "split_seed")
    }
    opts["train"] = str(p)
    opts["streaming"] = False
    spec_f = attrs.evolve(spec, data=attrs.evolve(spec.data, source=kind, options=opts))
    return open_source(spec_f, eco, host.spm.data_sources), spec_f


@click.command("predict")
@click.argument("exported", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data",
    "-d",
    required=True,
    help="An ecosystem TOML (its data source and options), or a data file (csv, parquet, libfm, criteo) read with the exported spec.",
)
@click.option("--model", "-m", help="Model of the --data ecosystem (default: the exported model's name).")
@click.option("--split", default=None, help="Split to score (ecosystem: default test; a file: all of it).")
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False), default="preds.csv", show_default=True, help="CSV to write."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True)
def predict_cmd(exported: str, data: str, model: str | None, split: str | None, out: str, batch_size: int) -> None:
    """Score data with an exported model: writes one probability column per
    task (and the labels when the data has them, as label_<task>)."""
    import csv

    import torch

    from smt_host.serve.export import load_exported, run_exported

    host = make_host()
    program, info = load_exported(Path(exported))
    try:
        source, _spec = _data_source(host, info, data, model)
        use = split or ("test" if (data.endswith(".toml") or Path(data).is_dir()) else "train")
        module = program.module()
        preds, labels = [], []
        with torch.no_grad():
            for batch in source.batches(use, batch_size):
                preds.append(torch.sigmoid(run_exported(module, batch.dense, batch.sparse)))
                labels.append(batch.labels)
    except ValueError as exc:
        if isinstance(exc, SmtError):
            raise
        raise ConfigError([str(exc)]) from exc  # a value the data or its options cannot take: bad input
    pred = torch.cat(preds)
    label = torch.cat(labels)
    tasks = info["smt"]["tasks"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(tasks + [f"label_{t}" for t in tasks])
        for p, y in zip(pred.tolist(), label.tolist()):
            w.writerow([f"{v:.8g}" for v in p] + [f"{v:g}" for v in y])
    click.echo(f"wrote {len(pred)} predictions to {out}")
