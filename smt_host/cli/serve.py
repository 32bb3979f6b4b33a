"""``smt export`` and ``smt predict``: a trained run as a ``torch.export``
program, and scoring data with it."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    with quiet_torch():
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


#: output formats by the suffix of --out ("-": CSV on stdout)
OUT_KINDS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

#: what torch prints while a program is exported, saved, loaded and run,
#: each known and harmless here, filtered so that it does not bury the
#: command's output (any other warning still shows):
#: (logger or None for a ``warnings`` warning, message pattern)
KNOWN_TORCH_WARNINGS: tuple[tuple[str | None, str], ...] = (
    # torch.export.save (pt2 archive): weights of a tensor group are all on
    # CPU here, so "the first one" it falls back to is the right one
    (None, r"No complete tensor found in the group"),
    # torch.export.load: one log line per unbacked symbol (u0, u1, ...: data-
    # dependent sizes such as a jagged feature's length) that the range
    # constraints name but the re-built graph does not; nothing is lost
    ("torch._export.serde.serialize", r"Symbol \S+ did not appear in the graph that was deserialized"),
    # torchrec (root logger) while torch.export traces a KeyedJaggedTensor's
    # to_dict: it makes exporting slower, the program is the same
    ("", r"Trying to non-strict torch.export KJT to_dict"),
)


class _DropKnown(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in self.patterns)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Drops :data:`KNOWN_TORCH_WARNINGS` (warnings and log records) inside the block."""
    loggers: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        for logger, pattern in KNOWN_TORCH_WARNINGS:
            if logger is None:
                warnings.filterwarnings("ignore", message=pattern)
            else:
                loggers.setdefault(logger, []).append(pattern)
        filters = [(logging.getLogger(name), _DropKnown(p)) for name, p in loggers.items()]
        for log, f in filters:
            log.addFilter(f)
        try:
            yield
        finally:
            for log, f in filters:
                log.removeFilter(f)


def _keep_columns(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    names = [n.strip() for n in value.split(",")]
    if any(not n for n in names):
        raise click.BadParameter(f"expected column names separated by commas, got {value!r}", ctx=ctx, param=param)
    return tuple(dict.fromkeys(names))


def _out_kind(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value != "-" and Path(value).suffix.lower() not in OUT_KINDS:
        raise click.BadParameter(
            f"{value!r}: give a file ending in .csv, .parquet (or .pq), or - for CSV on stdout", ctx=ctx, param=param
        )
    return value


def _scored(source, split: str, batch_size: int, module) -> Iterator[tuple[Any, Any, Any, float]]:
    """(kept columns (a pyarrow Table, or None), probabilities (n, T), labels
    (n, T) with NaN where the data has none, seconds in the model) per chunk
    of rows, in the data's order."""
    import time

    import torch

    from smt_host.data.readers import FileSource
    from smt_host.serve.export import run_exported

    def score(batches) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = [torch.sigmoid(run_exported(module, b.dense, b.sparse)) for b in batches]
        return torch.cat(out), time.perf_counter() - t0

    if isinstance(source, FileSource):
        for chunk in source.rows(split):
            batches = list(chunk.data.batches(batch_size))
            probs, secs = score(batches)
            yield chunk.extra, probs, chunk.data.labels, secs
        return
    for batch in source.batches(split, batch_size):
        probs, secs = score([batch])
        yield None, probs, batch.labels, secs


class _Writer:
    """Writes chunks of predictions as CSV (a file or stdout) or Parquet; the
    columns: the kept ones, one probability per task, then ``label_<task>``
    for each task whose labels the data has (decided at the first chunk)."""

    def __init__(self, kind: str, path: Path | None, tasks: list[str], keep: tuple[str, ...]) -> None:
        self.kind, self.path, self.tasks, self.keep = kind, path, tasks, keep
        self.labelled: list[int] | None = None
        self._file = None
        self._csv = None
        self._pq = None

    def write(self, extra, probs, labels) -> None:
        import numpy as np

        p = probs.numpy()
        y = labels.numpy()
        if self.labelled is None:
            self.labelled = [t for t in range(len(self.tasks)) if not np.isnan(y[:, t]).all()]
            self._open(extra)
        if self.kind == "parquet":
            import pyarrow as pa

            cols = {name: extra.column(name) for name in self.keep}
            cols.update({task: pa.array(p[:, t]) for t, task in enumerate(self.tasks)})
            cols.update({f"label_{self.tasks[t]}": pa.array(y[:, t], from_pandas=True) for t in self.labelled})
            self._pq.write_table(pa.table(cols, schema=self._schema))
            return
        kept = [extra.column(name).to_pylist() for name in self.keep]
        for i in range(len(p)):
            row = ["" if c[i] is None else c[i] for c in kept]
            row += [f"{v:.8g}" for v in p[i]]
            row += ["" if np.isnan(y[i, t]) else f"{y[i, t]:g}" for t in self.labelled]
            self._csv.writerow(row)

    def _open(self, extra) -> None:
        header = [*self.keep, *self.tasks, *(f"label_{self.tasks[t]}" for t in self.labelled)]
        if self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [extra.schema.field(n) if extra is not None else pa.field(n, pa.string()) for n in self.keep]
            fields += [pa.field(name, pa.float32()) for name in header[len(self.keep) :]]
            self._schema = pa.schema(fields)
            self._pq = pq.ParquetWriter(str(self.path), self._schema)
            return
        import csv
        import sys

        self._file = sys.stdout if self.path is None else open(self.path, "w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(header)

    def close(self, failed: bool = False) -> None:
        """Flushes and closes; with no rows written (and not ``failed``), writes the header alone."""
        if self.labelled is None and not failed:
            self.labelled = []
            self._open(None)
        if self._pq is not None:
            self._pq.close()
        elif self._file is not None and self.path is not None:
            self._file.close()
        elif self._file is not None:
            self._file.flush()


def _write_all(writer: _Writer, scored: Iterator) -> tuple[int, float, list, list, list[int]]:
    """Writes every chunk of ``scored`` (see :func:`_scored`); returns (rows,
    seconds in the model, probabilities and labels per chunk, the tasks with labels)."""
    n, model_s, preds, labels = 0, 0.0, [], []
    try:
        with quiet_torch():
            for extra, probs, y, secs in scored:
                writer.write(extra, probs, y)
                preds.append(probs)
                labels.append(y)
                n += len(probs)
                model_s += secs
    except BaseException:
        writer.close(failed=True)
        raise
    writer.close()
    return n, model_s, preds, labels, writer.labelled or []


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
    "--out",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    show_default=True,
    callback=_out_kind,
    help="Where to write: a .csv or .parquet (.pq) file, or - for CSV on stdout.",
)
@click.option(
    "--keep-columns",
    "-k",
    metavar="A,B",
    callback=_keep_columns,
    help="Columns of the data passed through to the output before the predictions (ids); csv and parquet data.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8192, show_default=True)
def predict_cmd(
    exported: str,
    data: str,
    model: str | None,
    split: str | None,
    out: str,
    keep_columns: tuple[str, ...],
    batch_size: int,
) -> None:
    """Score data with an exported model: writes the --keep-columns, one
    probability column per task, and the labels (label_<task>) of the tasks
    whose label column the data has; labels are optional (csv and parquet
    data may lack them). On stderr: rows/s, and for each task with labels
    NE (against the scored data's own positive rate), AUC, logloss and
    calibration."""
    import time

    import torch

    from smt_host.data.readers import FileSource
    from smt_host.serve.export import load_exported
    from smt_host.train.metrics import binary_metrics

    host = make_host()
    with quiet_torch():
        program, info = load_exported(Path(exported))
        module = program.module()
    tasks = list(info["smt"]["tasks"])
    clash = sorted(set(keep_columns) & ({*tasks} | {f"label_{t}" for t in tasks}))
    if clash:
        raise click.BadParameter(
            f"{', '.join(clash)} would repeat an output column (the tasks and label_<task>)",
            param_hint="--keep-columns",
        )
    try:
        source, spec = _data_source(host, info, data, model)
        if isinstance(source, FileSource) and source.scorable:  # labels optional, kept columns passed through
            source = source.for_scoring(keep_columns)
        elif keep_columns:
            raise ConfigError(
                [f"--keep-columns needs csv or parquet data; {data} is read by the {spec.data.source!r} source"]
            )
        use = split or ("test" if (data.endswith(".toml") or Path(data).is_dir()) else "train")
        path = None if out == "-" else Path(out)
        kind = "csv" if path is None else OUT_KINDS[path.suffix.lower()]
        t0 = time.perf_counter()
        scored = _scored(source, use, batch_size, module)
        if path is None:
            n, model_s, preds, labels, labelled = _write_all(_Writer(kind, None, tasks, keep_columns), scored)
        else:
            from smt_host.files import atomic_path

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:  # a failed run leaves no half-written file
                n, model_s, preds, labels, labelled = _write_all(_Writer(kind, tmp, tasks, keep_columns), scored)
    except ValueError as exc:
        if isinstance(exc, SmtError):
            raise
        raise ConfigError([str(exc)]) from exc  # a value the data or its options cannot take: bad input
    wall = time.perf_counter() - t0
    where = "stdout" if path is None else str(path)
    click.echo(
        f"wrote {n} predictions to {where} in {wall:.2f} s: {n / max(wall, 1e-9):,.0f} rows/s "
        f"({n / max(model_s, 1e-9):,.0f} rows/s in the model, batch {batch_size})",
        err=True,
    )
    if not n:
        return
    pred, label = torch.cat(preds), torch.cat(labels)
    for t in labelled:
        have = ~torch.isnan(label[:, t])
        p, y = pred[have, t], label[have, t]
        m = binary_metrics(p, y, float(y.double().mean()))
        click.echo(
            f"{tasks[t]}: NE {m['ne']:.4f}  AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  "
            f"calibration {m['calibration']:.4f}  ({m['examples']} labelled rows, {m['positives']} positive)",
            err=True,
        )
