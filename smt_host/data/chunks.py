"""Pieces shared by the file readers: row faults, chunks of rows, and
concatenating / slicing :class:`TensorSplit` objects.

A reader turns a file into a stream of :class:`Chunk` objects (a few
thousand rows each), so a file never has to fit in memory. Shapes: n rows
in a chunk, S single-valued sparse features, Nd dense features, T tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from smt_host.data.batch import Batch, Jagged, TensorSplit
from smt_host.errors import DataFormatError

log = logging.getLogger("smt_host.data.readers")


class RowFaults:
    """Collects the malformed rows of one pass over one file.

    Without ``skip`` the first fault (lowest line) raises
    :class:`DataFormatError`; with ``skip`` the rows are dropped and counted.
    """

    def __init__(self, path: Path, skip: bool) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.skip = skip
        self.count = 0
        #: rows whose history was longer than its max_length (truncated), by feature
        self.truncated: dict[str, int] = {}

    def report(self, lines: Sequence[int], messages: Sequence[str]) -> None:
        """Reports faults at 1-based ``lines`` (same length as ``messages``)."""
        if not len(lines):
            return
        if not self.skip:
            i = int(np.argmin(np.asarray(lines)))
            raise DataFormatError(self.name, int(lines[i]), messages[i])
        self.count += len(lines)

    def error(self, line: int, message: str) -> DataFormatError:
        return DataFormatError(self.name, line, message)


@attrs.frozen
class Chunk:
    """Rows read from a file: ``data`` (n rows), ``lines`` (n,) int64, the
    1-based line number of each row (used to split one file by fraction), and
    ``extra``, a ``pyarrow.Table`` of n rows holding the format's passthrough
    columns (None without them)."""

    data: TensorSplit
    lines: np.ndarray
    extra: Any = None

    def __len__(self) -> int:
        return len(self.data)


class FaultSet:
    """Per-chunk faults: the first message for each faulty row index."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.messages: dict[int, str] = {}

    def add(self, row: int, message: str) -> None:
        self.messages.setdefault(int(row), message)

    def add_many(self, rows: Iterable[int], message_of) -> None:
        for r in rows:
            r = int(r)
            if r not in self.messages:
                self.messages[r] = message_of(r)

    def good_mask(self) -> np.ndarray:
        """(n,) bool: rows without a fault."""
        mask = np.ones(self.n, dtype=bool)
        if self.messages:
            mask[np.fromiter(self.messages, dtype=np.int64)] = False
        return mask

    def flush(self, faults: RowFaults, lines: np.ndarray) -> None:
        """Hands the faults to ``faults`` with their line numbers."""
        if self.messages:
            rows = sorted(self.messages)
            faults.report([int(lines[r]) for r in rows], [self.messages[r] for r in rows])


# ------------------------------------------------------------- TensorSplit ops


def make_split(
    keys: tuple[str, ...],
    ids: np.ndarray,
    dense: np.ndarray,
    labels: np.ndarray,
    jagged: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> TensorSplit:
    """Builds a :class:`TensorSplit` from numpy arrays.

    Args:
        ids: (n, S) int64 single-valued ids, in ``keys`` order minus the jagged keys.
        dense: (n, Nd) float32.
        labels: (n, T) float32.
        jagged: name -> (values (total,) int64, lengths (n,) int64).
    """
    jag: dict[str, Jagged] = {}
    for name, (values, lengths) in (jagged or {}).items():
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        jag[name] = Jagged(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), torch.from_numpy(offsets))
    return TensorSplit(
        dense=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        ids=torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
        keys=keys,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
        jagged=jag,
    )


def take_rows(split: TensorSplit, idx: torch.Tensor) -> TensorSplit:
    """The rows ``idx`` (int64 (k,)) of ``split``, as a new split."""
    jag = {}
    for name, j in split.jagged.items():
        values, lengths = j.take(idx)
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        jag[name] = Jagged(values, offsets)
    return TensorSplit(
        dense=split.dense[idx],
        ids=split.ids[idx],
        keys=split.keys,
        labels=split.labels[idx],
        jagged=jag,
    )


def concat_splits(parts: Sequence[TensorSplit]) -> TensorSplit:
    """Concatenates splits with the same keys, row-wise."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    jag = {}
    for name in first.jagged:
        values = torch.cat([p.jagged[name].values for p in parts])
        lengths = torch.cat([p.jagged[name].offsets.diff() for p in parts])
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        jag[name] = Jagged(values, offsets)
    return TensorSplit(
        dense=torch.cat([p.dense for p in parts]),
        ids=torch.cat([p.ids for p in parts]),
        keys=first.keys,
        labels=torch.cat([p.labels for p in parts]),
        jagged=jag,
    )


def rebatch(
    splits: Iterable[TensorSplit],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    buffer_rows: int = 262_144,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """Turns a stream of splits into batches of ``batch_size`` rows.

    Without ``shuffle`` the batches are the rows in order (the same batches as
    ``TensorSplit.batches`` on the concatenation). With ``shuffle`` rows are
    permuted inside a buffer of about ``buffer_rows`` rows; the order depends
    only on (seed, epoch).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch) if shuffle else None
    fill = max(buffer_rows, batch_size) if shuffle else batch_size
    pending: list[TensorSplit] = []
    n_pending = 0
    count = 0

    def emit(buf: TensorSplit, final: bool) -> Iterator[Batch]:
        n = len(buf)
        order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
        stop = n if final else n - n % batch_size
        for start in range(0, stop, batch_size):
            yield buf.batch(order[start : start + batch_size])
        if stop < n:
            pending.append(take_rows(buf, order[stop:]))

    for part in splits:
        if len(part) == 0:
            continue
        pending.append(part)
        n_pending += len(part)
        if n_pending >= fill:
            buf = concat_splits(pending)
            pending.clear()
            for b in emit(buf, final=False):
                if max_batches is not None and count >= max_batches:
                    return
                yield b
                count += 1
            n_pending = sum(len(p) for p in pending)
    if pending:
        buf = concat_splits(pending)
        pending.clear()
        for b in emit(buf, final=True):
            if max_batches is not None and count >= max_batches:
                return
            yield b
            count += 1


def split_of_lines(lines: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """(n,) int64 split index (0 train, 1 valid, 2 test) of each line number:
    a fixed hash of (seed, line), so the assignment does not depend on chunking."""
    x = lines.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
    # splitmix64 finalizer
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
    bounds = np.cumsum(np.asarray(fractions, dtype=np.float64))
    bounds[-1] = 1.0 + 1e-9
    return np.searchsorted(bounds, u, side="right").astype(np.int64)
