"""File readers (smt_host.data.readers) on the real samples in SMT_DATA_DIR
and on small bad files written to tmp_path."""

from __future__ import annotations

import gzip
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from smt_host.data import data_dir, open_source
from smt_host.data.chunks import RowFaults
from smt_host.data.readers import FileSource
from smt_host.data.tabular import fnv1a64
from smt_host.errors import ConfigError, DataFormatError
from smt_host.plugins import HOST_DIST, get_plugin_manager
from smt_host.spec.loading import ecosystem_from_dict, load_ecosystem

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "real"
FRAPPE_FIELDS = [
    ("user", 0, 956),
    ("item", 957, 5038),
    ("daytime", 5039, 5045),
    ("weekday", 5046, 5052),
    ("isweekend", 5053, 5054),
    ("homework", 5055, 5057),
    ("cost", 5058, 5059),
    ("weather", 5060, 5068),
    ("country", 5069, 5148),
    ("city", 5149, 5381),
]


def need_data(*parts: str) -> Path:
    path = data_dir().joinpath(*parts).resolve()
    if not path.exists():
        pytest.skip(f"real data not found at {data_dir()} (set SMT_DATA_DIR)")
    return path


def make_model(source: str, options: dict, sparse, dense=(), tasks=({"name": "click"},)):
    """(model, eco) of a one-model ecosystem; ``sparse`` items are names or dicts."""
    sp = [s if isinstance(s, dict) else {"name": s, "vocab_size": 100, "embedding_dim": 4} for s in sparse]
    for s in sp:
        s.setdefault("embedding_dim", 4)
    eco = ecosystem_from_dict(
        {
            "model": {
                "name": "m",
                "tasks": list(tasks),
                "features": {"sparse": sp, "dense": [{"name": d} for d in dense]},
                "data": {"source": source, "options": options},
            }
        }
    )
    return eco.model("m"), eco


def open_model(source: str, options: dict, sparse, dense=(), tasks=({"name": "click"},)) -> FileSource:
    model, eco = make_model(source, options, sparse, dense, tasks)
    return open_source(model, eco)


def fnv(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def hashed(text: str, vocab: int) -> int:
    return 0 if not text else 1 + fnv(text) % (vocab - 1)


def all_rows(src: FileSource, split: str, batch_size: int = 100_000):
    """(ids (N, S) from the KJT, labels (N, T), dense (N, Nd)) for single-valued features."""
    ids, labels, dense = [], [], []
    for b in src.batches(split, batch_size):
        kjt = b.sparse
        ids.append(torch.stack([kjt[k].values() for k in kjt.keys()], dim=1))
        labels.append(b.labels)
        dense.append(b.dense)
    return torch.cat(ids), torch.cat(labels), torch.cat(dense)


def assert_same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.sparse.keys() == y.sparse.keys()
        assert torch.equal(x.sparse.values(), y.sparse.values())
        assert torch.equal(x.sparse.lengths(), y.sparse.lengths())
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.dense, y.dense)


def test_builtin_sources_come_from_the_plugin_manager() -> None:
    sources = get_plugin_manager(load="").data_sources
    assert sorted(sources) == ["criteo", "csv", "libfm", "parquet", "synthetic"]
    assert {r.dist for r in sources.values()} == {HOST_DIST}


def test_fnv1a64_known_vectors() -> None:
    h = fnv1a64(pa.array(["a", "", "foobar", None]))
    assert [int(x) for x in h] == [0xAF63DC4C8601EC8C, 0xCBF29CE484222325, 0x85944171F73967E8, 0xCBF29CE484222325]


# ------------------------------------------------------------------- frappe


def frappe_source(**extra) -> FileSource:
    need_data("frappe", "frappe.validation.libfm.gz")
    eco = load_ecosystem(EXAMPLES / "frappe.toml")
    model = eco.model("frappe")
    if extra:
        import attrs

        model = attrs.evolve(model, data=attrs.evolve(model.data, options={**model.data.options, **extra}))
    return open_source(model, eco)


@pytest.fixture(scope="module")
def frappe() -> FileSource:
    return frappe_source(streaming=False)


def test_frappe_validation_and_test_counts(frappe: FileSource) -> None:
    valid, test = frappe.load("valid"), frappe.load("test")
    assert len(valid) == 57_722 and int(valid.labels.sum()) == 19_063
    assert round(float(valid.labels.mean()) * 100, 2) == 33.03
    assert len(test) == 28_860 and int(test.labels.sum()) == 9_536
    assert valid.labels.shape == (57_722, 1) and valid.dense.shape == (57_722, 0)
    assert set(valid.labels.unique().tolist()) == {0.0, 1.0}


def test_frappe_ids_are_local_to_their_field(frappe: FileSource) -> None:
    valid = frappe.load("valid")
    # first line: "1 266:1 1244:1 5042:1 5049:1 5054:1 5055:1 5058:1 5062:1 5074:1 5149:1"
    assert valid.ids[0].tolist() == [266, 1244 - 957, 3, 3, 1, 0, 0, 2, 5, 0]
    assert valid.labels[0].item() == 1.0
    # second line has label -1
    assert valid.labels[1].item() == 0.0
    sizes = torch.tensor([end - start + 1 for _, start, end in FRAPPE_FIELDS])
    assert (valid.ids >= 0).all() and (valid.ids < sizes).all()
    assert valid.keys == tuple(name for name, _, _ in FRAPPE_FIELDS)


def test_frappe_batches_kjt(frappe: FileSource) -> None:
    b = next(frappe.batches("test", 512))
    assert len(b) == 512 and b.labels.shape == (512, 1) and b.dense.shape == (512, 0)
    assert b.sparse.keys() == [name for name, _, _ in FRAPPE_FIELDS]
    assert b.sparse.lengths().tolist() == [1] * (512 * 10)
    test = frappe.load("test")
    assert torch.equal(b.sparse["item"].values(), test.ids[:512, 1])
    sizes = [len(x) for x in frappe.batches("test", 10_000)]
    assert sizes == [10_000, 10_000, 8_860]


def test_frappe_streaming_equals_in_memory(frappe: FileSource) -> None:
    stream = frappe_source(streaming=True, chunk_rows=7_000)
    assert stream.streaming and not frappe.streaming
    assert_same_batches(stream.batches("test", 4096), frappe.batches("test", 4096))
    assert stream.num_examples("test") == 28_860
    # shuffled streaming: deterministic per (seed, epoch), a permutation of the rows
    s1 = [b.labels for b in stream.batches("test", 4096, shuffle=True, seed=1, epoch=0)]
    s2 = [b.labels for b in stream.batches("test", 4096, shuffle=True, seed=1, epoch=0)]
    s3 = [b.labels for b in stream.batches("test", 4096, shuffle=True, seed=1, epoch=1)]
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))
    assert not torch.equal(torch.cat(s1), torch.cat(s3))
    assert int(torch.cat(s1).sum()) == int(torch.cat(s3).sum()) == 9_536
    assert sum(len(x) for x in s1) == 28_860
    assert len(list(stream.batches("test", 1000, max_batches=3))) == 3


@pytest.mark.data
def test_frappe_full_train_file(frappe: FileSource) -> None:
    train = frappe.load("train")
    assert len(train) == 202_027 and int(train.labels.sum()) == 67_604
    assert frappe.base_rates().tolist() == pytest.approx([67_604 / 202_027])
    # the README's train vocabulary: 5,379 distinct global ids, 954 users
    starts = torch.tensor([start for _, start, _ in FRAPPE_FIELDS])
    assert len(torch.unique(train.ids + starts)) == 5_379
    assert len(torch.unique(train.ids[:, 0])) == 954


@pytest.mark.data
def test_frappe_streaming_base_rates() -> None:
    stream = frappe_source(streaming=True)
    assert stream.base_rates().tolist() == pytest.approx([67_604 / 202_027])
    assert stream.num_examples("train") == 202_027


# ------------------------------------------------------------ criteo / csv


def example_source(name: str, **extra) -> FileSource:
    """The source of examples/real/<name>.toml, with options overridden."""
    import attrs

    eco = load_ecosystem(EXAMPLES / f"{name}.toml")
    (model,) = eco.models.values()
    model = attrs.evolve(model, data=attrs.evolve(model.data, options={**model.data.options, **extra}))
    return open_source(model, eco)


def header_of(path: Path) -> list[str]:
    """The CSV header of a data file under SMT_DATA_DIR (the repository holds no copy of it)."""
    with gzip.open(path, "rt") as f:
        return f.readline().strip().split(",")


def line_of(path: Path, number: int) -> list[str]:
    """Cells of line ``number`` (1-based) of a data file under SMT_DATA_DIR."""
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f, start=1):
            if i == number:
                return line.rstrip("\n").split(",")
    raise AssertionError(f"{path} has fewer than {number} lines")


def criteo_source(**extra) -> FileSource:
    """The Criteo sample, its model built from the file's own header."""
    path = need_data("criteo_sample", "criteo_sample.txt.gz")
    cols = header_of(path)
    sparse = [{"name": c, "vocab_size": 10_000, "embedding_dim": 16} for c in cols if c.startswith("C")]
    dense = [c for c in cols if c.startswith("I")]
    options = {"file": "criteo_sample/criteo_sample.txt.gz", "split": [0.8, 0.1, 0.1], **extra}
    return open_model("criteo", options, sparse, dense, ({"name": "click", "label": "label"},))


def avazu_source(**extra) -> FileSource:
    """The Avazu sample: label ``click``, every other column but ``id`` a hashed category."""
    path = need_data("avazu_sample", "avazu_sample.txt.gz")
    sparse = [
        {"name": c, "vocab_size": 10_000, "embedding_dim": 16} for c in header_of(path) if c not in ("id", "click")
    ]
    options = {"file": "avazu_sample/avazu_sample.txt.gz", "split": [0.8, 0.1, 0.1], "encode": "hash", **extra}
    return open_model("csv", options, sparse)


def test_criteo_sample_rows_and_transforms() -> None:
    src = criteo_source(split=[1.0, 0.0, 0.0])
    train = src.load("train")
    assert len(train) == 200 and int(train.labels.sum()) == 49
    assert len(src.load("valid")) == 0
    assert train.dense.shape == (200, 13) and train.ids.shape == (200, 26)
    cells = line_of(data_dir() / "criteo_sample" / "criteo_sample.txt.gz", 2)
    expect_dense = [0.0 if c == "" or float(c) < 0 else math.log1p(float(c)) for c in cells[1:14]]
    assert train.dense[0].tolist() == pytest.approx(expect_dense, rel=1e-6)
    assert train.ids[0].tolist() == [hashed(c, 10_000) for c in cells[14:]]
    assert train.ids[0, 18].item() == 0  # empty C19 -> reserved id 0
    assert train.dense[1, 1].item() == 0.0  # I2 = -1 -> 0
    assert (train.dense >= 0).all()


def test_criteo_fraction_split_is_deterministic_and_complete() -> None:
    a, b = criteo_source(), criteo_source(streaming=True, block_bytes=4096)  # b: many small record batches
    sizes = [a.num_examples(s) for s in ("train", "valid", "test")]
    assert sum(sizes) == 200 and sizes == [168, 16, 16]
    for split in ("train", "valid", "test"):
        assert_same_batches(a.batches(split, 50), b.batches(split, 50))
    everything = criteo_source(split=[1.0, 0.0, 0.0]).load("train")
    parts = torch.cat([a.load(s).labels for s in ("train", "valid", "test")])
    assert int(parts.sum()) == int(everything.labels.sum()) == 49


def test_criteo_raw_tsv_equals_csv(tmp_path: Path) -> None:
    src = need_data("criteo_sample", "criteo_sample.txt.gz")
    with gzip.open(src, "rt") as f:
        lines = f.read().splitlines()[1:41]
    raw = tmp_path / "day_0.gz"
    with gzip.open(raw, "wt") as f:
        f.write("".join(line.replace(",", "\t") + "\n" for line in lines))
    csv_file = tmp_path / "part.csv"
    csv_file.write_text(
        "label,"
        + ",".join([f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
        + "\n"
        + "".join(line + "\n" for line in lines)
    )
    sparse = [{"name": f"C{i}", "vocab_size": 1000} for i in range(1, 27)]
    dense = [f"I{i}" for i in range(1, 14)]
    tasks = ({"name": "click", "label": "label"},)
    a = open_model("criteo", {"train": str(raw)}, sparse, dense, tasks)
    b = open_model("criteo", {"train": str(csv_file)}, sparse, dense, tasks)
    assert_same_batches(a.batches("train", 16), b.batches("train", 16))
    assert len(a.load("train")) == 40


def test_avazu_sample() -> None:
    src = avazu_source()
    labels = torch.cat([src.load(s).labels for s in src.splits])
    assert len(labels) == 100 and int(labels.sum()) == 20
    assert [src.num_examples(s) for s in src.splits] == [83, 8, 9]
    b = next(src.batches("train", 8))
    assert len(b.sparse.keys()) == 22 and b.sparse.keys()[0] == "hour"
    assert b.dense.shape == (8, 0) and b.sparse.lengths().tolist() == [1] * (8 * 22)
    whole = avazu_source(split=[1.0, 0.0, 0.0])
    first = next(whole.batches("train", 1))
    path = data_dir() / "avazu_sample" / "avazu_sample.txt.gz"
    row = dict(zip(header_of(path), line_of(path, 2)))
    for col in ("hour", "site_id", "C20"):  # C20 holds -1: a category like any other
        assert first.sparse[col].values().item() == hashed(row[col], 10_000)


def test_taobao_sequence_is_jagged() -> None:
    path = need_data("taobao_ad_tiny", "train_sample.csv.gz")
    eco = load_ecosystem(EXAMPLES / "taobao_tiny.toml")
    src = open_source(eco.model("taobao_tiny"), eco)
    train = src.load("train")
    assert len(train) == 100 and int(train.labels.sum()) == 4
    assert train.ids.shape == (100, 15)
    seq = train.jagged["click_sequence"]
    with gzip.open(path, "rt") as f:
        rows = [line.rstrip("\n").split(",") for line in f][1:]
    lengths = [len([t for t in r[-1].split("^") if t]) for r in rows]
    assert seq.offsets.diff().tolist() == lengths and sum(lengths) == 40
    assert seq.values[:2].tolist() == [hashed("170301", 10_000), hashed("573514", 10_000)]
    assert train.dense[:2, 0].tolist() == pytest.approx([math.log1p(3.9), math.log1p(189.0)])
    b = next(src.batches("train", 4))
    assert b.sparse.keys()[-1] == "click_sequence"
    assert b.sparse["click_sequence"].lengths().tolist() == lengths[:4]
    assert b.sparse["userid"].lengths().tolist() == [1, 1, 1, 1]
    # empty pvalue_level cells -> id 0
    assert train.ids[0, 11].item() == 0
    stream = open_source(eco.model("taobao_tiny"), eco)
    stream.streaming = True
    assert_same_batches(stream.batches("train", 7), src.batches("train", 7))


def test_ali_ccp_two_tasks() -> None:
    need_data("ali_ccp_sample", "ali_ccp_train_sample.csv.gz")
    eco = load_ecosystem(EXAMPLES / "ali_ccp.toml")
    src = open_source(eco.model("ali_ccp"), eco)
    assert tuple(src.task_names) == ("click", "purchase")
    train = src.load("train")
    assert train.labels.shape == (100, 2) and train.labels.sum(0).tolist() == [7.0, 1.0]
    assert src.base_rates().tolist() == pytest.approx([0.07, 0.01])
    assert [src.num_examples(s) for s in ("valid", "test")] == [50, 50]
    assert src.load("valid").labels.sum(0).tolist() == [3.0, 1.0]
    assert train.ids[1, 9:14].tolist() == [1, 2, 2, 2, 1]  # already-encoded ids, kept (mod 1000)
    assert train.dense.shape == (100, 8) and train.dense[0, 4].item() == pytest.approx(0.07556)


def test_parquet_equals_csv(tmp_path: Path) -> None:
    path = need_data("ali_ccp_sample", "ali_ccp_train_sample.csv.gz")
    table = pacsv.read_csv(path)  # typed columns (int64 / double)
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=30)
    eco = load_ecosystem(EXAMPLES / "ali_ccp.toml")
    model = eco.model("ali_ccp")
    feats = [{"name": f.name, "vocab_size": f.vocab_size} for f in model.features.sparse]
    dense = [f.name for f in model.features.dense]
    tasks = ({"name": "click"}, {"name": "purchase"})
    for encode in ("mod", "hash"):
        a = open_model(
            "parquet",
            {"train": str(tmp_path / "train.parquet"), "encode": encode, "chunk_rows": 16},
            feats,
            dense,
            tasks,
        )
        b = open_model("csv", {"train": str(path), "encode": encode}, feats, dense, tasks)
        assert_same_batches(a.batches("train", 32), b.batches("train", 32))


def test_parquet_list_and_text_sequences(tmp_path: Path) -> None:
    table = pa.table(
        {
            "label": pa.array([1, 0, 1], pa.int64()),
            "hist": pa.array([[3, 5], [], None], pa.list_(pa.int64())),
            "tags": pa.array(["a^b^", "", "c"]),
            "x": pa.array([1.5, None, -2.0]),
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    src = open_model(
        "parquet",
        {"train": str(tmp_path / "d.parquet"), "features": {"hist": {"encode": "int"}, "x": {"transform": "log1p"}}},
        [{"name": "hist", "vocab_size": 10, "sequence": True}, {"name": "tags", "vocab_size": 50, "sequence": True}],
        ["x"],
        ({"name": "click", "label": "label"},),
    )
    b = next(src.batches("train", 3))
    assert b.sparse["hist"].lengths().tolist() == [2, 0, 0] and b.sparse["hist"].values().tolist() == [3, 5]
    assert b.sparse["tags"].lengths().tolist() == [2, 0, 1]
    assert b.sparse["tags"].values().tolist() == [hashed("a", 50), hashed("b", 50), hashed("c", 50)]
    assert b.dense[:, 0].tolist() == pytest.approx([math.log1p(1.5), 0.0, 0.0])
    assert b.labels[:, 0].tolist() == [1.0, 0.0, 1.0]


# -------------------------------------------------------------- malformed


FIELDS = [{"name": "a", "start": 0, "end": 9}, {"name": "b", "start": 10, "end": 19}]


def libfm(tmp_path: Path, text: str, name: str = "bad.libfm", **opts) -> FileSource:
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return open_model("libfm", {"train": str(path), "fields": FIELDS, **opts}, ["a", "b"])


GOOD = "1 1:1 12:1\n-1 2:1 13:1\n"


@pytest.mark.parametrize(
    "line, fault",
    [
        ("1 3:1 99999:1", "id 99999 is outside every declared field range"),
        ("x 3:1 14:1", "label 'x' is not a number"),
        ("2 3:1 14:1", "label '2' is not -1, 0 or 1"),
        ("1 3:1", "no id in field 'b'"),
        ("1 3:1 4:1 14:1", "2 ids in single-valued field 'a'"),
        ("1 3 14:1", "pair '3' is not id:value"),
        ("1 q:1 14:1", "id 'q' in pair 'q:1' is not an integer"),
    ],
)
def test_libfm_malformed_row_message(tmp_path: Path, line: str, fault: str) -> None:
    src = libfm(tmp_path, GOOD + line + "\n" + GOOD)
    with pytest.raises(DataFormatError) as exc:
        src.load("train")
    assert str(exc.value) == f"bad.libfm:3: {fault}"
    assert exc.value.line == 3 and exc.value.file == "bad.libfm"


def test_libfm_error_names_gz_file_and_line_across_chunks(tmp_path: Path) -> None:
    text = GOOD * 8 + "1 3:1 99999:1\n" + GOOD  # bad row on line 17
    src = libfm(tmp_path, text, name="frappe.test.libfm.gz", chunk_rows=5)
    with pytest.raises(
        DataFormatError, match=r"^frappe\.test\.libfm\.gz:17: id 99999 is outside every declared field range$"
    ):
        list(src.batches("train", 4))
    src.streaming = True
    with pytest.raises(DataFormatError, match=r"^frappe\.test\.libfm\.gz:17: "):
        list(src.batches("train", 4))


def test_libfm_first_fault_wins_within_a_chunk(tmp_path: Path) -> None:
    src = libfm(tmp_path, GOOD + "1 3:1\n" + "x 3:1 14:1\n")
    with pytest.raises(DataFormatError, match=r"^bad\.libfm:3: no id in field 'b'$"):
        src.load("train")


def test_libfm_skip_malformed_counts(tmp_path: Path, caplog) -> None:
    text = GOOD + "1 3:1 99999:1\n\n" + "x 3:1 14:1\n" + GOOD + "0 5:1 15:1\n"
    src = libfm(tmp_path, text, skip_malformed=True, chunk_rows=3)
    with caplog.at_level(logging.WARNING, logger="smt_host.data.readers"):
        train = src.load("train")
    assert len(train) == 5 and train.labels[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert train.ids.tolist() == [[1, 2], [2, 3], [1, 2], [2, 3], [5, 5]]
    assert src.skipped == {"bad.libfm": 2} and src.num_skipped == 2
    assert any("bad.libfm" in r.getMessage() and "skipped 2 malformed rows" in r.getMessage() for r in caplog.records)


def test_libfm_sequence_field(tmp_path: Path) -> None:
    path = tmp_path / "multi.libfm"
    path.write_text("1 1:1 11:1 15:1\n0 2:1\n1 3:1 19:1\n")
    src = open_model(
        "libfm", {"train": str(path), "fields": FIELDS}, ["a", {"name": "b", "vocab_size": 10, "sequence": True}]
    )
    b = next(src.batches("train", 3))
    assert b.sparse["a"].values().tolist() == [1, 2, 3]
    assert b.sparse["b"].lengths().tolist() == [2, 0, 1] and b.sparse["b"].values().tolist() == [1, 5, 9]


def csv_source(tmp_path: Path, text: str, **opts) -> FileSource:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return open_model(
        "csv",
        {"train": str(path), **opts},
        ["a", {"name": "n", "vocab_size": 5}],
        ["x"],
        ({"name": "click", "label": "label"},),
    )


HEADER = "label,a,n,x\n"
ROWS = "1,foo,1,2.5\n0,,2,\n"


@pytest.mark.parametrize(
    "line, fault",
    [
        ("1,foo,1", "expected 4 fields, got 3"),
        ("1,foo,1,2,3", "expected 4 fields, got 5"),
        ("yes,foo,1,2", "label 'yes' in column 'label' is not a number"),
        ("3,foo,1,2", "label '3' in column 'label' is not -1, 0 or 1"),
        (",foo,1,2", "empty label in column 'label'"),
        ("1,foo,1,abc", "column 'x': 'abc' is not a number"),
        ("1,foo,7,1", "column 'n': id 7 is outside [0, 5)"),
        ("1,foo,1.5,1", "column 'n': '1.5' is not an integer id"),
    ],
)
def test_csv_malformed_row_message(tmp_path: Path, line: str, fault: str) -> None:
    src = csv_source(tmp_path, HEADER + ROWS + line + "\n" + ROWS, features={"n": {"encode": "int"}})
    with pytest.raises(DataFormatError) as exc:
        src.load("train")
    assert str(exc.value) == f"bad.csv:4: {fault}"


def test_csv_missing_column(tmp_path: Path) -> None:
    src = csv_source(tmp_path, "label,a,x\n1,foo,2\n")
    with pytest.raises(DataFormatError) as exc:
        src.load("train")
    assert str(exc.value) == "bad.csv:1: missing column 'n'; the file has 3 columns: label, a, x"


def test_csv_skip_malformed_and_line_numbers(tmp_path: Path, caplog) -> None:
    text = HEADER + ROWS + "1,foo\n" + "\n" + "z,foo,1,1\n" + ROWS + "1,a,b,c,d\n" + ROWS
    src = csv_source(tmp_path, text, skip_malformed=True)
    with caplog.at_level(logging.WARNING, logger="smt_host.data.readers"):
        train = src.load("train")
    assert len(train) == 6 and src.skipped == {"bad.csv": 3}
    assert train.labels[:, 0].tolist() == [1.0, 0.0] * 3
    assert train.ids[:2].tolist() == [[hashed("foo", 100), 1], [0, 2]]
    assert train.dense[:, 0].tolist() == pytest.approx([2.5, 0.0] * 3)
    assert any("bad.csv" in r.getMessage() and "skipped 3 malformed rows" in r.getMessage() for r in caplog.records)
    # each kept row knows its physical line (header = line 1)
    faults = RowFaults(tmp_path / "bad.csv", skip=True)
    lines = np.concatenate([c.lines for c in src.fmt.read(tmp_path / "bad.csv", faults)])
    assert lines.tolist() == [2, 3, 7, 8, 10, 11] and faults.count == 3
    # without skipping, a fault after a short row still names its own line
    (tmp_path / "bad.csv").write_text(HEADER + ROWS + "\n" + ROWS + "z,foo,1,1\n")
    with pytest.raises(DataFormatError, match=r"^bad\.csv:7: label 'z'"):
        csv_source(tmp_path, HEADER + ROWS + "\n" + ROWS + "z,foo,1,1\n").load("train")


# ---------------------------------------------------------------- options


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "ok.libfm"
    path.write_text(GOOD)
    with pytest.raises(
        ConfigError,
        match=r"^unknown key 'trian' \(did you mean 'train'\?\); valid keys: train, valid, .* @ \$\.models\.m\.data\.options$",
    ):
        open_model("libfm", {"trian": str(path), "fields": FIELDS}, ["a", "b"])
    with pytest.raises(
        ConfigError, match=r"data file not found: .*nope\.libfm .*@ \$\.models\.m\.data\.options\.train$"
    ):
        open_model("libfm", {"train": str(tmp_path / "nope.libfm"), "fields": FIELDS}, ["a", "b"])
    with pytest.raises(
        ConfigError, match=r"^sparse feature 'c' has no field; fields are a, b @ \$\.models\.m\.data\.options\.fields$"
    ):
        open_model("libfm", {"train": str(path), "fields": FIELDS}, ["a", "c"])
    with pytest.raises(ConfigError, match=r"field 'a' spans 10 ids but the feature's vocab_size is 5"):
        open_model("libfm", {"train": str(path), "fields": FIELDS}, [{"name": "a", "vocab_size": 5}, "b"])
    with pytest.raises(
        ConfigError, match=r"fractions summing to 1 .*got \[0\.5, 0\.1\] @ \$\.models\.m\.data\.options\.split$"
    ):
        open_model("csv", {"file": str(path), "split": [0.5, 0.1]}, ["a"])
    with pytest.raises(
        ConfigError, match=r"^must be one of 'hash', 'mod', 'int', got 'onehot' @ \$\.models\.m\.data\.options\.encode$"
    ):
        open_model("csv", {"train": str(path), "encode": "onehot"}, ["a"])


def errors_of(source: str, options: dict, sparse=("a", "b")) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        open_model(source, options, list(sparse))
    return exc.value.errors


def test_options_are_structured_with_paths(tmp_path: Path) -> None:
    path = str(tmp_path / "ok.libfm")
    Path(path).write_text(GOOD)
    opts = "$.models.m.data.options"
    assert errors_of("libfm", {"train": path}) == [f"required field missing @ {opts}.fields"]
    assert errors_of(
        "libfm",
        {
            "train": path,
            "fields": [
                {"name": "a", "start": -1, "end": 9},
                {"name": "b", "start": 10},
                {"name": "c", "start": 3, "end": 1},
                {"name": "d", "start": 0, "end": 1, "x": 1},
                "e",
            ],
        },
    ) == [
        f"must be >= 0, got -1 @ {opts}.fields[0].start",
        f"give one of 'end' (inclusive) or 'size' @ {opts}.fields[1].end",
        f"must be >= start (3), got 1 @ {opts}.fields[2].end",
        f"unknown key 'x'; valid keys: name, start, end, size @ {opts}.fields[3]",
        f"expected a table with keys name, start, end, size, got 'e' @ {opts}.fields[4]",
    ]
    assert errors_of(
        "libfm",
        {"train": path, "fields": [{"name": "a", "start": 0, "size": 10}, {"name": "b", "start": 9, "end": 19}]},
    ) == [f"field ranges overlap: 'a' 0-9 and 'b' 9-19 @ {opts}.fields"]
    assert errors_of("libfm", {"train": [path, 3], "fields": FIELDS}) == [
        f"expected a file path or a list of them, got [{path!r}, 3] @ {opts}.train"
    ]
    assert errors_of("libfm", {"train": path, "fields": FIELDS, "streaming": "yes"}) == [
        f"must be true, false or \"auto\", got 'yes' @ {opts}.streaming"
    ]
    assert errors_of("libfm", {"train": path, "fields": FIELDS, "chunk_rows": 0}) == [
        f"must be >= 1, got 0 @ {opts}.chunk_rows"
    ]
    assert errors_of("libfm", {"fields": FIELDS}) == [
        f"required field missing (give 'train', or 'file' with 'split') @ {opts}.train"
    ]
    assert errors_of("libfm", {"train": path, "split": [1, 0], "fields": FIELDS}) == [
        f"'split' needs 'file' (one file split by fraction) @ {opts}.split"
    ]
    assert errors_of("libfm", {"file": path, "train": path, "fields": FIELDS}) == [
        f"give either 'file' with 'split' or 'train', not both @ {opts}.file"
    ]
    assert errors_of("parquet", {"train": path, "delimiter": ";"}, ["a"]) == [
        "unknown key 'delimiter'; valid keys: train, valid, test, file, split, split_seed, schema, streaming, "
        "stream_above_mb, shuffle_buffer, skip_malformed, chunk_rows, encode, transform, separator, order, features, "
        f"labels @ {opts}"
    ]
    assert errors_of("csv", {"train": path, "features": {"a": {"encode": "x"}, "b": "s", "c": {"col": "a"}}}) == [
        f"must be one of 'hash', 'mod', 'int', got 'x' @ {opts}.features.a.encode",
        f"expected a table with keys column, encode, separator, transform, order, got 's' @ {opts}.features.b",
        "unknown key 'col' (did you mean 'column'?); valid keys: column, encode, separator, transform, order "
        f"@ {opts}.features.c",
    ]
    assert errors_of("csv", {"train": path, "features": {"zz": {}}}) == [
        f"no feature named 'zz' in the model @ {opts}.features.zz"
    ]
    assert errors_of("csv", {"train": path, "labels": {"buy": "y"}}) == [
        f"no task named 'buy' in the model @ {opts}.labels.buy"
    ]
    assert errors_of("criteo", {"train": path, "column_names": "label"}) == [
        f"expected a list, got the string 'label' @ {opts}.column_names"
    ]
    assert errors_of("csv", {"train": path, "delimiter": ";;"}) == [
        f"must be one character, got ';;' @ {opts}.delimiter"
    ]


def test_option_defaults_per_source(tmp_path: Path) -> None:
    from smt_host.data.readers import CriteoOptions, CsvOptions, parse_options

    path = tmp_path / "d.csv"
    path.write_text(HEADER + ROWS)
    model, eco = make_model("criteo", {"train": str(path)}, ["a"])
    o = parse_options(model, eco, "criteo")
    assert isinstance(o, CriteoOptions) and o.train == (str(path),) and o.streaming == "auto"
    assert (o.transform, o.delimiter, o.header, o.encode) == ("log1p", None, None, "hash")
    assert o.column_names[:2] == ("label", "I1") and len(o.column_names) == 40
    o = parse_options(model, eco, "csv")
    assert type(o) is CsvOptions and (o.transform, o.delimiter, o.header, o.column_names) == ("none", ",", True, None)
    src = open_model(
        "csv",
        {"file": str(path), "split": [0.5, 0.5], "features": {"x": {"transform": "log1p"}}},
        ["a", {"name": "n", "vocab_size": 5}],
        ["x"],
        ({"name": "click", "label": "label"},),
    )
    assert src.fractions == (0.5, 0.5, 0.0) and src.files == {"file": (path,)}
    assert src.fmt.dense[0].transform == "log1p" and src.fmt.sparse[0].encode == "hash"


def test_schema_file(tmp_path: Path) -> None:
    (tmp_path / "schema.toml").write_text(
        'fields = [{ name = "a", start = 0, size = 10 }, { name = "b", start = 10, end = 19 }]\n'
    )
    (tmp_path / "d.libfm").write_text(GOOD)
    src = open_model("libfm", {"train": str(tmp_path / "d.libfm"), "schema": str(tmp_path / "schema.toml")}, ["a", "b"])
    assert src.load("train").ids.tolist() == [[1, 2], [2, 3]]


# --------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "path",
    [
        # base_rates() reads Frappe's full train file
        pytest.param(p, marks=[pytest.mark.data] if p.stem == "frappe" else [])
        for p in sorted(EXAMPLES.glob("*.toml"))
    ],
    ids=lambda p: p.stem,
)
def test_example_spec_loads_and_yields_a_batch(path: Path) -> None:
    eco = load_ecosystem(path)
    (model,) = eco.models.values()
    if not data_dir().exists():
        pytest.skip(f"real data not found at {data_dir()} (set SMT_DATA_DIR)")
    src = open_source(model, eco)
    b = next(src.batches("valid", 16))
    assert b.sparse.keys() == [f.name for f in model.features.sparse] + [f.name for f in model.features.sequence]
    assert b.labels.shape == (len(b), len(model.tasks)) and 0 < len(b) <= 16
    assert b.dense.shape == (len(b), len(model.features.dense))
    for f in model.features.sparse:
        v = b.sparse[f.name].values()
        assert v.numel() == 0 or (0 <= int(v.min()) and int(v.max()) < f.vocab_size)
    for h in model.features.sequence:
        v, n = b.sparse[h.name].values(), b.sparse[h.name].lengths()
        assert n.numel() == 0 or int(n.max()) <= h.max_length
        assert v.numel() == 0 or (0 <= int(v.min()) and int(v.max()) < model.candidate_of(h).vocab_size)
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
    assert src.base_rates().shape == (len(model.tasks),)


def test_example_set_is_complete() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.toml")} == {"frappe", "taobao_tiny", "taobao_sequence", "ali_ccp"}
    eco = load_ecosystem(EXAMPLES)
    assert eco.model("frappe").training.batch_size == 4096 and eco.model("frappe").embedding_dim == 10
    assert eco.model("ali_ccp").task_names == ("click", "purchase")
    assert [f.name for f in eco.model("taobao_tiny").features.sparse if f.sequence] == ["click_sequence"]
    assert [(f.name, f.candidate) for f in eco.model("taobao_sequence").features.sequence] == [
        ("click_sequence", "adgroup_id")
    ]


def test_csv_line_numbers_across_record_batches(tmp_path: Path) -> None:
    body = ROWS * 200 + "1,foo\n" + ROWS * 100 + "1,foo,1,zz\n" + ROWS
    src = csv_source(tmp_path, HEADER + body, block_bytes=1024)
    with pytest.raises(DataFormatError, match=r"^bad\.csv:402: expected 4 fields, got 2$"):
        src.load("train")
    src = csv_source(tmp_path, HEADER + body, block_bytes=1024, skip_malformed=True)
    assert len(src.load("train")) == 602 and src.skipped == {"bad.csv": 2}
    src = csv_source(tmp_path, HEADER + body.replace("1,foo\n", ""), block_bytes=1024)
    with pytest.raises(DataFormatError, match=r"^bad\.csv:602: column 'x': 'zz' is not a number$"):
        src.load("train")
