"""Data at scale (smt_host.data.filesets): a split as a glob, a folder or a
hive-partitioned folder of CSV / Parquet files, the checks of a file set,
streaming over it, and each rank's shard. Small files in tmp_path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from smt_host.data import open_source
from smt_host.data.filesets import balance, partition_values
from smt_host.errors import ConfigError
from smt_host.spec.loading import ecosystem_from_dict

VOCAB = 50


def make_model(source: str, options: dict, sparse=("a", "b"), dense=("x",)):
    eco = ecosystem_from_dict(
        {
            "model": {
                "name": "m",
                "tasks": [{"name": "click"}],
                "features": {
                    "sparse": [{"name": s, "vocab_size": VOCAB, "embedding_dim": 4} for s in sparse],
                    "dense": [{"name": d} for d in dense],
                },
                "data": {"source": source, "options": options},
            }
        }
    )
    return eco.model("m"), eco


def open_model(source: str, options: dict, **kw):
    model, eco = make_model(source, options, **kw)
    return open_source(model, eco)


def table(n: int, start: int = 0) -> pa.Table:
    """n rows: a, b integer ids (row number based), x float, click 0/1."""
    r = np.arange(start, start + n)
    return pa.table({"a": r % VOCAB, "b": (r * 7) % VOCAB, "x": r.astype(np.float64) / 10, "click": r % 2})


def write_parts(folder: Path, sizes, fmt: str = "parquet") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        p = folder / f"part-{i}.{fmt}"
        t = table(n, start)
        pq.write_table(t, p) if fmt == "parquet" else pacsv.write_csv(t, p)
        paths.append(p)
        start += n
    return paths


def rows(split) -> list[tuple]:
    """The rows of a TensorSplit as (ids..., dense..., labels...) tuples, in order."""
    return [tuple(r) for r in torch.cat([split.ids.float(), split.dense, split.labels], dim=1).tolist()]


INT = {"features": {"a": {"encode": "int"}, "b": {"encode": "int"}}}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_glob_and_folder_read_the_files_in_order(tmp_path: Path, fmt: str) -> None:
    paths = write_parts(tmp_path / "d", [30, 11, 25], fmt)
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / ".part-9.crc").write_text("junk")
    pq.write_table(table(66), tmp_path / "whole.parquet")
    whole = open_model("parquet", {"train": str(tmp_path / "whole.parquet"), **INT}).load("train")
    listed = open_model(fmt, {"train": [str(p) for p in paths], **INT})
    by_glob = open_model(fmt, {"train": str(tmp_path / "d" / f"part-*.{fmt}"), **INT})
    by_folder = open_model(fmt, {"train": str(tmp_path / "d"), **INT})
    assert by_folder.files["train"] == tuple(paths) == by_glob.files["train"]
    for source in (listed, by_glob, by_folder):
        assert rows(source.load("train")) == rows(whole)


def test_relative_glob_resolves_against_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_parts(tmp_path / "set", [5, 6])
    monkeypatch.setenv("SMT_DATA_DIR", str(tmp_path))
    source = open_model("parquet", {"train": "set/*.parquet", **INT})
    with pytest.raises(ConfigError) as err:
        open_model("parquet", {"train": "set/*.csv"})
    assert str(err.value).splitlines() == [
        f"no file matches the pattern {tmp_path / 'set' / '*.csv'} (relative to the data folder {tmp_path}; "
        "set SMT_DATA_DIR) @ $.models.m.data.options.train"
    ]
    assert [p.name for p in source.files["train"]] == ["part-0.parquet", "part-1.parquet"]
    assert source.num_examples("train") == 11


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_hive_partitions_become_columns(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "events"
    for day, n in ((3, 4), (7, 6)):  # folders in sorted order
        write_parts(root / f"day={day}" / "region=eu%2Fwest", [n], fmt)
    opts = {"train": str(root), "features": {"a": {"encode": "int"}, "b": {"encode": "int"}, "day": {"encode": "int"}}}
    source = open_model(fmt, opts, sparse=("a", "b", "day"))
    split = source.load("train")
    day = split.ids[:, split.keys.index("day")].tolist()
    assert day == [3] * 4 + [7] * 6
    (path, parts), *_ = source.partitions.items()
    assert parts == {"day": "3", "region": "eu/west"} and path.parent.name == "region=eu%2Fwest"


def test_partition_values() -> None:
    assert partition_values(Path("/d"), Path("/d/k=1/x/j=a%20b/f.csv")) == {"k": "1", "j": "a b"}
    assert partition_values(Path("/d"), Path("/e/k=1/f.csv")) == {}


def test_balance_spreads_rows() -> None:
    sizes = [10, 10, 1, 9, 2, 8, 3]
    owned = balance(sizes, 3)
    assert sorted(i for o in owned for i in o) == list(range(len(sizes)))
    assert all(o == sorted(o) for o in owned)
    loads = [sum(sizes[i] for i in o) for o in owned]
    assert max(loads) - min(loads) <= max(sizes), loads
    assert balance([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]


def option(key: str) -> str:
    return rf" @ \$\.models\.m\.data\.options\.{key}$"


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = tmp_path / "none" / "*.parquet"
    with pytest.raises(ConfigError) as err:
        open_model("parquet", {"train": str(pattern)})
    assert str(err.value).splitlines() == [f"no file matches the pattern {pattern} @ $.models.m.data.options.train"]


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(ConfigError, match=r"the folder .*empty holds no data files .*" + option("valid")):
        open_model("parquet", {"train": str(write_parts(tmp_path / "t", [3])[0]), "valid": str(tmp_path / "empty")})


def test_mixed_schemas_name_both_files(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_parts(d, [4])
    t = table(3)
    pq.write_table(t.set_column(0, "a", pa.array([str(v) for v in t["a"].to_pylist()])), d / "part-1.parquet")
    with pytest.raises(ConfigError) as err:
        open_model("parquet", {"train": str(d)})
    (line,) = str(err.value).splitlines()
    assert line == (
        f"mixed schemas: column 'a' is int64 in {d / 'part-0.parquet'} but string in {d / 'part-1.parquet'}"
        " @ $.models.m.data.options.train"
    )


def test_file_of_a_set_missing_a_column(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_parts(d, [4])
    pq.write_table(table(3).drop_columns(["b"]), d / "part-1.parquet")
    with pytest.raises(
        ConfigError, match=r"part-1\.parquet: missing column 'b' \(of 2 files of the split\)" + option("train")
    ):
        open_model("parquet", {"train": str(d)})


def test_partition_key_that_is_also_a_column(tmp_path: Path) -> None:
    write_parts(tmp_path / "d" / "a=1", [4])
    with pytest.raises(ConfigError, match=r"column 'a' is both in the file and a partition folder" + option("train")):
        open_model("parquet", {"train": str(tmp_path / "d")})


def test_streaming_a_file_set_matches_memory(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_parts(d, [40, 7, 33])
    mem = open_model("parquet", {"train": str(d), "streaming": False, **INT})
    stream = open_model("parquet", {"train": str(d), "streaming": True, "chunk_rows": 16, "shuffle_buffer": 32, **INT})
    assert stream.num_examples("train") == 80 == mem.num_examples("train")
    got = [b for b in stream.batches("train", 16, shuffle=True, seed=1, epoch=2)]
    assert [len(b) for b in got] == [16] * 5
    ids = sorted(map(tuple, torch.cat([b.sparse["a"].values().view(-1, 1) for b in got]).tolist()))
    assert ids == sorted(map(tuple, mem.load("train").ids[:, :1].tolist()))


def shard_rows(batches) -> list[tuple]:
    out = []
    for b in batches:
        ids = torch.stack([b.sparse[k].values() for k in ("a", "b")], dim=1).float()
        out += [tuple(r) for r in torch.cat([ids, b.dense, b.labels], dim=1).tolist()]
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_each_rank_reads_its_own_files(tmp_path: Path, streaming: bool) -> None:
    sizes = [30, 11, 25, 14, 9]
    paths = write_parts(tmp_path / "train", sizes)
    write_parts(tmp_path / "valid", [21])
    opts = {"train": str(tmp_path / "train"), "valid": str(tmp_path / "valid"), "streaming": streaming, **INT}
    source = open_model("parquet", opts)
    assert source.rank_shard(0, 1) is None
    B, W = 8, 2
    shards = [source.rank_shard(r, W) for r in range(W)]
    assert sorted(p for s in shards for p in s.files) == paths  # each file on one rank
    assert all(s.num_examples("train") == sum(sizes) for s in shards)
    steps = math.ceil(sum(sizes) / B)
    for s, local in zip(shards, (4, 4)):
        got = list(s.batches("train", B, shuffle=True, seed=3, epoch=1))
        assert [len(b) for b in got] == [local] * steps
        own = open_model("parquet", {"train": [str(p) for p in s.files], **INT}).load("train")
        assert set(shard_rows(got)) <= set(rows(own))  # only its own files' rows
    # evaluation: each rank's slice of every global batch, the same rows as one process
    whole = shard_rows(source.batches("valid", B))
    per_rank = [list(s.batches("valid", B)) for s in shards]
    assert [len(b) for b in per_rank[0]] == [4, 4, 2]
    merged = [r for pair in zip(*per_rank) for b in pair for r in shard_rows([b])]
    assert merged == whole


def test_no_shard_for_fewer_files_than_ranks(tmp_path: Path) -> None:
    source = open_model("parquet", {"train": str(tmp_path / "d"), **INT} if write_parts(tmp_path / "d", [5]) else {})
    assert source.rank_shard(0, 2) is None
