"""File data sources: ``libfm``, ``criteo``, ``csv`` and ``parquet``.

Declared by the built-in plugin module :mod:`smt_host.builtins.data_sources`
(hook ``smt_data_sources``); each is built by :func:`open_file_source` from
a model spec's ``[data.options]``::

    [model.data]
    source = "libfm"
    [model.data.options]
    train = "frappe/frappe.train.reconstructed.libfm.gz"   # or a list of files
    valid = "frappe/frappe.validation.libfm.gz"
    test = "frappe/frappe.test.libfm.gz"
    fields = [{ name = "user", start = 0, end = 956 }, ...]

The options are structured by the host's converter into the frozen attrs
class of the source (:data:`OPTIONS`), so a bad value or an unknown key is a
:class:`~smt_host.errors.ConfigError` at ``$.models.<m>.data.options.<key>``
like any other spec error. The checks that need the model (field names
against sparse features, vocab sizes, tasks, file existence) follow.

:class:`FileOptions`, shared by every file source:

* ``train`` / ``valid`` / ``test``: a path or a list of paths per split
  (``train`` required), each a file, a glob or a folder, maybe partitioned
  (hive-style ``key=value/`` folders; :mod:`smt_host.data.filesets`); or
* ``file`` (a file or a list) with ``split = [train, valid, test]``
  fractions summing to 1 (the test one may be left out, meaning 0); each row
  goes to a split by a fixed hash of its line number and ``split_seed``
  (default 0), so the split is deterministic and needs no second pass.
  Relative paths resolve against :func:`smt_host.data.data_dir`.
* ``schema``: a TOML file whose keys are merged under the inline options
  (resolved against the data folder, then the spec file's folder).
* ``streaming``: ``true`` reads each split from disk on every pass (a file
  larger than memory works); ``false`` loads each split once into memory;
  ``"auto"`` (default) streams when the files are over ``stream_above_mb``
  (default 512; a ``.gz`` counts 4 times its size).
* ``shuffle_buffer``: rows shuffled together when streaming (default 262144).
* ``skip_malformed``: skip malformed rows (a bad label, id or cell, a
  wrong number of fields, a line that is not UTF-8) instead of raising
  :class:`DataFormatError` (default false); the counts are in
  ``source.skipped`` (by file name) and logged as a warning. A file that
  cannot be read (truncated or corrupt gzip data, not Parquet, a folder, no
  permission) or that holds no rows is a :class:`DataFormatError` naming it
  either way (``"<file>:<line>: <fault>"``, line 0 or the line reached).
* ``chunk_rows``: rows per chunk read (libFM lines, Parquet batch rows;
  default 65536).

:class:`LibfmOptions` (``libfm``) adds ``fields``: a list of
:class:`LibfmField` ``{ name, start, end }`` (``end`` inclusive, or ``size``
instead), one per sparse feature (more fields are allowed and dropped).

:class:`TabularOptions` (``parquet``; see :mod:`smt_host.data.tabular`)
adds the defaults ``encode`` ("hash", "mod" or "int"), ``transform``
("none" or "log1p") and ``separator`` ("^", between the items of a
sequence cell); ``features = { NAME = { column, encode, separator,
transform } }`` (:class:`ColumnOptions`, each key overriding the default
for one feature; ``column`` defaults to the feature's name) and ``labels =
{ TASK = "column" }`` (default: the task's label name).

:class:`CsvOptions` (``csv``) adds ``delimiter`` (default ","), ``header``
(default true), ``column_names`` (of a file without header) and
``block_bytes`` (bytes per read block, default 4 MiB).

:class:`CriteoOptions` (``criteo``) is ``csv`` with the defaults of raw
Criteo TSV: ``transform = "log1p"``, the delimiter and header sniffed from
the first line (so a CSV with a header works too) and ``column_names =
label, I1..I13, C1..C26``.
"""

from __future__ import annotations

import functools
import os
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NewType

import attrs
import cattrs
import numpy as np
import pyarrow as pa
import torch
from cattrs.errors import AttributeValidationNote, ClassValidationError

from smt_host.data import data_dir
from smt_host.data.batch import Batch, TensorSplit
from smt_host.data.chunks import Chunk, RowFaults, concat_splits, log, make_split, rebatch, split_of_lines, take_rows
from smt_host.data.files import READ_ERRORS, read_error
from smt_host.data.filesets import FileSetError, RankShard, balance, expand, parquet_fragment
from smt_host.data.libfm import Field, LibfmFormat
from smt_host.data.tabular import ENCODINGS, ORDERS, TRANSFORMS, DenseColumn, SparseColumn, TabularFormat
from smt_host.errors import ConfigError, DataFormatError, FieldValueError
from smt_host.spec.converter import make_converter, structure
from smt_host.spec.validators import at_least, one_of

if TYPE_CHECKING:  # pragma: no cover
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

__all__ = [
    "CRITEO_COLUMNS",
    "OPTIONS",
    "ColumnOptions",
    "CriteoOptions",
    "CsvOptions",
    "DataFormatError",
    "FileOptions",
    "FileSource",
    "LibfmField",
    "LibfmOptions",
    "TabularOptions",
    "open_file_source",
    "parse_options",
]

SPLITS = ("train", "valid", "test")
CRITEO_COLUMNS: tuple[str, ...] = (
    ("label",) + tuple(f"I{i}" for i in range(1, 14)) + tuple(f"C{i}" for i in range(1, 27))
)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class FileSource:
    """A :class:`~smt_host.data.batch.DataSource` over files.

    ``batches(split, B)`` yields :class:`Batch` objects: dense (B, Nd),
    sparse KJT with one key per sparse feature, labels (B, T). In memory a
    split is read once and cached; streaming re-reads it on each pass.

    Attributes:
        skipped: malformed rows skipped, by file name (latest full pass).
        truncated: rows whose history (a sequence feature) was longer than
            its ``max_length`` and cut to its most recent ids, by file name
            then feature (latest pass); logged once per file as a warning.
        partitions: the partition columns of each file of a partitioned
            folder, ``{path: {key: value}}`` (see :mod:`smt_host.data.filesets`).
    """

    def __init__(
        self,
        fmt: Any,
        task_names: Sequence[str],
        files: Mapping[str, Sequence[Path]],
        *,
        fractions: Sequence[float] | None = None,
        split_seed: int = 0,
        streaming: bool = False,
        skip_malformed: bool = False,
        shuffle_buffer: int = 262_144,
        partitions: Mapping[Path, Mapping[str, str]] | None = None,
    ) -> None:
        self.fmt = fmt
        self.partitions = {Path(k): dict(v) for k, v in (partitions or {}).items() if v}
        self._file_rows: dict[Path, int] = {}
        self.task_names = tuple(task_names)
        self.files = {k: tuple(v) for k, v in files.items()}
        self.fractions = tuple(fractions) if fractions else None
        self.split_seed = split_seed
        self.streaming = streaming
        self.skip_malformed = skip_malformed
        self.shuffle_buffer = shuffle_buffer
        self.skipped: dict[str, int] = {}
        #: rows whose history was cut to its max_length, by file name then feature (latest pass)
        self.truncated: dict[str, dict[str, int]] = {}
        self._warned: set = set()
        self._loaded: dict[str, TensorSplit] = {}
        self._base_rates: torch.Tensor | None = None
        self._counts: dict[str, int] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.fractions else tuple(s for s in SPLITS if s in self.files)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    # ------------------------------------------------------------- reading

    def _read_file(self, path: Path) -> Iterator[Chunk]:
        """The chunks of one file. Whatever goes wrong reading it is a
        :class:`DataFormatError` naming the file (and the line reached); so is
        a file without rows (empty, or every row skipped as malformed)."""
        faults = RowFaults(path, self.skip_malformed)
        rows, line = 0, 0
        parts = self.partitions.get(path)
        try:
            for chunk in self.fmt.read(path, faults, parts) if parts else self.fmt.read(path, faults):
                rows += len(chunk)
                if len(chunk.lines):
                    line = int(chunk.lines[-1])
                yield chunk
        except DataFormatError:
            raise
        except READ_ERRORS as exc:  # a reader that did not name the file itself
            raise read_error(path.name, line, exc) from exc
        if rows == 0:
            if faults.count:
                fault = f"no rows left: all {faults.count} rows are malformed (skipped with skip_malformed)"
            else:
                fault = "no rows: the file is empty" if _size(path) == 0 else "no rows: the file holds no data rows"
            raise DataFormatError(path.name, 0, fault)
        self.skipped[path.name] = faults.count
        if faults.count and path.name not in self._warned:
            self._warned.add(path.name)
            log.warning("%s: skipped %d malformed rows", path, faults.count)
        self.truncated[path.name] = dict(faults.truncated)
        if faults.truncated and ("truncated", path.name) not in self._warned:
            self._warned.add(("truncated", path.name))
            lengths = {s.feature: s.max_length for s in getattr(self.fmt, "sparse", ())}
            cut = ", ".join(f"{n} of {f!r} to {lengths.get(f)}" for f, n in faults.truncated.items())
            log.warning("%s: truncated histories (kept the most recent ids): %s", path, cut)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"no {split!r} split; have {', '.join(self.splits)}")

    def chunks(self, split: str) -> Iterator[TensorSplit]:
        """Streams the rows of ``split`` as splits of a few thousand rows."""
        for chunk in self.rows(split):
            yield chunk.data

    def rows(self, split: str) -> Iterator[Chunk]:
        """Streams the rows of ``split`` in file order as :class:`Chunk`
        objects: the data, each row's line in its file, and the format's
        passthrough columns (``extra``; see :meth:`for_scoring`)."""
        self._check_split(split)
        if self.fractions is None:
            for path in self.files[split]:
                yield from self._read_file(path)
            return
        which = SPLITS.index(split)
        for k, path in enumerate(self.files["file"]):
            for chunk in self._read_file(path):
                mask = split_of_lines(chunk.lines, self.fractions, self.split_seed * 1_000_003 + k) == which
                if mask.any():
                    idx = np.nonzero(mask)[0]
                    extra = None if chunk.extra is None else chunk.extra.take(idx)
                    yield Chunk(take_rows(chunk.data, torch.from_numpy(idx)), chunk.lines[idx], extra)

    @property
    def scorable(self) -> bool:
        """Whether :meth:`for_scoring` applies (CSV and Parquet formats)."""
        return isinstance(self.fmt, TabularFormat)

    def for_scoring(self, keep_columns: Sequence[str] = ()) -> FileSource:
        """This source over the same files for scoring: a label column a file
        lacks gives NaN labels for its task, and ``keep_columns`` are passed
        through in each chunk of :meth:`rows` (``Chunk.extra``). CSV and
        Parquet formats only: ValueError for another (libFM lines always
        hold a label and no other column)."""
        if not isinstance(self.fmt, TabularFormat):
            raise ValueError("only csv and parquet data can be scored without labels or keep columns")
        fmt = attrs.evolve(self.fmt, optional_labels=True, passthrough=tuple(keep_columns))
        return FileSource(
            fmt,
            self.task_names,
            self.files,
            fractions=self.fractions,
            split_seed=self.split_seed,
            streaming=self.streaming,
            skip_malformed=self.skip_malformed,
            shuffle_buffer=self.shuffle_buffer,
            partitions=self.partitions,
        )

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
        seq = set(getattr(self.fmt, "sequence", ())) | {
            s.feature for s in getattr(self.fmt, "sparse", ()) if s.sequence
        }
        nd = len(getattr(self.fmt, "dense", ()))
        return make_split(
            keys,
            np.zeros((0, len(keys) - len(seq)), np.int64),
            np.zeros((0, nd), np.float32),
            np.zeros((0, len(self.task_names)), np.float32),
            {k: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for k in keys if k in seq},
        )

    # ---------------------------------------------------------- DataSource

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        max_batches: int | None = None,
    ) -> Iterator[Batch]:
        """Batches of ``split``; shuffled in memory by (seed, epoch), or within
        a buffer of ``shuffle_buffer`` rows when streaming."""
        self._check_split(split)
        if not self.streaming:
            return self.load(split).batches(
                batch_size, shuffle=shuffle, seed=seed, epoch=epoch, max_batches=max_batches
            )
        return rebatch(
            self.chunks(split),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            buffer_rows=self.shuffle_buffer,
            max_batches=max_batches,
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
        """Rows of ``split`` (streaming: from the Parquet footers, else one
        counting pass; cached)."""
        if not self.streaming:
            return len(self.load(split))
        if split not in self._counts:
            if self.fractions is None:
                self._counts[split] = sum(self.rows_of(p) for p in self.files[split])
            else:
                self._counts[split] = sum(len(p) for p in self.chunks(split))
        return self._counts[split]

    def rows_of(self, path: Path) -> int:
        """Rows of one file: a Parquet file's footer says (unless malformed
        rows are skipped); any other is counted by reading it (cached)."""
        if path not in self._file_rows:
            n = None
            if getattr(self.fmt, "kind", None) == "parquet" and not self.skip_malformed:
                n = _parquet_rows(path)
            if n is None:
                n = sum(len(c) for c in self._read_file(path))
            self._file_rows[path] = n
        return self._file_rows[path]

    def rank_shard(self, rank: int, world_size: int) -> RankShard | None:
        """Rank ``rank``'s shard for distributed training
        (:class:`~smt_host.data.filesets.RankShard`): its own train files,
        divided among the ranks by rows (:func:`~smt_host.data.filesets.balance`).
        None where a shard does not apply: one process, a split by fraction
        (``file`` + ``split``), or fewer train files than ranks (every rank
        then reads the whole split and takes its slice of each batch)."""
        if world_size < 2 or self.fractions is not None or len(self.files.get("train", ())) < world_size:
            return None
        files = self.files["train"]
        rows = [self.rows_of(p) for p in files]
        mine = balance(rows, world_size)[rank]
        own = FileSource(
            self.fmt,
            self.task_names,
            {"train": [files[i] for i in mine]},
            streaming=self.streaming,
            skip_malformed=self.skip_malformed,
            shuffle_buffer=self.shuffle_buffer,
            partitions=self.partitions,
        )
        return RankShard(self, rank, world_size, own, [rows[i] for i in mine], sum(rows))


def _parquet_rows(path: Path) -> int | None:
    """Rows of a Parquet file from its footer (None if it cannot be read:
    the reader then names the fault)."""
    try:
        return parquet_fragment(path).metadata.num_rows
    except READ_ERRORS:
        return None


# ---------------------------------------------------------------- options

#: one file path or a list of them (a bare string becomes a 1-tuple)
FilePaths = NewType("FilePaths", tuple[str, ...])
#: ``true``, ``false`` or ``"auto"``
Streaming = bool | Literal["auto"]


def _as_paths(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return value  # refused by _check_paths, as written


def _check_paths(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple):
        raise FieldValueError(attribute.name, f"expected a file path or a list of them, got {value!r}")
    if not value:
        raise FieldValueError(attribute.name, "expected at least one file")


def _paths_field() -> Any:
    return attrs.field(default=None, converter=_as_paths, validator=_check_paths)


def _check_split(inst: Any, attribute: attrs.Attribute, value: tuple[float, ...] | None) -> None:
    if value is not None and (len(value) not in (2, 3) or min(value) < 0 or abs(sum(value) - 1.0) > 1e-6):
        raise FieldValueError(
            attribute.name,
            f"expected [train, valid, test] fractions summing to 1 (each >= 0; the test one "
            f"may be left out), got {list(value)!r}",
        )


def _check_streaming(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, bool) or value == "auto"):
        raise FieldValueError(attribute.name, f'must be true, false or "auto", got {value!r}')


def _one_char(inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and len(value) != 1:
        raise FieldValueError(attribute.name, f"must be one character, got {value!r}")


@attrs.frozen(kw_only=True)
class FileOptions:
    """Options shared by every file source. Each path is a file, a glob
    (``"day_*.parquet"``, ``**`` spans folders) or a folder (every file
    below it not named ``.*`` or ``_*``; ``key=value`` folders add
    partition columns), relative to the data folder (see
    ``smt_host/data/filesets.py``).

    Attributes:
        train: files, globs or folders of the train split (required unless
            ``file`` is given); in a distributed run each rank reads its
            own share of the files.
        valid: files, globs or folders of the validation split.
        test: files, globs or folders of the test split.
        file: files, globs or folders cut into the three splits by
            ``split`` (instead of ``train``/``valid``/``test``).
        split: ``[train, valid, test]`` fractions of ``file``, summing to 1
            (two: the test fraction is 0).
        split_seed: seed of the row-to-split hash.
        schema: a TOML file of options merged under the inline ones (read
            before structuring; relative to the data folder, then to the
            spec file's folder).
        streaming: ``True`` (read from disk on every pass), ``False`` (load
            each split once) or ``"auto"`` (stream above ``stream_above_mb``).
        stream_above_mb: size in MiB above which ``"auto"`` streams (a
            ``.gz`` file counts 4 times its size).
        shuffle_buffer: rows shuffled together when streaming.
        skip_malformed: skip malformed rows (counted in
            ``FileSource.skipped``) instead of raising DataFormatError.
        chunk_rows: rows per chunk read (libFM lines, Parquet batch rows).
    """

    train: FilePaths | None = _paths_field()
    valid: FilePaths | None = _paths_field()
    test: FilePaths | None = _paths_field()
    file: FilePaths | None = _paths_field()
    split: tuple[float, ...] | None = attrs.field(default=None, validator=_check_split)
    split_seed: int = 0
    schema: str | None = None
    streaming: Streaming = attrs.field(default="auto", validator=_check_streaming)
    stream_above_mb: float = attrs.field(default=512, validator=at_least(0))
    shuffle_buffer: int = attrs.field(default=262_144, validator=at_least(1))
    skip_malformed: bool = False
    chunk_rows: int = attrs.field(default=65_536, validator=at_least(1))

    @property
    def fractions(self) -> tuple[float, float, float] | None:
        """``split`` as three fractions (None without ``split``)."""
        if self.split is None:
            return None
        return tuple(float(x) for x in self.split) + (0.0,) * (3 - len(self.split))  # type: ignore[return-value]


@attrs.frozen(kw_only=True)
class LibfmField:
    """One libFM field: the global ids ``start..end`` (inclusive).

    Attributes:
        name: the field's name (a sparse feature of the model reads the
            field of its name).
        start: its first global id (>= 0).
        end: its last global id, inclusive; or give
        size: the number of ids instead (``end = start + size - 1``).
    """

    name: str
    start: int = attrs.field(validator=at_least(0))
    end: int | None = None
    size: int | None = attrs.field(default=None, validator=at_least(1))

    def __attrs_post_init__(self) -> None:
        if (self.end is None) == (self.size is None):
            raise FieldValueError("end", "give one of 'end' (inclusive) or 'size'")
        if self.last < self.start:
            raise FieldValueError("end", f"must be >= start ({self.start}), got {self.end!r}")

    @property
    def last(self) -> int:
        return self.end if self.end is not None else self.start + self.size - 1  # type: ignore[operator]


def _check_fields(inst: Any, attribute: attrs.Attribute, value: tuple[LibfmField, ...]) -> None:
    if not value:
        raise FieldValueError(attribute.name, "must list at least one field ({ name, start, end })")
    by_start = sorted(value, key=lambda f: f.start)
    for a, b in zip(by_start, by_start[1:]):
        if b.start <= a.last:
            raise FieldValueError(
                attribute.name, f"field ranges overlap: {a.name!r} {a.start}-{a.last} and {b.name!r} {b.start}-{b.last}"
            )
    names = [f.name for f in value]
    if len(set(names)) != len(names):
        raise FieldValueError(attribute.name, f"field names repeat: {names}")


@attrs.frozen(kw_only=True)
class LibfmOptions(FileOptions):
    """Options of the ``libfm`` source: :class:`FileOptions` and

    Attributes:
        fields: the declared fields (ranges must not overlap, names must not
            repeat); each sparse feature of the model needs the field of its
            name, no larger than its ``vocab_size``; other fields are read,
            checked and dropped.
    """

    fields: tuple[LibfmField, ...] = attrs.field(validator=_check_fields)


@attrs.frozen
class ColumnOptions:
    """How one feature reads its column (``[data.options.features.NAME]``);
    each unset key takes the source's default.

    Attributes:
        column: the column to read (default: the feature's name).
        encode: sparse ids: "hash", "mod" or "int" (a history: default its candidate's).
        separator: between the items of a sequence cell.
        transform: dense values: "none" or "log1p".
        order: a history's item order in the file: "oldest_first" or "newest_first".
    """

    column: str | None = None
    encode: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*ENCODINGS)))
    separator: str | None = None
    transform: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*TRANSFORMS)))
    order: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*ORDERS)))


@attrs.frozen(kw_only=True)
class TabularOptions(FileOptions):
    """Options of the ``parquet`` source and base of the CSV ones:
    :class:`FileOptions` and

    Attributes:
        encode: how sparse cells become ids: "hash" (FNV-1a 64 into
            ``1..vocab_size-1``), "mod" (integer modulo ``vocab_size``) or
            "int" (integer in ``[0, vocab_size)``).
        transform: dense values: "none" or "log1p".
        separator: between the items of a sequence cell.
        order: how a history (a sequence feature) lists its ids in the
            file: "oldest_first" (the default: the last id is the most
            recent, as logs append) or "newest_first"; the host keeps them
            most recent first and cuts them to ``max_length``.
        features: per-feature overrides, feature name -> :class:`ColumnOptions`
            (each name must be a feature of the model).
        labels: task name -> label column (default: the task's label name;
            each name must be a task of the model).
    """

    encode: str = attrs.field(default="hash", validator=one_of(*ENCODINGS))
    transform: str = attrs.field(default="none", validator=one_of(*TRANSFORMS))
    separator: str = "^"
    order: str = attrs.field(default="oldest_first", validator=one_of(*ORDERS))
    features: dict[str, ColumnOptions] = attrs.Factory(dict)
    labels: dict[str, str] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class CsvOptions(TabularOptions):
    """Options of the ``csv`` source: :class:`TabularOptions` and

    Attributes:
        delimiter: one character (None: sniffed, tab if the first line has
            one, else comma).
        header: whether the first line names the columns (None: yes unless
            its first cell is a number).
        column_names: the columns of a file without header.
        block_bytes: bytes per block read.
    """

    delimiter: str | None = attrs.field(default=",", validator=_one_char)
    header: bool | None = True
    column_names: tuple[str, ...] | None = None
    block_bytes: int = attrs.field(default=1 << 22, validator=at_least(1))


@attrs.frozen(kw_only=True)
class CriteoOptions(CsvOptions):
    """Options of the ``criteo`` source: :class:`CsvOptions` with the
    defaults of raw Criteo TSV (no header, columns ``label, I1..I13,
    C1..C26``), which also read a Criteo CSV with a header.

    Attributes:
        transform: "log1p".
        delimiter: sniffed (None).
        header: sniffed (None).
        column_names: :data:`CRITEO_COLUMNS`.
    """

    transform: str = attrs.field(default="log1p", validator=one_of(*TRANSFORMS))
    delimiter: str | None = attrs.field(default=None, validator=_one_char)
    header: bool | None = None
    column_names: tuple[str, ...] | None = CRITEO_COLUMNS


#: the options class of each file source
OPTIONS: dict[str, type[FileOptions]] = {
    "libfm": LibfmOptions,
    "criteo": CriteoOptions,
    "csv": CsvOptions,
    "parquet": TabularOptions,
}


def _tables_only(cls: type, inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``inner`` (the converter's hook for ``cls``), refusing a value that is
    not a table with a message naming the keys."""
    keys = ", ".join(a.name for a in attrs.fields(cls))

    def hook(value: Any, t: Any) -> Any:
        if not isinstance(value, Mapping):
            problem = ValueError(f"expected a table with keys {keys}, got {value!r}")
            raise ClassValidationError(f"While structuring {cls.__name__}", [problem], cls)
        return inner(value, t)

    return hook


def _is_str_table(t: Any) -> bool:
    return typing.get_origin(t) is dict and typing.get_args(t)[:1] == (str,)


def _str_table(t: Any, conv: cattrs.Converter) -> Callable[[Any, Any], dict]:
    """``dict[str, X]`` whose errors name the key as a path step
    (``features.price.encode``, like ``models.<m>``)."""
    item_type = typing.get_args(t)[1]

    def hook(value: Any, _t: Any) -> dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table, got {value!r}")
        out, errors = {}, []
        for key, item in value.items():
            try:
                out[key] = conv.structure(item, item_type)
            except Exception as exc:  # noqa: BLE001 - gathered and reported by path
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    AttributeValidationNote(f"key {key!r}", key, item_type),
                ]
                errors.append(exc)
        if errors:
            raise ClassValidationError(f"While structuring {t}", errors, dict)
        return out

    return hook


@functools.cache
def _converter() -> cattrs.Converter:
    conv = make_converter()
    conv.register_structure_hook(FilePaths, lambda value, _t: value)  # checked by the field's converter/validator
    conv.register_structure_hook(Streaming, lambda value, _t: value)
    conv.register_structure_hook_factory(_is_str_table, _str_table)
    for cls in (LibfmField, ColumnOptions):
        conv.register_structure_hook(cls, _tables_only(cls, conv.get_structure_hook(cls)))
    return conv


def _fail(model: ModelSpec, eco: EcosystemSpec, message: str, key: str = "") -> typing.NoReturn:
    raise ConfigError([f"{message} @ $.models.{model.name}.data.options{'.' + key if key else ''}"], eco.source)


def _schema(model: ModelSpec, eco: EcosystemSpec, value: Any) -> dict:
    """The options of a schema file (``schema = "..."``)."""
    if not isinstance(value, str):
        _fail(model, eco, f"expected a path to a TOML file, got {value!r}", "schema")
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
                    _fail(model, eco, f"invalid TOML in schema {c}: {exc}", "schema")
            data.pop("schema", None)
            return data
    _fail(model, eco, f"schema file not found (looked at {', '.join(map(str, candidates))})", "schema")


def parse_options(model: ModelSpec, eco: EcosystemSpec, kind: str) -> FileOptions:
    """``model.data.options`` (with its schema file merged under them)
    structured as ``OPTIONS[kind]``; ConfigError at ``$.models.<m>.data.options``."""
    raw = dict(model.data.options)
    if "schema" in raw:
        raw = {**_schema(model, eco, raw["schema"]), **raw}
    return structure(_converter(), raw, OPTIONS[kind], f"$.models.{model.name}.data.options", eco.source)


# ------------------------------------------------- checks against the model


def _resolve(
    model: ModelSpec, eco: EcosystemSpec, paths: Sequence[str], key: str, partitions: dict[Path, dict[str, str]]
) -> list[Path]:
    """The files ``paths`` name (files, globs, folders: :func:`~smt_host.data.filesets.expand`),
    in order, each once; their partition columns go into ``partitions``."""
    out: dict[Path, None] = {}
    for v in paths:
        try:
            found = expand(v, data_dir())
        except FileSetError as exc:
            _fail(model, eco, str(exc), key)
        for p, parts in found:
            if not p.is_file():
                _fail(model, eco, f"data file not found: {p} (set SMT_DATA_DIR; data folder is {data_dir()})", key)
            if not os.access(p, os.R_OK):
                _fail(model, eco, f"data file cannot be read (permission denied): {p}", key)
            out[p] = None
            if parts:
                partitions[p] = parts
    return list(out)


def _files(
    model: ModelSpec, eco: EcosystemSpec, o: FileOptions, partitions: dict[Path, dict[str, str]]
) -> dict[str, list[Path]]:
    """The files of each split (``{"file": [...]}`` with ``split``); the
    partition columns of each file go into ``partitions``."""
    if o.file is not None:
        clash = [k for k in SPLITS if getattr(o, k) is not None]
        if clash:
            _fail(model, eco, f"give either 'file' with 'split' or {', '.join(map(repr, clash))}, not both", "file")
        if o.split is None:
            _fail(model, eco, "'file' needs split = [train, valid, test] fractions summing to 1", "split")
        return {"file": _resolve(model, eco, o.file, "file", partitions)}
    if o.split is not None:
        _fail(model, eco, "'split' needs 'file' (one file split by fraction)", "split")
    if o.train is None:
        _fail(model, eco, "required field missing (give 'train', or 'file' with 'split')", "train")
    return {k: _resolve(model, eco, getattr(o, k), k, partitions) for k in SPLITS if getattr(o, k) is not None}


def _check_file_set(
    model: ModelSpec,
    eco: EcosystemSpec,
    fmt: TabularFormat,
    key: str,
    paths: Sequence[Path],
    partitions: Mapping[Path, Mapping[str, str]],
) -> None:
    """Refuses a set of Parquet files (one split) with a file that lacks a
    feature column or has a partition key that is also one of its columns,
    or whose needed columns have types that do not unify across files. A
    file whose footer cannot be read is left to the reader (a
    DataFormatError naming it); CSV files are checked as they are read."""
    features = {s.column for s in fmt.sparse} | {d.column for d in fmt.dense}
    first: dict[str, tuple[pa.DataType, Path]] = {}
    for p in paths:
        parts = partitions.get(p, {})
        if fmt.kind != "parquet":
            continue
        try:
            schema = parquet_fragment(p).physical_schema
        except READ_ERRORS:
            continue
        both = sorted(set(parts) & set(schema.names))
        if both:
            _fail(model, eco, f"{p}: column {both[0]!r} is both in the file and a partition folder", key)
        missing = sorted(c for c in features if c not in schema.names and c not in parts)
        if missing:
            _fail(model, eco, f"{p}: missing column {missing[0]!r} (of {len(paths)} files of the split)", key)
        for c in fmt.needed_columns():
            if c not in schema.names:
                continue
            t = schema.field(c).type
            if c not in first:
                first[c] = (t, p)
                continue
            t0, p0 = first[c]
            if t != t0:
                try:
                    pa.unify_schemas([pa.schema([(c, t0)]), pa.schema([(c, t)])], promote_options="permissive")
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    _fail(model, eco, f"mixed schemas: column {c!r} is {t0} in {p0} but {t} in {p}", key)


def _streams(o: FileOptions, files: Mapping[str, Sequence[Path]]) -> bool:
    if isinstance(o.streaming, bool):
        return o.streaming
    size = sum(p.stat().st_size * (4 if p.suffix == ".gz" else 1) for ps in files.values() for p in ps)
    return size > o.stream_above_mb * 2**20


def _libfm_format(model: ModelSpec, eco: EcosystemSpec, o: LibfmOptions) -> LibfmFormat:
    if len(model.tasks) != 1:
        _fail(model, eco, f"libfm files hold one label, but the model has {len(model.tasks)} tasks")
    if model.features.dense:
        _fail(model, eco, "libfm files hold no dense features; remove [features].dense")
    if model.features.sequence:
        _fail(model, eco, "libfm files hold no histories; remove [features].sequence (or use csv or parquet)")
    fields = tuple(Field(f.name, f.start, f.last) for f in o.fields)
    by_name = {f.name: f for f in fields}
    for feat in model.features.sparse:
        fld = by_name.get(feat.name)
        if fld is None:
            _fail(model, eco, f"sparse feature {feat.name!r} has no field; fields are {', '.join(by_name)}", "fields")
        if fld.size > feat.vocab_size:
            _fail(
                model,
                eco,
                f"field {feat.name!r} spans {fld.size} ids but the feature's vocab_size is {feat.vocab_size}",
                "fields",
            )
    return LibfmFormat(
        fields=fields,
        keys=tuple(f.name for f in model.features.sparse),
        sequence=frozenset(f.name for f in model.features.sparse if f.sequence),
        chunk_rows=o.chunk_rows,
    )


def _tabular_format(model: ModelSpec, eco: EcosystemSpec, o: TabularOptions) -> TabularFormat:
    known = (
        {f.name for f in model.features.sparse}
        | {f.name for f in model.features.dense}
        | {f.name for f in model.features.sequence}
    )
    for name in o.features:
        if name not in known:
            _fail(model, eco, f"no feature named {name!r} in the model", f"features.{name}")
    for name in o.labels:
        if name not in model.task_names:
            _fail(model, eco, f"no task named {name!r} in the model", f"labels.{name}")

    def per(name: str, key: str, default: Any) -> Any:
        value = getattr(o.features.get(name, ColumnOptions()), key)
        return default if value is None else value

    sparse = tuple(
        SparseColumn(
            feature=f.name,
            column=per(f.name, "column", f.name),
            vocab_size=f.vocab_size,
            encode=per(f.name, "encode", o.encode),
            sequence=f.sequence,
            separator=per(f.name, "separator", o.separator),
        )
        for f in model.features.sparse
    ) + tuple(
        SparseColumn(
            feature=h.name,
            column=per(h.name, "column", h.name),
            vocab_size=model.candidate_of(h).vocab_size,
            encode=per(h.name, "encode", per(h.candidate, "encode", o.encode)),
            sequence=True,
            separator=per(h.name, "separator", o.separator),
            max_length=h.max_length,
            order=per(h.name, "order", o.order),
        )
        for h in model.features.sequence
    )
    dense = tuple(
        DenseColumn(f.name, per(f.name, "column", f.name), per(f.name, "transform", o.transform))
        for f in model.features.dense
    )
    labels = tuple(o.labels.get(t.name, t.label_name) for t in model.tasks)
    if not isinstance(o, CsvOptions):
        return TabularFormat("parquet", sparse, dense, labels, chunk_rows=o.chunk_rows)
    return TabularFormat(
        "csv",
        sparse,
        dense,
        labels,
        delimiter=o.delimiter,
        header=o.header,
        column_names=tuple(o.column_names) if o.column_names else None,
        block_bytes=o.block_bytes,
    )


def open_file_source(model: ModelSpec, eco: EcosystemSpec, kind: str) -> FileSource:
    """Builds the ``kind`` file source of ``model`` (ConfigError on bad options)."""
    o = parse_options(model, eco, kind)
    fmt = _libfm_format(model, eco, o) if isinstance(o, LibfmOptions) else _tabular_format(model, eco, o)
    partitions: dict[Path, dict[str, str]] = {}
    files = _files(model, eco, o, partitions)
    if isinstance(fmt, TabularFormat):
        for key, paths in files.items():
            if len(paths) > 1 or any(p in partitions for p in paths):
                _check_file_set(model, eco, fmt, key, paths, partitions)
    elif partitions:
        p, parts = next(iter(partitions.items()))
        _fail(model, eco, f"{p}: partition folders ({', '.join(parts)}) need the csv or parquet source", "train")
    return FileSource(
        fmt,
        model.task_names,
        files,
        fractions=o.fractions,
        split_seed=o.split_seed,
        streaming=_streams(o, files),
        skip_malformed=o.skip_malformed,
        shuffle_buffer=o.shuffle_buffer,
        partitions=partitions,
    )
