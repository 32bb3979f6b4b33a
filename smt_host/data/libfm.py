"""libSVM / libFM text files: ``label id:value id:value ...``.

Labels -1/1 or 0/1 become 0/1. Ids are global; each field owns a declared
contiguous range ``[start, end]`` (``end`` inclusive) and a field's ids are
made local (``id - start``). A single-valued feature needs exactly one id in
its field per row; a ``sequence`` feature takes any number (jagged). Values
are ignored (binary features). Fields that no feature of the model uses are
read and checked but dropped. Files are read line by line in chunks of
``chunk_rows`` lines; ``.gz`` files are decompressed on the fly. A line that
is not UTF-8 is a malformed row; a file that cannot be read (truncated gzip
data, a folder, no permission) is a :class:`DataFormatError` naming it.
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import attrs
import numpy as np

from smt_host.data.chunks import Chunk, FaultSet, RowFaults, make_split
from smt_host.data.files import READ_ERRORS, decode_lines, open_binary, read_error

_LABELS = {"1": 1.0, "+1": 1.0, "-1": 0.0, "0": 0.0}


@attrs.frozen
class Field:
    """Global ids ``start..end`` (inclusive)."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def open_text(path: Path) -> IO[str]:
    """Opens a text file, decompressing ``.gz`` (the readers read bytes, with
    :func:`smt_host.data.files.open_binary`)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


@attrs.frozen
class LibfmFormat:
    """Reads libFM files for a model.

    Args:
        fields: every declared field (ranges must not overlap).
        keys: the model's sparse feature names, in spec order; each names a field.
        sequence: the keys that are jagged (multi-valued) features.
        chunk_rows: lines per chunk.
    """

    fields: tuple[Field, ...]
    keys: tuple[str, ...]
    sequence: frozenset[str] = frozenset()
    chunk_rows: int = 65_536

    def read(self, path: Path, faults: RowFaults) -> Iterator[Chunk]:
        """Yields chunks: ids (n, S) local ids, labels (n, 1), dense (n, 0).

        Raises:
            DataFormatError: a malformed row (unless ``faults`` skips it), or
                a file that cannot be read (line 0, or the line reached).
        """
        try:
            f = open_binary(path)
        except READ_ERRORS as exc:
            raise read_error(faults.name, 0, exc) from exc
        with f:
            first = 1
            while True:
                raw: list[bytes] = []
                try:
                    raw.extend(itertools.islice(f, self.chunk_rows))  # keeps the lines read before a fault
                except READ_ERRORS as exc:
                    reached = first + len(raw)
                    raise read_error(faults.name, reached if reached > 1 else 0, exc) from exc
                if not raw:
                    return
                lines, bad = decode_lines(raw)
                chunk = self._parse(lines, first, faults, bad)
                first += len(lines)
                if chunk is not None:
                    yield chunk

    # ------------------------------------------------------------------ parse

    def _parse(
        self, lines: Sequence[str], first: int, faults: RowFaults, bad: dict[int, str] | None = None
    ) -> Chunk | None:
        """``bad``: {index: fault} of lines already known to be malformed (not UTF-8)."""
        n = len(lines)
        fs = FaultSet(n)
        for i, message in (bad or {}).items():
            fs.add(i, message)
        labels = np.zeros(n, dtype=np.float32)
        counts = np.zeros(n, dtype=np.int64)
        ids: list[int] = []
        blank = np.zeros(n, dtype=bool)
        for i, line in enumerate(lines):
            toks = line.split()
            if not toks:
                blank[i] = True  # a line in ``bad`` too: its fault is reported, no other
                continue
            lab = _LABELS.get(toks[0])
            if lab is None:
                lab = _parse_label(toks[0], fs, i)
            labels[i] = lab
            try:
                if line.count(":") != len(toks) - 1:
                    raise ValueError
                row = [int(t.partition(":")[0]) for t in toks[1:]]
            except ValueError:
                row = _parse_pairs_slow(toks[1:], fs, i)
            ids.extend(row)
            counts[i] = len(row)
        all_ids = np.asarray(ids, dtype=np.int64)
        rows = np.repeat(np.arange(n), counts)

        # field of each id (fields sorted by start)
        order = sorted(range(len(self.fields)), key=lambda k: self.fields[k].start)
        starts = np.asarray([self.fields[k].start for k in order], dtype=np.int64)
        ends = np.asarray([self.fields[k].end for k in order], dtype=np.int64)
        pos = np.searchsorted(starts, all_ids, side="right") - 1
        inside = (pos >= 0) & (all_ids <= ends[np.maximum(pos, 0)])
        if not inside.all():
            for j in np.nonzero(~inside)[0]:
                fs.add(rows[j], f"id {int(all_ids[j])} is outside every declared field range")
        field = np.asarray(order, dtype=np.int64)[np.maximum(pos, 0)]  # index into self.fields
        nf = len(self.fields)
        ok_rows, ok_field, ok_ids = rows[inside], field[inside], all_ids[inside]
        per = np.bincount(ok_rows * nf + ok_field, minlength=n * nf).reshape(n, nf)

        by_name = {f.name: k for k, f in enumerate(self.fields)}
        singles = [k for k in self.keys if k not in self.sequence]
        for key in singles:
            k = by_name[key]
            bad = np.nonzero((per[:, k] != 1) & ~blank)[0]
            fs.add_many(
                bad,
                lambda r, k=k, key=key: (
                    f"no id in field {key!r}" if per[r, k] == 0 else f"{per[r, k]} ids in single-valued field {key!r}"
                ),
            )

        good = fs.good_mask() & ~blank
        line_no = np.arange(first, first + n, dtype=np.int64)
        fs.flush(faults, line_no)
        if not good.any():
            return None

        local = ok_ids - np.asarray([f.start for f in self.fields], dtype=np.int64)[ok_field]
        single_ids = np.zeros((n, len(singles)), dtype=np.int64)
        for c, key in enumerate(singles):
            m = ok_field == by_name[key]
            single_ids[ok_rows[m], c] = local[m]
        jagged = {}
        for key in self.keys:
            if key in self.sequence:
                m = (ok_field == by_name[key]) & good[ok_rows]
                jagged[key] = (local[m], per[good, by_name[key]])
        data = make_split(
            self.keys,
            single_ids[good],
            np.zeros((int(good.sum()), 0), np.float32),
            labels[good, None],
            jagged,
        )
        return Chunk(data, line_no[good])


def _parse_label(tok: str, fs: FaultSet, i: int) -> float:
    try:
        value = float(tok)
    except ValueError:
        fs.add(i, f"label {tok!r} is not a number")
        return 0.0
    if value not in (-1.0, 0.0, 1.0):
        fs.add(i, f"label {tok!r} is not -1, 0 or 1")
        return 0.0
    return 1.0 if value > 0 else 0.0


def _parse_pairs_slow(toks: Sequence[str], fs: FaultSet, i: int) -> list[int]:
    out = []
    for t in toks:
        key, sep, _ = t.partition(":")
        if not sep or ":" in _:
            fs.add(i, f"pair {t!r} is not id:value")
            continue
        try:
            out.append(int(key))
        except ValueError:
            fs.add(i, f"id {key!r} in pair {t!r} is not an integer")
    return out
