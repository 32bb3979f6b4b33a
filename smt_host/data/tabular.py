"""CSV / TSV (Criteo) and Parquet files, read in record batches with pyarrow.

Each feature of the model reads one column:

* sparse: ``encode = "hash"`` (FNV-1a 64 of the UTF-8 text, mapped into
  ``1..vocab_size-1``), ``"mod"`` (integer id modulo ``vocab_size``) or
  ``"int"`` (integer id that must lie in ``[0, vocab_size)``). An empty or
  missing cell gives the reserved id 0.
* sequence (``SparseFeature.sequence``): a text column of items joined by
  ``separator`` (default ``^``) or a Parquet list column; each item is encoded
  as above and the row becomes a jagged feature (possibly empty).
* history (``SequenceFeature``): read as a sequence column with its
  candidate's vocabulary (and, unless overridden, its candidate's
  ``encode``), then put most recent first: a file lists each history in
  the column's ``order``, ``"oldest_first"`` (the default: the last item is
  the most recent) or ``"newest_first"``. A history longer than its
  ``max_length`` keeps its most recent ``max_length`` items; such rows are
  counted (``RowFaults.truncated``, reported once per file).
* dense: a float; ``transform = "log1p"`` gives log(1 + x) for x >= 0 and 0
  for x < 0; an empty cell gives 0.
* labels: one column per task, values -1/0/1 (as text or numbers) -> 0/1;
  with ``optional_labels`` (scoring data) a label column the file lacks
  gives NaN labels for its task.
* ``passthrough`` columns (ids to carry to the output of a scoring run) are
  read as they are (CSV: text) into :attr:`Chunk.extra`, one row per row kept.

CSV files are streamed with ``pyarrow.csv.open_csv`` (``.gz`` decompressed on
the fly); every column is read as text so a bad cell can be reported with its
line. Parquet files are streamed with ``ParquetFile.iter_batches``; their
"line" is the 1-based row number. A row whose columns are all empty (a blank
line) is dropped silently. A CSV line that is not UTF-8 is a malformed row; a
file that cannot be read (truncated gzip data, not a Parquet file...) is a
:class:`DataFormatError` naming it (see :mod:`smt_host.data.files`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import attrs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smt_host.data.chunks import Chunk, FaultSet, RowFaults, make_split
from smt_host.data.files import READ_ERRORS, Utf8CheckedStream, decode_line, open_binary, read_error
from smt_host.errors import DataFormatError

ENCODINGS = ("hash", "mod", "int")
TRANSFORMS = ("none", "log1p")


@attrs.frozen
class SparseColumn:
    feature: str
    column: str
    vocab_size: int
    encode: str = "hash"
    sequence: bool = False
    separator: str = "^"
    #: a history (SequenceFeature): keep the most recent max_length items; None: not a history
    max_length: int | None = None
    #: a history's item order in the file: "oldest_first" or "newest_first"
    order: str = "oldest_first"


ORDERS = ("oldest_first", "newest_first")


@attrs.frozen
class DenseColumn:
    feature: str
    column: str
    transform: str = "none"


@attrs.frozen
class TabularFormat:
    """Reads CSV/TSV or Parquet files for a model.

    Args:
        kind: ``"csv"`` or ``"parquet"``.
        sparse: the model's sparse features, in spec order.
        dense: the model's dense features, in spec order.
        labels: the label column of each task, in task order.
        delimiter: CSV delimiter; None sniffs the first line (tab if it has one, else comma).
        header: whether the first CSV line names the columns; None: yes unless its first cell is a number.
        column_names: names of the columns of a file without header.
        block_bytes: bytes per CSV block; chunk_rows: rows per Parquet batch.
        optional_labels: a label column missing from a file gives NaN labels
            for its task instead of an error (scoring data without labels).
        passthrough: columns read as they are into each chunk's ``extra``
            table (ids to pass through to predictions).
        partition: ``(key, value)`` text columns of the file being read, from
            its hive-style ``key=value`` folders (set per file by :meth:`read`).
    """

    kind: str
    sparse: tuple[SparseColumn, ...]
    dense: tuple[DenseColumn, ...]
    labels: tuple[str, ...]
    delimiter: str | None = ","
    header: bool | None = True
    column_names: tuple[str, ...] | None = None
    block_bytes: int = 1 << 22
    chunk_rows: int = 65_536
    optional_labels: bool = False
    passthrough: tuple[str, ...] = ()
    partition: tuple[tuple[str, str], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.feature for s in self.sparse)

    def needed_columns(self) -> list[str]:
        cols = list(self.labels) + [s.column for s in self.sparse] + [d.column for d in self.dense]
        return list(dict.fromkeys(cols + list(self.passthrough)))

    def columns_in(self, names: list[str], file: str, line: int) -> list[str]:
        """The columns to read of a file whose columns are ``names``: the
        needed ones, less the label columns it lacks when labels are
        optional (the file's partition columns are not read from it). A
        missing column, or a partition key that is also a column of the
        file, is a DataFormatError at ``file:line``."""
        keys = [k for k, _ in self.partition]
        both = [k for k in keys if k in names]
        if both:
            raise DataFormatError(file, line, f"column {both[0]!r} is both in the file and a partition folder")
        names = [*names, *keys]
        absent = [c for c in self.needed_columns() if c not in names]
        optional = set(self.labels) - {s.column for s in self.sparse} - {d.column for d in self.dense}
        missing = [c for c in absent if not (self.optional_labels and c in optional)]
        if missing:
            raise DataFormatError(
                file,
                line,
                f"missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                f"the file has {len(names)} columns: {', '.join(names)}",
            )
        return [c for c in self.needed_columns() if c not in absent and c not in keys]

    def read(self, path: Path, faults: RowFaults, partitions: Mapping[str, str] | None = None) -> Iterator[Chunk]:
        """The chunks of the file ``path``; ``partitions``: its partition
        columns ``{key: value}`` (each row gets them as text cells)."""
        if partitions:
            return attrs.evolve(self, partition=tuple(partitions.items())).read(path, faults)
        if self.kind == "parquet":
            return self._read_parquet(path, faults)
        return self._read_csv(path, faults)

    # ------------------------------------------------------------------- csv

    def _layout(self, path: Path) -> tuple[str, bool, list[str]]:
        """(delimiter, has header, column names) of a CSV file."""
        try:
            with open_binary(path) as f:
                raw = f.readline()
        except READ_ERRORS as exc:
            raise read_error(path.name, 0, exc) from exc
        if not raw:
            raise DataFormatError(path.name, 0, "the file is empty")
        first, fault = decode_line(raw.rstrip(b"\r\n"))
        if fault is not None:  # sniffed as it is; a row of data that is not UTF-8 is reported as such later
            first = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        delimiter = self.delimiter or ("\t" if "\t" in first else ",")
        cells = next(csv.reader([first], delimiter=delimiter)) if first else []
        header = self.header
        if header is None:
            header = not (cells and _is_number(cells[0]))
        if header and fault is not None:  # the header names the columns: it must be text
            raise DataFormatError(path.name, 1, fault)
        if header:
            names = cells
        elif self.column_names:
            names = list(self.column_names)
        else:
            raise DataFormatError(path.name, 0, "the file has no header: set the 'column_names' option")
        self.columns_in(names, path.name, 1 if header else 0)
        return delimiter, header, names

    def _read_csv(self, path: Path, faults: RowFaults) -> Iterator[Chunk]:
        delimiter, header, names = self._layout(path)
        try:
            stream = Utf8CheckedStream(open_binary(path), path.name)
        except READ_ERRORS as exc:
            raise read_error(path.name, 0, exc) from exc
        with stream:
            yield from self._csv_chunks(stream, path, faults, delimiter, header, names)

    def _csv_chunks(
        self,
        stream: Utf8CheckedStream,
        path: Path,
        faults: RowFaults,
        delimiter: str,
        header: bool,
        names: list[str],
    ) -> Iterator[Chunk]:
        import pyarrow.csv as pacsv

        invalid: list[tuple[int, str]] = []  # (row number, fault) of rows with a wrong field count

        def on_invalid(row) -> str:
            invalid.append((row.number or 0, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
            return "skip"

        def fail(exc: BaseException) -> DataFormatError:
            # reading the file failed (truncated gzip data...): the stream knows the line
            return stream.error if stream.error is not None else read_error(path.name, 0, exc)

        needed = self.columns_in(names, path.name, 1 if header else 0)
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(
                    use_threads=False,
                    block_size=self.block_bytes,
                    column_names=None if header else names,
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False
                ),
                convert_options=pacsv.ConvertOptions(
                    include_columns=needed,
                    column_types={c: pa.string() for c in needed},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except READ_ERRORS as exc:
            raise fail(exc) from exc
        seen = 0  # rows returned so far
        first_row = 2 if header else 1
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except READ_ERRORS as exc:
                raise fail(exc) from exc
            n = batch.num_rows
            base = first_row + seen + np.arange(n, dtype=np.int64)
            seen += n
            inv = np.sort(np.asarray([r for r, _ in invalid], dtype=np.int64))
            shift = inv - np.arange(len(inv), dtype=np.int64)
            lines = base + np.searchsorted(shift, base, side="right")
            last = int(lines[-1]) if n else int(inv.max(initial=0))
            due = [(r, stream.bad.pop(r, m)) for r, m in invalid if r <= last]  # not UTF-8: that is the fault
            invalid[:] = [(r, m) for r, m in invalid if r > last]
            not_utf8 = {}
            if stream.bad:
                hit = np.nonzero(np.isin(lines, np.fromiter(stream.bad, dtype=np.int64)))[0]
                not_utf8 = {int(i): stream.bad.pop(int(lines[i])) for i in hit}
            chunk = self._convert(batch, lines, faults, due, blank_rows=True, known=not_utf8)
            if chunk is not None:
                yield chunk
        if invalid:
            faults.report([r for r, _ in invalid], [stream.bad.pop(r, m) for r, m in invalid])
        if stream.bad:  # lines pyarrow did not return (e.g. inside a quoted field)
            faults.report(list(stream.bad), list(stream.bad.values()))

    # --------------------------------------------------------------- parquet

    def _read_parquet(self, path: Path, faults: RowFaults) -> Iterator[Chunk]:
        import pyarrow.parquet as pq

        try:
            if path.stat().st_size == 0:
                raise DataFormatError(path.name, 0, "the file is empty")
            pf = pq.ParquetFile(str(path))
        except READ_ERRORS as exc:
            raise _parquet_error(path, 0, exc) from exc
        columns = self.columns_in(pf.schema_arrow.names, path.name, 0)
        seen = 0
        batches = pf.iter_batches(batch_size=self.chunk_rows, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except READ_ERRORS as exc:
                raise _parquet_error(path, seen + 1, exc) from exc
            lines = np.arange(seen + 1, seen + 1 + batch.num_rows, dtype=np.int64)
            seen += batch.num_rows
            chunk = self._convert(batch, lines, faults, [], blank_rows=False)
            if chunk is not None:
                yield chunk

    # ------------------------------------------------------------ conversion

    def _convert(
        self,
        batch: pa.RecordBatch,
        lines: np.ndarray,
        faults: RowFaults,
        extra: list[tuple[int, str]],
        blank_rows: bool,
        known: dict[int, str] | None = None,
    ) -> Chunk | None:
        """``extra``: (line, fault) of rows not in ``batch``; ``known``: {row: fault}
        of rows of ``batch`` already known to be malformed (not UTF-8)."""
        n = batch.num_rows
        fs = FaultSet(n)
        for r, message in (known or {}).items():
            fs.add(r, message)
        col = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
        for key, value in self.partition:  # the same text in every row
            col[key] = pa.array([value], pa.string()).take(np.zeros(n, dtype=np.int64))
        labels = np.full((n, len(self.labels)), np.nan, dtype=np.float32)  # NaN: the file has no such column
        for t, name in enumerate(self.labels):
            if name in col:
                labels[:, t] = _labels(col[name], name, fs)
        singles, jagged = [], {}
        for s in self.sparse:
            if s.sequence:
                jagged[s.feature] = _sequence(col[s.column], s, fs)
            else:
                singles.append(_ids(col[s.column], s, fs))
        dense = np.zeros((n, len(self.dense)), dtype=np.float32)
        for j, d in enumerate(self.dense):
            dense[:, j] = _dense(col[d.column], d, fs)

        good = fs.good_mask()
        if blank_rows and n:
            empty = np.ones(n, dtype=bool)
            for a in batch.columns:  # a row's own cells: a partition column is never blank
                empty &= _empty(a)
            good &= ~empty
            for r in np.nonzero(empty)[0]:
                if known is None or int(r) not in known:
                    fs.messages.pop(int(r), None)
        rows = sorted(fs.messages)
        faults.report(
            [int(lines[r]) for r in rows] + [r for r, _ in extra],
            [fs.messages[r] for r in rows] + [m for _, m in extra],
        )
        if not good.any():
            return None
        ids = np.stack(singles, axis=1)[good] if singles else np.zeros((int(good.sum()), 0), np.int64)
        jag = {}
        histories = {s.feature: s for s in self.sparse if s.max_length is not None}
        for name, (values, lengths, parents) in jagged.items():
            if name in histories:
                h = histories[name]
                values, lengths, parents, cut = recent_first(values, lengths, parents, h.max_length, h.order)
                n_cut = int((cut & good).sum())
                if n_cut:
                    faults.truncated[name] = faults.truncated.get(name, 0) + n_cut
            jag[name] = (values[good[parents]], lengths[good])
        extra = None
        if self.passthrough:
            extra = pa.table({name: col[name] for name in self.passthrough}).filter(pa.array(good))
        return Chunk(make_split(self.keys, ids, dense[good], labels[good], jag), lines[good], extra)


def _parquet_error(path: Path, line: int, exc: BaseException) -> DataFormatError:
    err = read_error(path.name, line, exc)
    if isinstance(exc, pa.ArrowException) and not isinstance(exc, DataFormatError):
        return DataFormatError(path.name, line, f"not a readable Parquet file ({err.fault})")
    return err


# ------------------------------------------------------------------ encoders


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_text(a: pa.Array) -> bool:
    return pa.types.is_string(a.type) or pa.types.is_large_string(a.type)


def _empty(a: pa.Array) -> np.ndarray:
    """(n,) bool: null or (text) blank cells."""
    if _is_text(a):
        e = pc.equal(pc.utf8_trim_whitespace(a), "")
        e = pc.or_kleene(e, pc.is_null(a))
        return np.asarray(pc.fill_null(e, True).to_numpy(zero_copy_only=False), dtype=bool)
    return np.asarray(pc.is_null(a).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(a: pa.Array, fs: FaultSet, bad: Callable[[str], str]) -> tuple[np.ndarray, np.ndarray]:
    """(values (n,) float64 with NaN where empty, empty (n,) bool); bad text
    cells are reported with ``bad(text)``."""
    empty = _empty(a)
    if _is_text(a):
        s = pc.if_else(pa.array(empty), pa.scalar(None, a.type), pc.utf8_trim_whitespace(a))
        try:
            v = pc.cast(s, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            out = np.full(len(a), np.nan)
            for i, x in enumerate(s.to_pylist()):
                if x is None:
                    continue
                try:
                    out[i] = float(x)
                except ValueError:
                    fs.add(i, bad(x))
            return out, empty
    else:
        v = pc.cast(a, pa.float64())
    return np.asarray(v.to_numpy(zero_copy_only=False), dtype=np.float64), empty


def _labels(a: pa.Array, column: str, fs: FaultSet) -> np.ndarray:
    v, empty = _floats(a, fs, lambda x: f"label {x!r} in column {column!r} is not a number")
    for i in np.nonzero(empty)[0]:
        fs.add(i, f"empty label in column {column!r}")
    wrong = ~empty & ~np.isin(v, (-1.0, 0.0, 1.0))  # NaN too; "not a number" rows keep that message
    for i in np.nonzero(wrong)[0]:
        fs.add(i, f"label {_text(a, i)!r} in column {column!r} is not -1, 0 or 1")
    return (v > 0).astype(np.float32)


def _dense(a: pa.Array, d: DenseColumn, fs: FaultSet) -> np.ndarray:
    v, _ = _floats(a, fs, lambda x: f"column {d.column!r}: {x!r} is not a number")
    v = np.where(np.isnan(v), 0.0, v)
    if d.transform == "log1p":
        v = np.log1p(np.maximum(v, 0.0))
    return v.astype(np.float32)


def _text(a: pa.Array, i: int) -> str:
    x = a[i].as_py()
    return "" if x is None else str(x)


def fnv1a64(a: pa.Array) -> np.ndarray:
    """(n,) uint64 FNV-1a hash of the UTF-8 bytes of each cell (null = "")."""
    a = pc.fill_null(pc.cast(a, pa.large_binary()), b"")
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    n = len(a)
    bufs = a.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=n + 1, offset=a.offset * 8)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(int(lengths.max(initial=0))):
        idx = np.nonzero(lengths > j)[0]
        h[idx] = (h[idx] ^ data[starts[idx] + j].astype(np.uint64)) * prime
    return h


def _hash_ids(a: pa.Array, vocab_size: int) -> np.ndarray:
    """(n,) int64 ids in 1..vocab_size-1; empty / null cells give 0."""
    text = a if _is_text(a) else pc.cast(a, pa.string())
    text = pc.fill_null(text, "")
    enc = pc.dictionary_encode(text)
    words = enc.dictionary
    if vocab_size > 1:
        hashed = (fnv1a64(words) % np.uint64(vocab_size - 1)).astype(np.int64) + 1
    else:
        hashed = np.zeros(len(words), dtype=np.int64)
    blank = _empty(words)
    hashed[blank] = 0
    return hashed[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]


def _int_ids(a: pa.Array, s: SparseColumn, fs: FaultSet, rows: np.ndarray | None = None) -> np.ndarray:
    """(n,) int64 ids of an integer column (``mod``: modulo vocab_size, ``int``:
    must be in range); empty cells give 0. ``rows`` maps cell i to its row."""
    rows = np.arange(len(a)) if rows is None else rows
    empty = _empty(a)
    out = np.zeros(len(a), dtype=np.int64)
    src = a
    if _is_text(a):
        src = pc.if_else(pa.array(empty), pa.scalar(None, a.type), pc.utf8_trim_whitespace(a))
    try:
        v = np.asarray(pc.fill_null(pc.cast(src, pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        values = None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        v, values = None, src.to_pylist()
    if v is not None:
        if s.encode == "mod":
            out = np.where(empty, 0, np.mod(v, s.vocab_size))
        else:
            bad = ~empty & ((v < 0) | (v >= s.vocab_size))
            for i in np.nonzero(bad)[0]:
                fs.add(rows[i], f"column {s.column!r}: id {int(v[i])} is outside [0, {s.vocab_size})")
            out = np.where(empty | bad, 0, v)
        return out
    for i, x in enumerate(values):
        if empty[i]:
            continue
        try:
            k = int(x)
        except (TypeError, ValueError):
            try:
                f = float(x)
            except (TypeError, ValueError):
                f = float("nan")
            if not f.is_integer():
                fs.add(rows[i], f"column {s.column!r}: {x!r} is not an integer id")
                continue
            k = int(f)
        if s.encode == "mod":
            out[i] = k % s.vocab_size
        elif 0 <= k < s.vocab_size:
            out[i] = k
        else:
            fs.add(rows[i], f"column {s.column!r}: id {k} is outside [0, {s.vocab_size})")
    return out


def _ids(a: pa.Array, s: SparseColumn, fs: FaultSet, rows: np.ndarray | None = None) -> np.ndarray:
    if s.encode == "hash":
        return _hash_ids(a, s.vocab_size)
    return _int_ids(a, s, fs, rows)


def recent_first(
    values: np.ndarray, lengths: np.ndarray, parents: np.ndarray, max_length: int, order: str = "oldest_first"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A jagged history column put most recent first and cut to ``max_length``.

    Args:
        values: (total,) ids, row after row, each row in the file's ``order``.
        lengths: (n,) items per row.
        parents: (total,) the row of each value (ascending).
        max_length: items kept per row (its most recent).
        order: ``"oldest_first"`` (a row's last item is its most recent) or
            ``"newest_first"``.

    Returns:
        (values, lengths, parents, truncated): the kept ids most recent first,
        the new lengths, their rows, and (n,) bool, the rows that lost items.

    Example:
        >>> v, n, p, cut = recent_first(np.array([1, 2, 3, 7]), np.array([3, 0, 1]), np.array([0, 0, 0, 2]), 2)
        >>> v.tolist(), n.tolist(), p.tolist(), cut.tolist()
        ([3, 2, 7], [2, 0, 1], [0, 0, 2], [True, False, False])
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    starts = np.cumsum(lengths) - lengths  # (n,)
    pos = np.arange(len(values)) - starts[parents]  # (total,) place of each item in its row, as in the file
    if order == "oldest_first":
        pos = lengths[parents] - 1 - pos  # 0 = the most recent
    keep = pos < max_length
    kept_rows, kept_pos = parents[keep], pos[keep]
    perm = np.lexsort((kept_pos, kept_rows))  # by row, then most recent first
    return values[keep][perm], np.minimum(lengths, max_length), kept_rows[perm], lengths > max_length


def _sequence(a: pa.Array, s: SparseColumn, fs: FaultSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (total,), lengths (n,), parents (total,) row of each value)."""
    n = len(a)
    if pa.types.is_list(a.type) or pa.types.is_large_list(a.type):
        lists = a
    else:
        text = pc.fill_null(a if _is_text(a) else pc.cast(a, pa.string()), "")
        lists = pc.split_pattern(text, s.separator)
    items = pc.list_flatten(lists)
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), dtype=np.int64)
    keep = ~_empty(items)
    items = items.filter(pa.array(keep))
    parents = parents[keep]
    values = _ids(items, s, fs, parents)
    lengths = np.bincount(parents, minlength=n).astype(np.int64)
    return values, lengths, parents
