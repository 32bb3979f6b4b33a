"""Histories read from CSV, Parquet and the synthetic source: most recent id
first, cut to max_length (counted), ids checked against the candidate's
vocabulary, jagged keys of the batch KJT."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from smt_host.data import open_source
from smt_host.data.tabular import recent_first
from smt_host.errors import DataFormatError
from smt_host.spec.loading import ecosystem_from_dict
from smt_host.testing import tiny_ecosystem


def file_eco(source: str, train: str, max_length: int = 3, **options) -> object:
    options = {"encode": "int", **options} if source != "libfm" else options
    return ecosystem_from_dict(
        {
            "name": "t",
            "models": {
                "m": {
                    "tasks": [{"name": "click", "label": "clk"}],
                    "features": {
                        "sparse": [{"name": "ad", "vocab_size": 10}, {"name": "user", "vocab_size": 50}],
                        "sequence": [{"name": "hist", "candidate": "ad", "max_length": max_length}],
                    },
                    "data": {"source": source, "options": {"train": train, **options}},
                }
            },
        },
        source="t.toml",
    )


def rows_of(src) -> tuple[list[list[int]], list[int]]:
    """(history ids per row, candidate ids) of the whole train split, in file order."""
    batch = next(src.batches("train", 100))
    assert batch.sparse.keys() == ["ad", "user", "hist"]
    jt = batch.sparse.to_dict()["hist"]
    hist = [v.tolist() for v in torch.split(jt.values(), jt.lengths().tolist())]
    return hist, batch.sparse.to_dict()["ad"].values().tolist()


CSV = "clk,ad,user,hist\n1,3,7,1^2^3^4^5\n0,4,8,\n1,5,9,9\n0,6,1,2^7\n"


def test_csv_histories_are_most_recent_first_and_cut_to_max_length(tmp_path, caplog):
    (tmp_path / "train.csv").write_text(CSV)
    src = open_source(file_eco("csv", str(tmp_path / "train.csv")).model("m"), file_eco("csv", "x"))
    with caplog.at_level(logging.WARNING):
        hist, ads = rows_of(src)
    assert hist == [[5, 4, 3], [], [9], [7, 2]]  # oldest_first in the file: the last id is the most recent
    assert ads == [3, 4, 5, 6]
    assert src.truncated == {"train.csv": {"hist": 1}}
    (line,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert line.endswith("train.csv: truncated histories (kept the most recent ids): 1 of 'hist' to 3")


def test_newest_first_files_keep_their_order(tmp_path):
    (tmp_path / "train.csv").write_text(CSV)
    eco = file_eco("csv", str(tmp_path / "train.csv"), order="newest_first")
    hist, _ = rows_of(open_source(eco.model("m"), eco))
    assert hist == [[1, 2, 3], [], [9], [2, 7]]


def test_an_id_outside_the_candidates_vocabulary_is_refused_with_its_line(tmp_path):
    (tmp_path / "train.csv").write_text("clk,ad,user,hist\n1,3,7,1^2\n0,4,8,3^12\n")
    eco = file_eco("csv", str(tmp_path / "train.csv"))
    with pytest.raises(DataFormatError) as err:
        list(open_source(eco.model("m"), eco).batches("train", 10))
    assert str(err.value) == "train.csv:3: column 'hist': id 12 is outside [0, 10)"


def test_parquet_list_columns(tmp_path):
    table = pa.table(
        {
            "clk": [1, 0, 1],
            "ad": [3, 4, 5],
            "user": [7, 8, 9],
            "hist": pa.array([[1, 2, 3, 4], [], [6, 8]], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    eco = file_eco("parquet", str(tmp_path / "train.parquet"), max_length=2)
    src = open_source(eco.model("m"), eco)
    hist, _ = rows_of(src)
    assert hist == [[4, 3], [], [8, 6]]
    assert src.truncated == {"train.parquet": {"hist": 1}}


def test_a_libfm_model_cannot_have_histories():
    from smt_host.errors import ConfigError

    eco = file_eco(
        "libfm", "x.libfm", fields=[{"name": "ad", "start": 0, "end": 9}, {"name": "user", "start": 10, "end": 59}]
    )
    with pytest.raises(ConfigError, match=r"libfm files hold no histories"):
        open_source(eco.model("m"), eco)


def test_recent_first_golden():
    values, lengths, parents, cut = recent_first(
        np.array([1, 2, 3, 4, 5, 6]), np.array([4, 0, 2]), np.array([0, 0, 0, 0, 2, 2]), 3, "oldest_first"
    )
    assert (values.tolist(), lengths.tolist(), parents.tolist(), cut.tolist()) == (
        [4, 3, 2, 6, 5],
        [3, 0, 2],
        [0, 0, 0, 2, 2],
        [True, False, False],
    )


# -------------------------------------------------------------- synthetic


def test_synthetic_histories_are_jagged_and_cut():
    eco = tiny_ecosystem(histories=True)
    spec = eco.model("tiny_history")
    src = open_source(spec, eco)
    batch = next(src.batches("train", 512))
    assert batch.sparse.keys() == [f.name for f in spec.features.sparse] + ["hist_ad_id"]
    lengths = batch.sparse.to_dict()["hist_ad_id"].lengths()
    assert int(lengths.max()) == 6 and int(lengths.min()) == 0  # jagged, up to max_length, some empty
    values = batch.sparse.to_dict()["hist_ad_id"].values()
    assert int(values.max()) < 4000
    (n,) = src.truncated["synthetic"].values()
    assert n > len(src.splits["train"]) // 2  # lengths 0..30 cut to 6: most rows


def test_the_planted_signal_is_in_the_clicks():
    """Clicks rise with the match of the candidate's category and the history's."""
    from smt_host.data.synthetic import VOCAB, make_impressions, make_world

    imp = make_impressions(0, "feed", 30_000)
    values, offsets = imp.histories["hist_ad_id"]
    cats = make_world(0).ad_attr[:, 1]
    lengths = offsets[1:] - offsets[:-1]
    row = torch.repeat_interleave(torch.arange(30_000), lengths)
    hit = torch.zeros(30_000, dtype=torch.bool)
    hit[row[cats[values] == imp.sparse["ad_category"][row]]] = True
    click = imp.labels["click"]
    assert click[hit].mean() > 1.5 * click[~hit].mean()
    assert VOCAB["ad_id"] == 4000
    assert "hist_ad_id" not in make_impressions(0, "shop", 1000).histories


def test_synthetic_refuses_a_history_it_does_not_have():
    eco = tiny_ecosystem(histories=True)
    spec = eco.model("tiny_history")
    import attrs

    video = attrs.evolve(spec, surface="shop")
    with pytest.raises(
        ValueError,
        match=r"synthetic surface 'shop' has no histories.* @ \$\.models\.tiny_history\.features\.sequence\[0\]\.name",
    ):
        open_source(video, eco)
