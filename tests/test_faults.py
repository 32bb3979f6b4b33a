"""Classes of fault from the reliability suite ("Nothing lost, nothing run").

* bad data is one ``error: <file>:<line>: <fault>`` line and exit 2, never a
  traceback, at training time too (real ``smt train`` subprocesses on tiny
  crafted libFM / CSV / Parquet files), and the same class in process;
* ``--shard`` values out of range are one error naming the key and what it allows;
* the worker processes of ``smt ecosystem run --jobs N`` die with their parent,
  even when it is killed with SIGKILL;
* every file the ecosystem loop writes is written atomically (a failed write
  keeps the previous file, leaves no temporary file), and adoption.json is
  strict JSON.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import attrs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smt_host.data import open_source
from smt_host.data.files import Utf8CheckedStream
from smt_host.errors import ConfigError, DataFormatError
from smt_host.spec.loading import ecosystem_from_dict

ROOT = Path(__file__).resolve().parents[1]


def smt(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    env.pop("SMT_DISABLE_PLUGINS", None)
    env.pop("SMT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------ tiny data files

FIELDS = [{"name": "a", "start": 0, "end": 9}, {"name": "b", "start": 10, "end": 19}]


def libfm_text(rows: int = 120, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(f"{rng.choice(['1', '-1'])} {rng.randint(0, 9)}:1 {rng.randint(10, 19)}:1\n" for _ in range(rows))


CSV_HEADER = "label,a,x\n"


def csv_text(rows: int = 120, seed: int = 0) -> str:
    rng = random.Random(seed)
    return CSV_HEADER + "".join(
        f"{rng.choice('01')},{rng.choice(['foo', 'bar', 'baz'])},{rng.random():.3f}\n" for _ in range(rows)
    )


def write_parquet(path: Path, rows: int = 120) -> Path:
    rng = random.Random(0)
    table = pa.table(
        {
            "label": [rng.choice([0, 1]) for _ in range(rows)],
            "a": [rng.choice(["foo", "bar"]) for _ in range(rows)],
            "x": [rng.random() for _ in range(rows)],
        }
    )
    pq.write_table(table, path)
    return path


def gz_truncated(path: Path, text: str) -> Path:
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def options_of(source: str, train: Path, good: Path, **extra) -> dict:
    opts = {"train": str(train), "valid": str(good), "test": str(good), **extra}
    if source == "libfm":
        opts["fields"] = FIELDS
    return opts


def model_dict(source: str, options: dict) -> dict:
    if source == "libfm":
        features = {"sparse": [{"name": "a", "vocab_size": 10}, {"name": "b", "vocab_size": 10}], "dense": []}
        tasks = [{"name": "click"}]
    else:
        features = {"sparse": [{"name": "a", "vocab_size": 50}], "dense": [{"name": "x"}]}
        tasks = [{"name": "click", "label": "label"}]
    for s in features["sparse"]:
        s["embedding_dim"] = 4
    return {
        "name": "m",
        "tasks": tasks,
        "features": features,
        "arch": {"over_arch": [8], "task_width": 4},
        "training": {"epochs": 1, "batch_size": 64},
        "data": {"source": source, "options": options},
    }


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_spec(path: Path, model: dict, table: str = "model") -> Path:
    """A one-model spec file (``[model]`` tables) of ``model``; ``table =
    "models.m"`` writes an ecosystem file instead."""
    out = [f"[{table}]"] + [
        f"{k} = {toml_value(model[k])}" for k in ("name", "tasks") if table == "model" or k != "name"
    ]
    for sub in ("features", "arch", "training", "data"):
        items = {k: v for k, v in model[sub].items() if k != "options"}
        out += ["", f"[{table}.{sub}]"] + [f"{k} = {toml_value(v)}" for k, v in items.items()]
    out += ["", f"[{table}.data.options]"] + [f"{k} = {toml_value(v)}" for k, v in model["data"]["options"].items()]
    path.write_text(("" if table == "model" else 'name = "eco"\n') + "\n".join(out) + "\n")
    return path


def good_file(tmp: Path, source: str) -> Path:
    if source == "libfm":
        path = tmp / "good.libfm"
        path.write_text(libfm_text(seed=1))
    elif source == "csv":
        path = tmp / "good.csv"
        path.write_text(csv_text(seed=1))
    else:
        path = write_parquet(tmp / "good.parquet")
    return path


# Each case writes a bad train file: (source, file name, how to write it, extra options).
# ``expect``: the text after "error: " on stderr's last line (a regex).
NOT_UTF8 = b"1 3:1 14:1 caf\xe9\n"  # Latin-1 "é": not UTF-8


def _bad_label(p: Path) -> None:
    p.write_text(libfm_text() + "x 1:1 12:1\n")


def _id_out_of_field(p: Path) -> None:
    p.write_text(libfm_text() + "1 1:1 25:1\n")


def _csv_short_row(p: Path) -> None:
    p.write_text(csv_text() + "1,foo\n")


def _libfm_not_utf8(p: Path) -> None:
    p.write_bytes(libfm_text(60).encode() + NOT_UTF8 + libfm_text(60, seed=2).encode())


def _csv_not_utf8(p: Path) -> None:
    p.write_bytes(csv_text(60).encode() + b"1,caf\xe9,0.5\n" + csv_text(60, seed=2)[len(CSV_HEADER) :].encode())


def _libfm_gz_truncated(p: Path) -> None:
    gz_truncated(p, libfm_text(4000))


def _csv_gz_truncated(p: Path) -> None:
    gz_truncated(p, csv_text(4000))


def _parquet_truncated(p: Path) -> None:
    write_parquet(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _folder(p: Path) -> None:
    p.mkdir()


def _unreadable(p: Path) -> None:
    p.write_text(libfm_text())
    p.chmod(0)


DATA_CASES = {
    "libfm-bad-label": ("libfm", "bad.libfm", _bad_label, {}, r"bad\.libfm:121: label 'x' is not a number"),
    "libfm-id-outside-field": (
        "libfm",
        "bad.libfm",
        _id_out_of_field,
        {},
        r"bad\.libfm:121: id 25 is outside every declared field range",
    ),
    "csv-missing-column": ("csv", "bad.csv", _csv_short_row, {}, r"bad\.csv:122: expected 3 fields, got 2"),
    "libfm-not-utf8": (
        "libfm",
        "bad.libfm",
        _libfm_not_utf8,
        {},
        r"bad\.libfm:61: invalid UTF-8 \(byte e9 at column 15\)",
    ),
    "csv-not-utf8": ("csv", "bad.csv", _csv_not_utf8, {}, r"bad\.csv:62: invalid UTF-8 \(byte e9 at column 6\)"),
    "libfm-gz-truncated": (
        "libfm",
        "bad.libfm.gz",
        _libfm_gz_truncated,
        {},
        r"bad\.libfm\.gz:\d+: truncated or corrupt gzip data \(.+\)",
    ),
    "csv-gz-truncated": (
        "csv",
        "bad.csv.gz",
        _csv_gz_truncated,
        {},
        r"bad\.csv\.gz:\d+: truncated or corrupt gzip data \(.+\)",
    ),
    "parquet-truncated": (
        "parquet",
        "bad.parquet",
        _parquet_truncated,
        {},
        r"bad\.parquet:0: not a readable Parquet file \(.+\)",
    ),
    "libfm-empty": ("libfm", "bad.libfm", _empty, {}, r"bad\.libfm:0: no rows: the file is empty"),
    "csv-empty": ("csv", "bad.csv", _empty, {}, r"bad\.csv:0: the file is empty"),
    "folder": (
        "libfm",
        "bad.libfm",
        _folder,
        {},
        r".*/spec\.toml: the folder .*bad\.libfm holds no data files \(names starting with \. or _ are skipped\) "
        r"@ \$\.models\.m\.data\.options\.train",
    ),
    "unreadable": (
        "libfm",
        "bad.libfm",
        _unreadable,
        {},
        r".*/spec\.toml: data file cannot be read \(permission denied\): .*bad\.libfm @ \$\.models\.m\.data\.options\.train",
    ),
}


def make_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    source, name, write, extra, expect = DATA_CASES[case]
    bad = tmp_path / name
    write(bad)
    spec = write_spec(
        tmp_path / "spec.toml", model_dict(source, options_of(source, bad, good_file(tmp_path, source), **extra))
    )
    return spec, expect


def assert_one_error_line(out: subprocess.CompletedProcess, expect: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "Aborted" not in out.stderr, out.stderr
    line = last_line(out.stderr)
    assert line.startswith("error: "), out.stderr
    assert re.fullmatch(expect, line[len("error: ") :]), line


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_error_line_at_training_time(tmp_path: Path, case: str) -> None:
    if case == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file (see test_unreadable_file_in_process)")
    spec, expect = make_case(tmp_path, case)
    out = smt("train", str(spec), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_error_line(out, expect)


def test_unknown_data_source_is_a_config_error(tmp_path: Path) -> None:
    model = model_dict("libfm", options_of("libfm", good_file(tmp_path, "libfm"), good_file(tmp_path, "libfm")))
    model["data"]["source"] = "libfmm"
    spec = write_spec(tmp_path / "spec.toml", model)
    out = smt("train", str(spec), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_error_line(
        out,
        r".*/spec\.toml: unknown data source 'libfmm' \(did you mean 'libfm'\?\); known: .* @ \$\.models\.m\.data\.source",
    )


def test_bad_data_in_a_worker_process_is_bad_input_too(tmp_path: Path) -> None:
    """``smt ecosystem run --jobs 2``: the cell fails in a worker; the error
    names the file and line and exits 2, as it does in one process."""
    bad = tmp_path / "bad.libfm"
    _bad_label(bad)
    model = model_dict("libfm", options_of("libfm", bad, good_file(tmp_path, "libfm")))
    eco = write_spec(tmp_path / "eco.toml", model, table="models.m")
    out = smt("ecosystem", "run", str(eco), "--jobs", "2", "--seeds", "1", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_error_line(
        out, r"cells failed: m/baseline/seed0: DataFormatError: bad\.libfm:121: label 'x' is not a number"
    )


@pytest.mark.parametrize("source", ["libfm", "csv"])
def test_skip_malformed_skips_bad_utf8_rows_and_trains(tmp_path: Path, source: str) -> None:
    name = "bad.libfm" if source == "libfm" else "bad.csv"
    bad = tmp_path / name
    (_libfm_not_utf8 if source == "libfm" else _csv_not_utf8)(bad)
    opts = options_of(source, bad, good_file(tmp_path, source), skip_malformed=True)
    spec = write_spec(tmp_path / "spec.toml", model_dict(source, opts))
    out = smt("train", str(spec), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{name}: skipped 1 malformed rows" in out.stderr
    assert (tmp_path / "runs" / "m" / "m" / "metrics.json").exists()


# ------------------------------------------------------------- in process


def source_of(tmp_path: Path, source: str, train: Path, **extra):
    eco = ecosystem_from_dict(
        {"model": model_dict(source, options_of(source, train, good_file(tmp_path, source), **extra))}
    )
    return open_source(eco.model("m"), eco)


def _libfm_not_gzip(p: Path) -> None:
    p.write_text(libfm_text())


def _csv_gz_garbage(p: Path) -> None:
    data = bytearray(gzip.compress(csv_text(2000).encode()))
    data[len(data) // 2 : len(data) // 2 + 40] = b"\0" * 40
    p.write_bytes(bytes(data))


def _parquet_garbage(p: Path) -> None:
    p.write_bytes(b"PAR1 this is not parquet at all")


def _parquet_no_rows(p: Path) -> None:
    pq.write_table(
        pa.table({"label": pa.array([], pa.int64()), "a": pa.array([], pa.string()), "x": pa.array([], pa.float64())}),
        p,
    )


def _csv_header_only(p: Path) -> None:
    p.write_text(CSV_HEADER)


def _libfm_blank(p: Path) -> None:
    p.write_text("\n\n  \n")


def _csv_header_not_utf8(p: Path) -> None:
    p.write_bytes(b"label,a,x\xff\n1,foo,1\n")


def _libfm_gzip_named_plain(p: Path) -> None:
    p.write_bytes(gzip.compress(libfm_text().encode()))


IN_PROCESS = {
    **{k: v for k, v in DATA_CASES.items() if k not in ("folder", "unreadable")},
    "libfm-not-gzip": (
        "libfm",
        "bad.libfm.gz",
        _libfm_not_gzip,
        {},
        r"bad\.libfm\.gz:0: truncated or corrupt gzip data \(Not a gzipped file .*\)",
    ),
    "csv-gz-corrupt": (
        "csv",
        "bad.csv.gz",
        _csv_gz_garbage,
        {},
        r"bad\.csv\.gz:\d+: truncated or corrupt gzip data \(.+\)",
    ),
    "parquet-garbage": (
        "parquet",
        "bad.parquet",
        _parquet_garbage,
        {},
        r"bad\.parquet:0: not a readable Parquet file \(.+\)",
    ),
    "parquet-empty": ("parquet", "bad.parquet", _empty, {}, r"bad\.parquet:0: the file is empty"),
    "parquet-no-rows": (
        "parquet",
        "bad.parquet",
        _parquet_no_rows,
        {},
        r"bad\.parquet:0: no rows: the file holds no data rows",
    ),
    "csv-header-only": ("csv", "bad.csv", _csv_header_only, {}, r"bad\.csv:0: no rows: the file holds no data rows"),
    "libfm-blank-lines": (
        "libfm",
        "bad.libfm",
        _libfm_blank,
        {},
        r"bad\.libfm:0: no rows: the file holds no data rows",
    ),
    "csv-header-not-utf8": (
        "csv",
        "bad.csv",
        _csv_header_not_utf8,
        {},
        r"bad\.csv:1: invalid UTF-8 \(byte ff at column 10\)",
    ),
    "libfm-gzip-without-gz-name": (
        "libfm",
        "bad.libfm",
        _libfm_gzip_named_plain,
        {},
        r"bad\.libfm:1: invalid UTF-8 \(.*\); this looks like gzip data: name the file \*\.gz",
    ),
    "libfm-all-rows-malformed": (
        "libfm",
        "bad.libfm",
        lambda p: p.write_text("x 1:1 11:1\n2 1:1 11:1\n"),
        {"skip_malformed": True},
        r"bad\.libfm:0: no rows left: all 2 rows are malformed \(skipped with skip_malformed\)",
    ),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_bad_data_is_a_data_format_error_in_process(tmp_path: Path, case: str, streaming: bool) -> None:
    source, name, write, extra, expect = IN_PROCESS[case]
    bad = tmp_path / name
    write(bad)
    src = source_of(tmp_path, source, bad, streaming=streaming, **extra)
    with pytest.raises(DataFormatError) as exc:
        for _ in src.batches("train", 32):
            pass
    assert re.fullmatch(expect, str(exc.value)), str(exc.value)
    assert exc.value.file == name


def test_unreadable_file_in_process(tmp_path: Path, monkeypatch) -> None:
    """chmod 000 does not stop root: the two places are checked by pretending."""
    good = good_file(tmp_path, "libfm")
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != good)
    with pytest.raises(
        ConfigError,
        match=r"data file cannot be read \(permission denied\): .*good\.libfm @ \$\.models\.m\.data\.options\.train",
    ):
        source_of(tmp_path, "libfm", good)
    monkeypatch.undo()

    # it became unreadable after the check: the reader names it
    src = source_of(tmp_path, "libfm", good)

    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("smt_host.data.libfm.open_binary", denied)
    with pytest.raises(DataFormatError, match=r"^good\.libfm:0: cannot read the file: permission denied$"):
        src.load("train")


def test_skip_malformed_counts_bad_utf8_and_keeps_the_rest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    rows = csv_text(5)
    bad.write_bytes(rows.encode() + b"1,\xc3(,0.5\n" + b"1,x,0.5,\xff\n" + b"0,ok,0.25\n")
    src = source_of(tmp_path, "csv", bad, skip_malformed=True)
    train = src.load("train")
    assert len(train) == 6 and src.skipped == {"bad.csv": 2}
    assert train.dense[-1, 0].item() == pytest.approx(0.25)
    with pytest.raises(DataFormatError, match=r"^bad\.csv:7: invalid UTF-8 \(byte c3 at column 3\)$"):
        source_of(tmp_path, "csv", bad).load("train")

    # no header: a first row that is not UTF-8 is a row like any other
    bare = tmp_path / "bare.csv"
    bare.write_bytes(b"1,\xff,0.5\n" + csv_text(3)[len(CSV_HEADER) :].encode())
    names = {"header": False, "column_names": ["label", "a", "x"]}
    src = source_of(tmp_path, "csv", bare, skip_malformed=True, **names)
    assert len(src.load("train")) == 3 and src.skipped == {"bare.csv": 1}
    with pytest.raises(DataFormatError, match=r"^bare\.csv:1: invalid UTF-8 \(byte ff at column 3\)$"):
        source_of(tmp_path, "csv", bare, **names).load("train")

    lib = tmp_path / "bad.libfm"
    lib.write_bytes(b"1 1:1 11:1\n" + NOT_UTF8 + b"\xff\n" + b"0 2:1 12:1\n")
    src = source_of(tmp_path, "libfm", lib, skip_malformed=True, chunk_rows=2)
    train = src.load("train")
    assert train.labels[:, 0].tolist() == [1.0, 0.0] and src.skipped == {"bad.libfm": 2}


def test_utf8_checked_stream_keeps_characters_split_across_blocks() -> None:
    text = "é,ü\nöké\n" * 50 + "end"
    stream = Utf8CheckedStream(io.BytesIO(text.encode()), "x.csv", block_bytes=3)
    assert stream.read() == text.encode() and stream.bad == {} and stream.lines == 100
    raw = b"ok\n" + b"bad \xff here\n" + b"\xe9t\xe9\n" + b"last"
    stream = Utf8CheckedStream(io.BytesIO(raw), "x.csv", block_bytes=4)
    out = stream.read()
    assert out.decode() == "ok\nbad \ufffd here\n\ufffdt\ufffd\nlast"
    assert stream.bad == {2: "invalid UTF-8 (byte ff at column 5)", 3: "invalid UTF-8 (byte e9 at column 1)"}


# ------------------------------------------------------------------ --shard


@pytest.mark.parametrize(
    "value, key, allowed",
    [
        ("world_size=0", "world_size", "an integer >= 1"),
        ("world_size=nan", "world_size", "an integer >= 1"),
        ("world_size=-1", "world_size", "an integer >= 1"),
        ("batch_size=0", "batch_size", "an integer >= 1"),
        ("local_world_size=0", "local_world_size", "an integer >= 1 that divides world_size"),
        ("world_size=8,local_world_size=3", "local_world_size", "an integer >= 1 that divides world_size (8)"),
        ("hbm_gb=nan", "hbm_gb", "a finite number > 0"),
        ("ddr_gb=-5", "ddr_gb", "a finite number > 0"),
        ("ranks=4", "ranks", "KEY one of world_size, device, hbm_gb, ddr_gb, batch_size, local_world_size"),
        ("world_size=eight", "world_size", "an integer >= 1"),
        ("device=tpu", "device", "cpu or cuda"),
    ],
)
def test_shard_values_out_of_range(tmp_path: Path, value: str, key: str, allowed: str) -> None:
    from smt_host.distributed.shard import parse_shard

    with pytest.raises(ConfigError) as exc:
        parse_shard(value)
    assert str(exc.value).endswith(f"@ --shard {key}") and allowed in str(exc.value)
    out = smt("plan", "feed_ctr", "--shard", value, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = last_line(out.stderr)
    # click's usage error today ("Error: ..."), the host's one handler once plan.py lets ConfigError through
    assert line.lower().startswith("error: ") and line.endswith(f"@ --shard {key}") and allowed in line, out.stderr


def test_shard_good_values_parse() -> None:
    from smt_host.distributed.shard import parse_shard

    assert parse_shard("world_size=8, local_world_size=4,hbm_gb=80,ddr_gb=1.5,batch_size=512,device=cpu") == {
        "world_size": 8,
        "device": "cpu",
        "local_world_size": 4,
        "hbm_gb": 80.0,
        "ddr_gb": 1.5,
        "batch_size": 512,
    }
    with pytest.raises(ConfigError, match=r"^2 errors:\n  world_size is given twice @ --shard world_size\n  hbm_gb"):
        parse_shard("world_size=2,world_size=4,hbm_gb=inf")


# ------------------------------------------------- workers die with their parent


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not us counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


ECO = """
name = "kill"
[synthetic]
train_examples = 400000
valid_examples = 1000
test_examples = 1000

[models.tiny]
surface = "feed"
tasks = [{ name = "click" }]
arch = { over_arch = [16], task_width = 8 }
training = { epochs = 20, batch_size = 64 }
[models.tiny.features]
sparse = [{ name = "user_id", vocab_size = 20000, embedding_dim = 4 }, { name = "ad_id", vocab_size = 4000, embedding_dim = 4 }]
dense = []
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_ecosystem_workers_die_when_the_main_process_is_killed(tmp_path: Path) -> None:
    (tmp_path / "eco.toml").write_text(ECO)
    out = tmp_path / "out"
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    main = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smt_host",
            "ecosystem",
            "run",
            "eco.toml",
            "--jobs",
            "2",
            "--seeds",
            "2",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        runs = [out / "runs" / "tiny" / "baseline" / f"seed{s}" for s in (0, 1)]
        while time.monotonic() < deadline and main.poll() is None:
            workers = [c for c in _children(main.pid) if "spawn_main" in _cmdline(c)]
            if len(workers) == 2 and all(r.exists() for r in runs):  # both are training a cell
                break
            time.sleep(0.2)
        assert main.poll() is None, main.stderr.read().decode()
        assert len(workers) == 2 and all(r.exists() for r in runs), (workers, main.pid)
        time.sleep(1.0)
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        left = _wait_gone(workers, 10)
        assert not left, f"workers still running after their parent was killed: {[_cmdline(p) for p in left]}"
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_watchdog_alone_ends_an_orphan(tmp_path: Path) -> None:
    """The portable fallback: without PR_SET_PDEATHSIG, the watchdog thread
    ends the worker once its parent is gone."""
    child = textwrap.dedent(
        """
        import os, sys, time
        from smt_host import lifeline
        lifeline._set_pdeathsig = lambda *a: False
        lifeline.die_with_parent(os.getppid(), interval=0.1)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {child!r}])
        print(p.pid, flush=True)
        time.sleep(60)
        """
    )
    mid = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pid = int(mid.stdout.readline())
        assert mid.stdout.readline().strip() == "ready"
        mid.kill()
        mid.wait()
        assert not _wait_gone([pid], 10), "the orphan kept running"
    finally:
        if mid.poll() is None:
            mid.kill()
            mid.wait()


def test_die_with_parent_exits_when_the_parent_is_already_gone() -> None:
    code = "import os; from smt_host.lifeline import die_with_parent; die_with_parent(1); print('survived')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 128 + signal.SIGTERM and "survived" not in out.stdout


# ------------------------------------------------------- keep what was there


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name)


def test_atomic_json_write_that_fails_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    from smt_host import files

    path = tmp_path / "cells" / "seed0.json"
    files.write_json_atomic({"v": 1}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    calls = []

    def boom(fd):
        calls.append(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", boom)  # after the temporary file is written
    with pytest.raises(OSError, match="Input/output"):
        files.write_json_atomic({"v": 2}, path)
    assert calls and json.loads(path.read_text()) == {"v": 1}
    assert _temps(path.parent) == []
    monkeypatch.undo()

    # a value that cannot be written fails before any file is touched
    with pytest.raises(TypeError):
        files.write_json_atomic({"v": object()}, path)
    assert json.loads(path.read_text()) == {"v": 1} and _temps(path.parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_folder_keeps_the_previous_file(tmp_path: Path) -> None:
    from smt_host.files import write_json_atomic

    folder = tmp_path / "ro"
    write_json_atomic({"v": 1}, folder / "a.json")
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            write_json_atomic({"v": 2}, folder / "a.json")
        assert json.loads((folder / "a.json").read_text()) == {"v": 1} and _temps(folder) == []
    finally:
        folder.chmod(0o755)


def _matrix(nan: bool = True) -> dict:
    n = float("nan")
    return {
        "rule": "test rule",
        "models": ["m"],
        "pairs": [
            {
                "model": "m",
                "technique": "t",
                "seeds": 1,
                "ne_delta": -0.01,
                "ne_delta_std": n if nan else 0.001,
                "auc_delta": 0.002,
                "auc_delta_std": n if nan else 0.001,
                "calibration_error_delta": 0.0,
                "calibration_error_delta_std": n,
                "flops": 100.0,
                "flops_delta": 0.0,
                "decision": "reject",
                "reason": "one seed: no standard error",
                "techniques": [{"technique": "t", "dist": "d", "version": "1", "params": None}],
            },
            {
                "model": "m",
                "technique": "u",
                "seeds": 0,
                "ne_delta": n,
                "ne_delta_std": n,
                "auc_delta": n,
                "auc_delta_std": n,
                "calibration_error_delta": n,
                "calibration_error_delta_std": n,
                "flops": None,
                "flops_delta": None,
                "decision": "reject",
                "reason": "over the capacity budget: x",
                "techniques": [],
            },
        ],
        "wall_s": float("inf"),
    }


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_adoption_json_is_strict_and_reports_are_atomic(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.figure

    from smt_host.ecosystem.lock import write_lock
    from smt_host.ecosystem.reports import write_reports

    paths = write_reports(tmp_path, _matrix())
    data = _strict(paths[0].read_text())
    assert data["pairs"][0]["ne_delta_std"] is None and data["wall_s"] is None
    assert data["pairs"][0]["ne_delta"] == -0.01
    assert "n/a" in paths[1].read_text()
    # the reports of a matrix read back from adoption.json (nulls) render too
    write_reports(tmp_path / "again", data)
    before = {p.name: p.read_bytes() for p in paths}

    # the heatmap fails halfway through writing: the previous png stays whole
    def half(self, fname, *a, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)
    with pytest.raises(RuntimeError, match="disk full"):
        write_reports(tmp_path, _matrix(nan=False))
    monkeypatch.undo()
    assert paths[2].read_bytes() == before["adoption.png"] and before["adoption.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert _temps(tmp_path) == []

    # the markdown write fails: json was replaced (complete), md and png are the old ones
    before = {p.name: p.read_bytes() for p in paths}
    third = _matrix(nan=False)
    third["pairs"][0]["ne_delta_std"] = 0.002
    from smt_host import files

    real = files.os.replace

    def fail_md(src, dst):
        if str(dst).endswith(".md"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", fail_md)
    with pytest.raises(OSError, match="No space"):
        write_reports(tmp_path, third)
    monkeypatch.undo()
    assert _strict(paths[0].read_text())["pairs"][0]["ne_delta_std"] == 0.002
    assert paths[1].read_bytes() == before["adoption.md"] and paths[2].read_bytes() == before["adoption.png"]
    assert _temps(tmp_path) == []

    lock = {"version": 2, "models": {"m": {"techniques": [], "capacity": {"achieved": float("nan")}}}}
    write_lock(lock, tmp_path / "smt.lock.json")
    assert _strict((tmp_path / "smt.lock.json").read_text())["models"]["m"]["capacity"]["achieved"] is None


def test_an_unreadable_cell_result_is_trained_again(tmp_path: Path) -> None:
    from smt_host.ecosystem.cells import Cell, Fingerprint, cell_path, read_cell, run_cells

    good, torn = Cell("m", "baseline", 0), Cell("m", "baseline", 1)
    fp = Fingerprint("s", "m", "d", 0)
    keys = {good: fp, torn: attrs.evolve(fp, seed=1)}
    cell_path(tmp_path, good).parent.mkdir(parents=True)
    cell_path(tmp_path, good).write_text(  # an older, NaN-writing run
        '{"fingerprint": ' + json.dumps(fp.to_dict()) + ', "cell": {}, "test": {"click": {"ne": NaN}}}'
    )
    cell_path(tmp_path, torn).write_text('{"cell": {"model": "m", "ar')  # torn by a non-atomic writer
    assert read_cell(tmp_path, good) is not None and read_cell(tmp_path, torn) is None
    done = []
    with pytest.raises(AttributeError):  # no host: the torn cell is trained again, and fails here
        run_cells(
            None, None, tmp_path, [good, torn], keys=keys, on_done=lambda c, skipped: done.append((c.seed, skipped))
        )
    assert done == [(0, True)]
