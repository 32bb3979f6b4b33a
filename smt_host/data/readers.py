"""File data sources: ``libfm``, ``criteo``, ``csv`` and ``parquet``.

Each is registered with :func:`smt_host.data.register_source` on import and
built from a model spec's ``[data.options]``::

    [model.data]
    source = "libfm"
    [model.data.options]
    train = "frappe/frappe.train.reconstructed.libfm.gz"   # or a list of files
    valid = "frappe/frappe.validation.libfm.gz"
    test = "frappe/frappe.test.libfm.gz"
    fields = [{ name = "user", start = 0, end = 956 }, ...]

Options shared by every source:

* ``train`` / ``valid`` / ``test``: a file or a list of files per split; or
  ``file`` (file or list) with ``split = [0.8, 0.1, 0.1]`` (train/valid/test
  fractions; each row goes to a split by a fixed hash of its line number and
  ``split_seed``, so the split is deterministic and needs no second pass).
  Relative paths resolve against :func:`smt_host.data.data_dir`.
* ``schema``: a TOML file whose keys are merged under the inline options
  (resolved against the data folder, then the spec file's folder).
* ``streaming``: ``true`` reads each split from disk on every pass (a file
  larger than memory works); ``false`` loads each split once into memory;
  ``"auto"`` (default) streams when the files are over ``stream_above_mb``
  (default 512; a ``.gz`` counts 4 times its size).
* ``shuffle_buffer``: rows shuffled together when streaming (default 262144).
* ``skip_malformed``: skip malformed rows instead of raising
  :class:`DataFormatError`; the counts are in ``source.skipped`` (by file
  name) and logged as a warning.
* ``chunk_rows``: rows per chunk read (libFM lines, Parquet batch rows).

libfm: ``fields`` (name, start, end inclusive or size), one per sparse
feature (more fields are allowed and dropped). csv/criteo/parquet: see
:mod:`smt_host.data.tabular`; options ``features = { NAME = { column,
encode, separator, transform } }``, ``labels = { TASK = "column" }`` and the
defaults ``encode`` ("hash"), ``transform`` ("none"; "log1p" for criteo),
``separator`` ("^"); CSV only: ``delimiter``, ``header``, ``column_names``,
``block_bytes``. ``criteo`` reads raw Criteo TSV (no header, columns
``label, I1..I13, C1..C26``) or a CSV with a header, sniffing which.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from smt_host.data import data_dir, register_source
from smt_host.data.batch import Batch, TensorSplit
from smt_host.data.chunks import Chunk, RowFaults, concat_splits, log, make_split, rebatch, split_of_lines, take_rows
from smt_host.data.libfm import Field, LibfmFormat
from smt_host.data.tabular import ENCODINGS, TRANSFORMS, DenseColumn, SparseColumn, TabularFormat
from smt_host.errors import ConfigError, DataFormatError

if TYPE_CHECKING:  # pragma: no cover
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

__all__ = ["DataFormatError", "FileSource", "CRITEO_COLUMNS", "open_file_source"]

SPLITS = ("train", "valid", "test")
CRITEO_COLUMNS: tuple[str, ...] = ("label",) + tuple(f"I{i}" for i in range(1, 14)) + tuple(f"C{i}" for i in range(1, 27))

_COMMON = {
    "train", "valid", "test", "file", "split", "split_seed", "schema", "streaming", "stream_above_mb",
    "shuffle_buffer", "skip_malformed", "chunk_rows",
}
_OPTIONS = {
    "libfm": _COMMON | {"fields"},
    "csv": _COMMON | {"delimiter", "header", "column_names", "block_bytes", "encode", "transform", "separator", "features", "labels"},
    "parquet": _COMMON | {"encode", "transform", "separator", "features", "labels"},
}
_OPTIONS["criteo"] = _OPTIONS["csv"]


class FileSource:
    """A :class:`~smt_host.data.batch.DataSource` over files.

    ``batches(split, B)`` yields :class:`Batch` objects: dense (B, Nd),
    sparse KJT with one key per sparse feature, labels (B, T). In memory a
    split is read once and cached; streaming re-reads it on each pass.

    Attributes:
        skipped: malformed rows skipped, by file name (latest full pass).
    """

    def __init__(
        self, fmt: Any, task_names: Sequence[str], files: Mapping[str, Sequence[Path]], *,
        fractions: Optional[Sequence[float]] = None, split_seed: int = 0, streaming: bool = False,
        skip_malformed: bool = False, shuffle_buffer: int = 262_144,
    ) -> None:
        self.fmt = fmt
        self.task_names = tuple(task_names)
        self.files = {k: tuple(v) for k, v in files.items()}
        self.fractions = tuple(fractions) if fractions else None
        self.split_seed = split_seed
        self.streaming = streaming
        self.skip_malformed = skip_malformed
        self.shuffle_buffer = shuffle_buffer
        self.skipped: dict[str, int] = {}
        self._warned: set[str] = set()
        self._loaded: dict[str, TensorSplit] = {}
        self._base_rates: Optional[torch.Tensor] = None
        self._counts: dict[str, int] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.fractions else tuple(s for s in SPLITS if s in self.files)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    # ------------------------------------------------------------- reading

    def _read_file(self, path: Path) -> Iterator[Chunk]:
        faults = RowFaults(path, self.skip_malformed)
        yield from self.fmt.read(path, faults)
        self.skipped[path.name] = faults.count
        if faults.count and path.name not in self._warned:
            self._warned.add(path.name)
            log.warning("%s: skipped %d malformed rows", path, faults.count)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"no {split!r} split; have {', '.join(self.splits)}")

    def chunks(self, split: str) -> Iterator[TensorSplit]:
        """Streams the rows of ``split`` as splits of a few thousand rows."""
        self._check_split(split)
        if self.fractions is None:
            for path in self.files[split]:
                for chunk in self._read_file(path):
                    yield chunk.data
            return
        which = SPLITS.index(split)
        for k, path in enumerate(self.files["file"]):
            for chunk in self._read_file(path):
                mask = split_of_lines(chunk.lines, self.fractions, self.split_seed * 1_000_003 + k) == which
                if mask.any():
                    yield take_rows(chunk.data, torch.from_numpy(np.nonzero(mask)[0]))

    def load(self, split: str) -> TensorSplit:
        """The whole split in memory (cached)."""
        self._check_split(split)
        if split not in self._loaded:
            if self.fractions is None:
                self._loaded[split] = self._concat(list(self.chunks(split)))
            else:  # one pass fills all three splits
                parts: dict[int, list[TensorSplit]] = {0: [], 1: [], 2: []}
                for k, path in enumerate(self.files["file"]):
                    for chunk in self._read_file(path):
                        which = split_of_lines(chunk.lines, self.fractions, self.split_seed * 1_000_003 + k)
                        for s in parts:
                            idx = np.nonzero(which == s)[0]
                            if len(idx):
                                parts[s].append(take_rows(chunk.data, torch.from_numpy(idx)))
                for s, name in enumerate(SPLITS):
                    self._loaded[name] = self._concat(parts[s])
        return self._loaded[split]

    def _concat(self, parts: list[TensorSplit]) -> TensorSplit:
        if parts:
            return concat_splits(parts)
        keys = tuple(self.fmt.keys)
        seq = set(getattr(self.fmt, "sequence", ())) | {s.feature for s in getattr(self.fmt, "sparse", ()) if s.sequence}
        nd = len(getattr(self.fmt, "dense", ()))
        return make_split(
            keys, np.zeros((0, len(keys) - len(seq)), np.int64), np.zeros((0, nd), np.float32),
            np.zeros((0, len(self.task_names)), np.float32),
            {k: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for k in keys if k in seq},
        )

    # ---------------------------------------------------------- DataSource

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
        epoch: int = 0, max_batches: Optional[int] = None,
    ) -> Iterator[Batch]:
        """Batches of ``split``; shuffled in memory by (seed, epoch), or within
        a buffer of ``shuffle_buffer`` rows when streaming."""
        self._check_split(split)
        if not self.streaming:
            return self.load(split).batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, max_batches=max_batches)
        return rebatch(
            self.chunks(split), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
            buffer_rows=self.shuffle_buffer, max_batches=max_batches,
        )

    def base_rates(self) -> torch.Tensor:
        """(T,) positive rate of each task on train (one pass when streaming, cached)."""
        if self._base_rates is None:
            if not self.streaming:
                labels = self.load("train").labels
                self._base_rates = labels.mean(dim=0) if len(labels) else torch.zeros(len(self.task_names))
            else:
                total = torch.zeros(len(self.task_names), dtype=torch.float64)
                n = 0
                for part in self.chunks("train"):
                    total += part.labels.sum(dim=0, dtype=torch.float64)
                    n += len(part)
                self._counts["train"] = n
                self._base_rates = (total / max(n, 1)).float()
        return self._base_rates

    def num_examples(self, split: str) -> int:
        """Rows of ``split`` (one counting pass when streaming, cached)."""
        if not self.streaming:
            return len(self.load(split))
        if split not in self._counts:
            self._counts[split] = sum(len(p) for p in self.chunks(split))
        return self._counts[split]


# ---------------------------------------------------------------- options


class _Opts:
    """Options of one model's source, with errors that name their path."""

    def __init__(self, model: "ModelSpec", eco: "EcosystemSpec", kind: str) -> None:
        self.model = model
        self.kind = kind
        self.prefix = f"$.models.{model.name}.data.options"
        self.source = eco.source
        raw = dict(model.data.options)
        if "schema" in raw:
            schema = self._schema(raw["schema"], eco)
            raw = {**schema, **raw}
        unknown = sorted(set(raw) - _OPTIONS[kind])
        if unknown:
            self.fail(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for source "
                      f"{kind!r}; known: {', '.join(sorted(_OPTIONS[kind]))}", "")
        self.raw = raw

    def fail(self, message: str, key: str) -> None:
        raise ConfigError([f"{message} @ {self.prefix}{'.' + key if key else ''}"], self.source)

    def get(self, key: str, default: Any, types: tuple[type, ...]) -> Any:
        value = self.raw.get(key, default)
        if value is not default and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            self.fail(f"expected {' or '.join(t.__name__ for t in types)}, got {value!r}", key)
        return value

    def _schema(self, value: Any, eco: "EcosystemSpec") -> dict:
        if not isinstance(value, str):
            self.fail(f"expected a path to a TOML file, got {value!r}", "schema")
        p = Path(value).expanduser()
        candidates = [p] if p.is_absolute() else [data_dir() / p]
        if not p.is_absolute() and eco.source:
            spec = Path(eco.source)
            candidates.append((spec if spec.is_dir() else spec.parent) / p)
        for c in candidates:
            if c.is_file():
                with open(c, "rb") as f:
                    try:
                        data = tomllib.load(f)
                    except tomllib.TOMLDecodeError as exc:
                        self.fail(f"invalid TOML in schema {c}: {exc}", "schema")
                data.pop("schema", None)
                return data
        self.fail(f"schema file not found (looked at {', '.join(map(str, candidates))})", "schema")
        return {}

    def path(self, value: Any, key: str) -> list[Path]:
        values = value if isinstance(value, list) else [value]
        out = []
        for v in values:
            if not isinstance(v, str):
                self.fail(f"expected a file path or a list of them, got {value!r}", key)
            p = Path(v).expanduser()
            p = p if p.is_absolute() else data_dir() / p
            if not p.is_file():
                self.fail(f"data file not found: {p} (set SMT_DATA_DIR; data folder is {data_dir()})", key)
            out.append(p)
        if not out:
            self.fail("expected at least one file", key)
        return out

    def files(self) -> tuple[dict[str, list[Path]], Optional[tuple[float, ...]]]:
        if "file" in self.raw:
            clash = [k for k in SPLITS if k in self.raw]
            if clash:
                self.fail(f"give either 'file' with 'split' or {', '.join(map(repr, clash))}, not both", "file")
            split = self.raw.get("split")
            if (not isinstance(split, list) or len(split) not in (2, 3)
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in split)
                    or abs(sum(split) - 1.0) > 1e-6):
                self.fail(f"'file' needs split = [train, valid, test] fractions summing to 1, got {split!r}", "split")
            fr = tuple(float(x) for x in split) + ((0.0,) if len(split) == 2 else ())
            return {"file": self.path(self.raw["file"], "file")}, fr
        if "split" in self.raw:
            self.fail("'split' needs 'file' (one file split by fraction)", "split")
        if "train" not in self.raw:
            self.fail("required option missing: 'train' (or 'file' with 'split')", "train")
        return {k: self.path(self.raw[k], k) for k in SPLITS if k in self.raw}, None

    def streaming(self, files: Mapping[str, Sequence[Path]]) -> bool:
        value = self.raw.get("streaming", "auto")
        if isinstance(value, bool):
            return value
        if value != "auto":
            self.fail(f"must be true, false or \"auto\", got {value!r}", "streaming")
        limit = self.get("stream_above_mb", 512, (int, float))
        size = sum(p.stat().st_size * (4 if p.suffix == ".gz" else 1) for ps in files.values() for p in ps)
        return size > limit * 2**20


# ---------------------------------------------------------------- formats


def _libfm_format(o: _Opts) -> LibfmFormat:
    model = o.model
    if len(model.tasks) != 1:
        o.fail(f"libfm files hold one label, but the model has {len(model.tasks)} tasks", "")
    if model.features.dense:
        o.fail("libfm files hold no dense features; remove [features].dense", "")
    raw = o.raw.get("fields")
    if not isinstance(raw, list) or not raw:
        o.fail("required option missing: 'fields' (a list of { name, start, end })", "fields")
    fields = []
    for i, f in enumerate(raw):
        key = f"fields[{i}]"
        if not isinstance(f, Mapping) or set(f) - {"name", "start", "end", "size"} or "name" not in f or "start" not in f:
            o.fail(f"expected {{ name, start, end }} (or size instead of end), got {f!r}", key)
        if ("end" in f) == ("size" in f):
            o.fail("give one of 'end' (inclusive) or 'size'", key)
        start = f["start"]
        end = f["end"] if "end" in f else start + f["size"] - 1
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)) or start < 0 or end < start:
            o.fail(f"need integers 0 <= start <= end, got start={start!r}, end={end!r}", key)
        fields.append(Field(str(f["name"]), start, end))
    by_start = sorted(fields, key=lambda f: f.start)
    for a, b in zip(by_start, by_start[1:]):
        if b.start <= a.end:
            o.fail(f"field ranges overlap: {a.name!r} {a.start}-{a.end} and {b.name!r} {b.start}-{b.end}", "fields")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        o.fail(f"field names repeat: {names}", "fields")
    by_name = {f.name: f for f in fields}
    for feat in model.features.sparse:
        fld = by_name.get(feat.name)
        if fld is None:
            o.fail(f"sparse feature {feat.name!r} has no field; fields are {', '.join(names)}", "fields")
        if fld.size > feat.vocab_size:
            o.fail(f"field {feat.name!r} spans {fld.size} ids but the feature's vocab_size is {feat.vocab_size}", "fields")
    return LibfmFormat(
        fields=tuple(fields), keys=tuple(f.name for f in model.features.sparse),
        sequence=frozenset(f.name for f in model.features.sparse if f.sequence),
        chunk_rows=o.get("chunk_rows", 65_536, (int,)),
    )


def _tabular_format(o: _Opts) -> TabularFormat:
    model, kind = o.model, o.kind
    encode = o.get("encode", "hash", (str,))
    transform = o.get("transform", "log1p" if kind == "criteo" else "none", (str,))
    separator = o.get("separator", "^", (str,))
    if encode not in ENCODINGS:
        o.fail(f"must be one of {', '.join(ENCODINGS)}, got {encode!r}", "encode")
    if transform not in TRANSFORMS:
        o.fail(f"must be one of {', '.join(TRANSFORMS)}, got {transform!r}", "transform")
    per = o.get("features", {}, (dict,))
    known = {f.name for f in model.features.sparse} | {f.name for f in model.features.dense}
    for name, table in per.items():
        key = f"features.{name}"
        if name not in known:
            o.fail(f"no feature named {name!r} in the model", key)
        allowed = {"column", "encode", "separator", "transform"}
        if not isinstance(table, Mapping) or set(table) - allowed:
            o.fail(f"expected a table with keys {', '.join(sorted(allowed))}, got {table!r}", key)
        if table.get("encode", encode) not in ENCODINGS:
            o.fail(f"must be one of {', '.join(ENCODINGS)}, got {table['encode']!r}", key + ".encode")
        if table.get("transform", transform) not in TRANSFORMS:
            o.fail(f"must be one of {', '.join(TRANSFORMS)}, got {table['transform']!r}", key + ".transform")
    sparse = tuple(
        SparseColumn(
            feature=f.name, column=per.get(f.name, {}).get("column", f.name), vocab_size=f.vocab_size,
            encode=per.get(f.name, {}).get("encode", encode), sequence=f.sequence,
            separator=per.get(f.name, {}).get("separator", separator),
        )
        for f in model.features.sparse
    )
    dense = tuple(
        DenseColumn(f.name, per.get(f.name, {}).get("column", f.name), per.get(f.name, {}).get("transform", transform))
        for f in model.features.dense
    )
    label_map = o.get("labels", {}, (dict,))
    for name in label_map:
        if name not in model.task_names:
            o.fail(f"no task named {name!r} in the model", f"labels.{name}")
    labels = tuple(str(label_map.get(t.name, t.label_name)) for t in model.tasks)
    if kind == "parquet":
        return TabularFormat("parquet", sparse, dense, labels, chunk_rows=o.get("chunk_rows", 65_536, (int,)))
    criteo = kind == "criteo"
    names = o.get("column_names", list(CRITEO_COLUMNS) if criteo else None, (list,))
    return TabularFormat(
        "csv", sparse, dense, labels,
        delimiter=o.get("delimiter", None if criteo else ",", (str,)),
        header=o.get("header", None if criteo else True, (bool,)),
        column_names=tuple(names) if names else None,
        block_bytes=o.get("block_bytes", 1 << 22, (int,)),
    )


def open_file_source(model: "ModelSpec", eco: "EcosystemSpec", kind: str) -> FileSource:
    """Builds the ``kind`` file source of ``model`` (ConfigError on bad options)."""
    o = _Opts(model, eco, kind)
    fmt = _libfm_format(o) if kind == "libfm" else _tabular_format(o)
    files, fractions = o.files()
    return FileSource(
        fmt, model.task_names, files, fractions=fractions,
        split_seed=o.get("split_seed", 0, (int,)),
        streaming=o.streaming(files),
        skip_malformed=o.get("skip_malformed", False, (bool,)),
        shuffle_buffer=o.get("shuffle_buffer", 262_144, (int,)),
    )


for _kind in ("libfm", "criteo", "csv", "parquet"):
    register_source(_kind, functools.partial(open_file_source, kind=_kind))
