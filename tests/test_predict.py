"""`smt predict` for real scoring: label-free Parquet with id passthrough,
CSV on stdout with NE/AUC, and the reader's optional labels and passthrough
columns (aligned with the rows kept when malformed rows are skipped)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_distributed import smt, tiny_toml

from smt_host.data.chunks import RowFaults
from smt_host.data.readers import FileSource
from smt_host.data.tabular import DenseColumn, SparseColumn, TabularFormat
from smt_host.errors import DataFormatError
from smt_host.testing import _SPARSE


def _scoring_table(n: int, seed: int, labels: bool) -> pa.Table:
    """n rows of the tiny model's columns, a ``request_id`` (not a feature)
    and, with ``labels``, a ``click`` column."""
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {"request_id": [f"r{i:05d}" for i in range(n)]}
    for name, vocab in _SPARSE:
        cols[name] = rng.integers(0, vocab, n)
    cols["user_activity"] = rng.random(n).astype(np.float32)
    cols["ad_hist_ctr"] = rng.random(n).astype(np.float32)
    if labels:
        cols["click"] = rng.integers(0, 2, n)
    return pa.table(cols)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run trained for one epoch, exported; and two Parquet files of
    the same 700 rows: one with labels, one without them in reverse order."""
    d = tmp_path_factory.mktemp("predict")
    tiny_toml(d / "tiny.toml", epochs=1)
    smt("train", "tiny.toml", "--out", "runs", "--no-progress", cwd=d)
    run_dir = d / "runs" / "tiny" / "tiny_ctr"
    smt("export", str(run_dir), "--out", "model.pt2", cwd=d)
    table = _scoring_table(700, seed=1, labels=True)
    pq.write_table(table, d / "labelled.parquet")
    reverse = pa.array(np.arange(len(table))[::-1])
    pq.write_table(table.drop_columns(["click"]).take(reverse), d / "unlabelled.parquet")
    return d, run_dir


def _eager(run_dir: Path, data: Path) -> dict[str, float]:
    """request_id -> probability of the run's model (eager, not exported) on ``data``."""
    from smt_host.data import open_source
    from smt_host.host import Host
    from smt_host.serve.export import load_run

    host = Host.create(load="")
    model, _plan, spec, _ = load_run(host, run_dir)
    import attrs

    spec = attrs.evolve(
        spec, data=attrs.evolve(spec.data, source="parquet", options={"train": str(data), "streaming": False})
    )
    source = open_source(spec, host.default_ecosystem(), host.spm.data_sources).for_scoring(["request_id"])
    out = {}
    with torch.no_grad():
        for chunk in source.rows("train"):
            probs = torch.cat([torch.sigmoid(model(b.dense, b.sparse)) for b in chunk.data.batches(256)])
            out.update(zip(chunk.extra.column("request_id").to_pylist(), probs[:, 0].tolist()))
    return out


def test_predict_label_free_parquet_passes_ids_through(exported):
    d, run_dir = exported
    out = smt(
        "predict", "model.pt2", "--data", "unlabelled.parquet", "--keep-columns", "request_id", "-o", "scores.parquet",
        cwd=d,
    )  # fmt: skip
    table = pq.read_table(d / "scores.parquet")
    assert table.column_names == ["request_id", "click"]  # no label column: the data has none
    ids = table.column("request_id").to_pylist()
    assert ids == [f"r{i:05d}" for i in range(699, -1, -1)]  # every row, in the file's order
    got = dict(zip(ids, table.column("click").to_pylist()))
    eager = _eager(run_dir, d / "labelled.parquet")  # the same rows in another order, with labels
    assert len(set(got.values())) > 1  # the ids are not all scored alike
    for rid, p in eager.items():
        assert math.isclose(got[rid], p, rel_tol=1e-5, abs_tol=1e-6), rid
    stderr = out.stderr.strip().splitlines()
    assert stderr[-1].startswith("wrote 700 predictions to scores.parquet in ") and "rows/s" in stderr[-1]
    assert "NE" not in out.stderr and "Symbol" not in out.stderr and "Warning" not in out.stderr


def test_predict_to_stdout_with_labels_reports_ne_and_auc(exported):
    from smt_host.train.metrics import binary_metrics

    d, _ = exported
    out = smt("predict", "model.pt2", "--data", "labelled.parquet", "-k", "request_id,user_id", cwd=d)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["request_id", "user_id", "click", "label_click"]
    table = pq.read_table(d / "labelled.parquet")
    assert [r["request_id"] for r in rows] == table.column("request_id").to_pylist()
    assert [int(r["user_id"]) for r in rows] == table.column("user_id").to_pylist()
    assert [float(r["label_click"]) for r in rows] == [float(v) for v in table.column("click").to_pylist()]
    pred = torch.tensor([float(r["click"]) for r in rows])
    label = torch.tensor([float(r["label_click"]) for r in rows])
    m = binary_metrics(pred, label, float(label.mean()))
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("click: ")]
    assert line.startswith(f"click: NE {m['ne']:.4f}  AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  ")
    assert f"(700 labelled rows, {m['positives']} positive)" in line
    assert "wrote 700 predictions to stdout" in out.stderr


def test_predict_errors_are_one_line(exported):
    d, _ = exported
    bad = smt("predict", "model.pt2", "--data", "unlabelled.parquet", "-k", "order_id", cwd=d, check=False)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unlabelled.parquet:0: missing column 'order_id'; the file has 10 columns: ")
    suffix = smt("predict", "model.pt2", "--data", "unlabelled.parquet", "-o", "scores.json", cwd=d, check=False)
    assert suffix.returncode == 2
    assert "'scores.json': give a file ending in .csv, .parquet (or .pq), or - for CSV on stdout" in suffix.stderr


# ------------------------------------------------------- the reader, in process


def _fmt(kind: str, **kw) -> TabularFormat:
    return TabularFormat(
        kind, (SparseColumn("user", "user", 50, encode="int"),), (DenseColumn("x", "x"),), ("click",), **kw
    )


def _read(fmt: TabularFormat, path: Path, skip: bool = False):
    return list(fmt.read(path, RowFaults(path, skip)))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_labels_are_optional_only_when_asked(tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    if kind == "csv":
        path.write_text("id,user,x\na,1,0.5\nb,2,1.5\n")
    else:
        pq.write_table(pa.table({"id": ["a", "b"], "user": [1, 2], "x": [0.5, 1.5]}), path)
    with pytest.raises(DataFormatError, match="missing column 'click'; the file has 3 columns: id, user, x"):
        _read(_fmt(kind), path)
    (chunk,) = _read(_fmt(kind, optional_labels=True, passthrough=("id",)), path)
    assert torch.isnan(chunk.data.labels).all() and chunk.data.labels.shape == (2, 1)
    assert chunk.data.ids[:, 0].tolist() == [1, 2] and chunk.extra.column("id").to_pylist() == ["a", "b"]
    with pytest.raises(DataFormatError, match="missing column 'user'"):  # features stay required
        _read(_fmt(kind, optional_labels=True), _without(path, kind, "user"))


def _without(path: Path, kind: str, column: str) -> Path:
    out = path.with_name(f"no_{column}.{kind}")
    if kind == "csv":
        rows = list(csv.reader(path.read_text().splitlines()))
        keep = [i for i, c in enumerate(rows[0]) if c != column]
        out.write_text("\n".join(",".join(r[i] for i in keep) for r in rows) + "\n")
    else:
        pq.write_table(pq.read_table(path).drop_columns([column]), out)
    return out


def test_passthrough_columns_stay_aligned_when_malformed_rows_are_skipped(tmp_path):
    path = tmp_path / "d.csv"
    # line 3: an id outside the vocabulary; line 5: a dense cell that is not a number
    path.write_text("id,user,x,click\na,1,0.5,1\nb,999,1.5,0\nc,3,2.5,0\nd,4,x,1\ne,5,1,0\n")
    fmt = _fmt("csv", passthrough=("id",))
    source = FileSource(fmt, ["click"], {"train": [path]}, skip_malformed=True)
    chunks = list(source.rows("train"))
    ids = [i for c in chunks for i in c.extra.column("id").to_pylist()]
    users = [int(u) for c in chunks for u in c.data.ids[:, 0]]
    assert ids == ["a", "c", "e"] and users == [1, 3, 5]
    assert [int(v) for c in chunks for v in c.lines] == [2, 4, 6]
    assert source.skipped == {"d.csv": 2}


def test_for_scoring_refuses_libfm(tmp_path):
    from smt_host.data.libfm import Field, LibfmFormat

    fmt = LibfmFormat(fields=(Field("user", 0, 9),), keys=("user",), sequence=frozenset(), chunk_rows=10)
    source = FileSource(fmt, ["click"], {"train": [tmp_path / "x.libfm"]})
    assert not source.scorable
    with pytest.raises(ValueError, match="only csv and parquet data can be scored without labels"):
        source.for_scoring()


def test_known_torch_warnings_are_dropped_and_others_kept(caplog):
    import logging
    import warnings

    from smt_host.cli.serve import quiet_torch

    serde = logging.getLogger("torch._export.serde.serialize")
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with quiet_torch():
            serde.warning("Symbol %s did not appear in the graph that was deserialized", "u3")
            serde.warning("Symbol table is damaged")
            warnings.warn("No complete tensor found in the group! Returning the first one.", UserWarning, stacklevel=1)
            warnings.warn("something new", UserWarning, stacklevel=1)
        serde.warning("Symbol %s did not appear in the graph that was deserialized", "u4")  # outside: shown
    assert [r.getMessage() for r in caplog.records] == [
        "Symbol table is damaged",
        "Symbol u4 did not appear in the graph that was deserialized",
    ]
    assert [str(w.message) for w in seen] == ["something new"]
