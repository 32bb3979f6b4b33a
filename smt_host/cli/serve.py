"""``smt export``, ``smt predict`` and ``smt train --nproc-per-node``.

Registered on the ``smt`` group by :mod:`smt_host.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet", ".libfm": "libfm"}


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _host(quiet: bool = False):
    from smt_host.cli.main import _host as host

    return host(quiet)


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Output file (default: RUN_DIR/model.pt2).")
@click.option("--ecosystem", "-e", type=click.Path(exists=True),
              help="Ecosystem holding the model's spec, for checkpoints written before checkpoints carried their spec.")
def export_cmd(run_dir: str, out: Optional[str], ecosystem: Optional[str]) -> None:
    """Export the trained model of RUN_DIR (its checkpoint.pt, one-process or
    distributed) with torch.export, for serving. The file carries the plan,
    manifest and spec; a model trained under other plugins is refused."""
    from smt_host.errors import ConfigError, ExportError, PluginError
    from smt_host.serve.export import export_run

    host = _host()
    try:
        path = export_run(host, Path(run_dir), Path(out) if out else None, ecosystem)
    except (PluginError, ConfigError, ExportError) as exc:  # ManifestMismatch is a PluginError
        _fail(str(exc), 2)
    click.echo(f"exported {path}")


def _data_source(host, info: dict, data: str, model: Optional[str]):
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
                _fail(f"{data} has models {', '.join(eco.models)}; pick one with --model", 2)
            name = next(iter(eco.models))
        spec_d = eco.model(name)
        return open_source(spec_d, eco), spec_d
    eco = host.default_ecosystem()
    p = Path(data).resolve()
    suffixes = [s.lower() for s in p.suffixes if s.lower() != ".gz"]
    kind = spec.data.source if spec.data.source in ("csv", "criteo", "parquet", "libfm") else FILE_KINDS.get(suffixes[-1] if suffixes else "")
    if kind is None:
        _fail(f"cannot tell the format of {data}: give an ecosystem TOML naming its data source and options", 2)
    opts = {k: v for k, v in spec.data.options.items() if k not in ("train", "valid", "test", "file", "split", "split_seed")}
    opts["train"] = str(p)
    opts["streaming"] = False
    spec_f = attrs.evolve(spec, data=attrs.evolve(spec.data, source=kind, options=opts))
    return open_source(spec_f, eco), spec_f


@click.command("predict")
@click.argument("exported", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "-d", required=True,
              help="An ecosystem TOML (its data source and options), or a data file (csv, parquet, libfm, criteo) read with the exported spec.")
@click.option("--model", "-m", help="Model of the --data ecosystem (default: the exported model's name).")
@click.option("--split", default=None, help="Split to score (ecosystem: default test; a file: all of it).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="preds.csv", show_default=True, help="CSV to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True)
def predict_cmd(exported: str, data: str, model: Optional[str], split: Optional[str], out: str, batch_size: int) -> None:
    """Score data with an exported model: writes one probability column per
    task (and the labels when the data has them, as label_<task>)."""
    import torch

    from smt_host.errors import ConfigError, PluginError
    from smt_host.serve.export import load_exported, run_exported

    host = _host()
    program, info = load_exported(Path(exported))
    try:
        source, spec = _data_source(host, info, data, model)
        use = split or ("test" if (data.endswith(".toml") or Path(data).is_dir()) else "train")
        module = program.module()
        preds, labels = [], []
        with torch.no_grad():
            for batch in source.batches(use, batch_size):
                preds.append(torch.sigmoid(run_exported(module, batch.dense, batch.sparse)))
                labels.append(batch.labels)
    except (ConfigError, PluginError, ValueError) as exc:
        _fail(str(exc), 2)
    pred = torch.cat(preds)
    label = torch.cat(labels)
    tasks = info["smt"]["tasks"]
    import csv

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(tasks + [f"label_{t}" for t in tasks])
        for p, y in zip(pred.tolist(), label.tolist()):
            w.writerow([f"{v:.8g}" for v in p] + [f"{v:g}" for v in y])
    click.echo(f"wrote {len(pred)} predictions to {out}")


def install_train_options(cli: click.Group) -> None:
    """Adds ``--nproc-per-node N`` to ``smt train``: with N > 1 the command
    re-launches itself on N local ranks with ``torch.distributed.run``
    (gloo on CPU, NCCL on GPUs); under ``torchrun`` the trainer shards the
    tables with torchrec DMP (see :mod:`smt_host.distributed`)."""
    train = cli.commands["train"]
    if any(p.name == "nproc_per_node" for p in train.params):
        return
    train.params.append(click.Option(
        ["--nproc-per-node"], type=click.IntRange(min=1), default=1, show_default=True,
        help="Train on N local processes (torchrec DistributedModelParallel, launched with torch.distributed.run).",
    ))
    inner = train.callback

    def callback(nproc_per_node: int = 1, **kwargs):
        from smt_host.distributed import launch as distributed

        if nproc_per_node > 1 and not distributed.launched():
            argv = distributed.strip_option(sys.argv[1:], "--nproc-per-node")
            sys.exit(distributed.relaunch(nproc_per_node, argv))
        return inner(**kwargs)

    train.callback = callback
