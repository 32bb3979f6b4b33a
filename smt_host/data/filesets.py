"""File sets: a split named by a glob, a folder or a partitioned folder, and
each rank's shard of one.

A path in ``[data.options]`` (``train``, ``valid``, ``test`` or ``file``;
a string or a list of them) is one of:

* a file;
* a glob (``*``, ``?``, ``[...]``; ``**`` spans folders), e.g.
  ``"criteo/day_*.parquet"``: the files it matches, in sorted order;
* a folder: every file below it (recursively, in sorted order) whose name,
  and the name of every folder between, does not start with ``.`` or ``_``
  (``_SUCCESS``, ``_metadata``, ``.crc`` files: the convention of Spark,
  Hive and ``pyarrow.dataset``).

Below a folder or a glob's fixed prefix, hive-style folders ``key=value/``
make a partitioned dataset: each file's partition keys become text columns
of its rows (``value`` URL-decoded, as Hive writes it), read as any other
column (``features = { day = { encode = "int" } }``). A partition key may
not also be a column of the file. Partition columns apply to the CSV and
Parquet sources; libFM lines have no named columns.

Relative paths resolve against :func:`smt_host.data.data_dir`. A glob that
matches nothing, a folder without files, a file that is missing or
unreadable, and (Parquet) files of one split whose needed columns are
missing or have types that do not unify (``pyarrow.unify_schemas``,
permissive) are refused when the source opens, each as one
:class:`~smt_host.errors.ConfigError` line naming the file and the option
(``... @ $.models.<m>.data.options.<split>``).

:class:`RankShard` is one rank's view of a file source for distributed
training: the train split's files are divided among the ranks by rows
(:func:`balance`), so each rank reads only its own files; see its
docstring for how every rank gets the same number of batches.
"""

from __future__ import annotations

import glob
import itertools
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from smt_host.data.batch import Batch, TensorSplit
from smt_host.data.chunks import concat_splits, rebatch, take_rows

__all__ = ["RankShard", "balance", "expand", "hidden", "parquet_fragment", "partition_values"]

_GLOB_CHARS = frozenset("*?[")


class FileSetError(ValueError):
    """A path of the options that names no readable file; the message
    names the path (the reader adds the option's ``$.`` path)."""


def hidden(name: str) -> bool:
    """Whether a file or folder name is skipped in a folder (``.x``, ``_x``)."""
    return name.startswith((".", "_"))


def is_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def partition_values(root: Path, path: Path) -> dict[str, str]:
    """The ``key=value`` folders between ``root`` and the file ``path``, as
    ``{key: value}`` (URL-decoded; the deepest wins when a key repeats).

    Example:
        >>> partition_values(Path("/d"), Path("/d/day=2024-01-02/hour=07/part-0.parquet"))
        {'day': '2024-01-02', 'hour': '07'}
    """
    try:
        rel = path.relative_to(root)
    except ValueError:
        return {}
    out = {}
    for part in rel.parts[:-1]:
        key, eq, value = part.partition("=")
        if eq and key:
            out[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return out


def _fixed_prefix(pattern: str) -> Path:
    """The folder a glob's matches lie under: its parts before the first with a wildcard."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda p: not is_glob(p), parts[:-1]))
    return Path(*fixed) if fixed else Path(".")


def _folder_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not hidden(d))
        out.extend(Path(dirpath) / f for f in filenames if not hidden(f))
    return sorted(out)


def expand(value: str, base: Path) -> list[tuple[Path, dict[str, str]]]:
    """The files one path option names, each with its partition values.

    Args:
        value: a file, a glob or a folder (see the module docstring).
        base: the folder relative paths resolve against (the data folder).

    Raises:
        FileSetError: nothing readable is named (the message names the path).
    """
    p = Path(value).expanduser()
    where = "" if p.is_absolute() else f" (relative to the data folder {base}; set SMT_DATA_DIR)"
    p = p if p.is_absolute() else base / p
    if is_glob(value):
        root = _fixed_prefix(str(p))
        found = sorted(Path(f) for f in glob.glob(str(p), recursive=True))
        files = []
        for f in found:
            if f.is_dir():
                files.extend(_folder_files(f))
            else:
                files.append(f)
        if not files:
            raise FileSetError(f"no file matches the pattern {p}{where}")
        return [(f, partition_values(root, f)) for f in files]
    if p.is_dir():
        files = _folder_files(p)
        if not files:
            raise FileSetError(f"the folder {p} holds no data files (names starting with . or _ are skipped){where}")
        return [(f, partition_values(p, f)) for f in files]
    return [(p, {})]


def parquet_fragment(path: Path) -> Any:
    """The ``pyarrow.dataset`` fragment of one local Parquet file: its
    ``physical_schema`` and ``metadata`` (row count) read the footer only."""
    import pyarrow.dataset as ds
    import pyarrow.fs

    return ds.ParquetFileFormat().make_fragment(str(path), filesystem=pyarrow.fs.LocalFileSystem())


def balance(rows: Sequence[int], world_size: int) -> list[list[int]]:
    """Divides files among ranks so that their rows are as even as the files
    allow: largest first, each to the rank with the fewest rows so far (ties:
    the lowest rank). Each rank's files stay in their original order.

    Args:
        rows: rows of each file (F,).

    Returns:
        For each rank, the indices of its files (every file exactly once).

    Example:
        >>> balance([5, 1, 4, 2], 2)
        [[0, 1], [2, 3]]
    """
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += rows[i]
    return [sorted(o) for o in owned]


def _rank_part(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``n`` rows that are this rank's:
    contiguous, as ``smt_host.distributed.parallel.rank_bounds`` slices."""
    return rank * n // world_size, (rank + 1) * n // world_size


def rank_slices(parts: Iterator[TensorSplit], batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
    """This rank's slice of each global batch of ``batch_size`` rows of the
    stream ``parts`` (in order, unshuffled): the batches ``RankSlices`` gives
    for an evaluation split, read by streaming."""
    pending: list[TensorSplit] = []
    n = 0

    def emit(buf: TensorSplit, count: int) -> Iterator[Batch]:
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            lo, hi = _rank_part(size, rank, world_size)
            yield buf.batch(torch.arange(start + lo, start + hi))

    for part in parts:
        if not len(part):
            continue
        pending.append(part)
        n += len(part)
        if n >= batch_size:
            buf = concat_splits(pending)
            whole = n - n % batch_size
            yield from emit(buf, whole)
            pending = [take_rows(buf, torch.arange(whole, n))] if whole < n else []
            n -= whole
    if pending:
        yield from emit(concat_splits(pending), n)


class RankShard:
    """Rank ``rank`` of ``world_size``: a data source over its own files of
    the train split of ``source`` (a :class:`~smt_host.data.readers.FileSource`
    with per-split files; see :meth:`FileSource.rank_shard`).

    Batches take ``batch_size`` as the *global* batch; this rank's batches
    have its share of it (``rank_bounds``: ``(r + 1) * B // W - r * B // W``
    rows). Train: the rows of its own files, shuffled by (seed, epoch, rank)
    as the source shuffles; every rank yields the same number of batches per
    epoch, ``ceil(N / B)`` for N rows over all ranks (capped by
    ``max_batches``), so collective steps line up: a rank whose files run out
    first reads them again (reshuffled), one with more rows leaves the rest
    for that epoch (ranks differ by at most about one file's rows:
    :func:`balance`). Evaluation splits: this rank's slice of each global
    batch, read by streaming (the same rows as slicing the whole batch), so
    metrics gathered over ranks are those of one process.

    A distributed run's data wrapper (``RankSlices``) asks the source for
    ``rank_shard(rank, world_size)`` and, where it is not None, takes this
    rank's batches from it instead of slicing every global batch.

    Attributes:
        files: this rank's train files.
        rows: rows of each of them; total_rows: rows of all ranks' train files.
    """

    def __init__(
        self,
        source: Any,
        rank: int,
        world_size: int,
        own: Any,
        rows: Sequence[int],
        total_rows: int,
    ) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size
        self.own = own
        self.files = tuple(own.files["train"])
        self.rows = tuple(rows)
        self.total_rows = total_rows
        self.task_names = source.task_names

    @property
    def splits(self) -> tuple[str, ...]:
        return self.source.splits

    def steps(self, batch_size: int, max_batches: int | None = None) -> int:
        """Train batches per epoch on every rank."""
        n = -(-self.total_rows // batch_size)
        return n if max_batches is None else min(n, max_batches)

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
        """This rank's batches of ``split``; ``batch_size`` is the global batch."""
        if split != "train":
            source = self.source
            parts = source.chunks(split) if source.streaming else iter([source.load(split)])
            batches = rank_slices(parts, batch_size, self.rank, self.world_size)
            return itertools.islice(batches, max_batches)
        lo, hi = _rank_part(batch_size, self.rank, self.world_size)
        return self._train(max(hi - lo, 1), self.steps(batch_size, max_batches), shuffle, seed, epoch)

    def _train(self, local: int, steps: int, shuffle: bool, seed: int, epoch: int) -> Iterator[Batch]:
        """``steps`` batches of ``local`` rows from passes over this rank's
        files, one after the other (a batch may span two passes)."""
        own = self.own
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + self.rank)

        def passes() -> Iterator[TensorSplit]:
            while True:
                if own.streaming:  # shuffled within the buffer by rebatch
                    yield from own.chunks("train")
                else:
                    split = own.load("train")
                    yield take_rows(split, torch.randperm(len(split), generator=g)) if shuffle else split

        return rebatch(
            passes(),
            local,
            shuffle=shuffle and own.streaming,
            seed=seed * 7919 + self.rank,
            epoch=epoch,
            buffer_rows=min(own.shuffle_buffer, max(sum(self.rows), local)),  # the passes repeat: no more than one
            max_batches=steps,
        )

    def base_rates(self) -> torch.Tensor:
        """(T,) of the whole train split (every rank the same)."""
        return self.source.base_rates()

    def num_examples(self, split: str) -> int:
        """Rows of ``split`` over all ranks."""
        return self.total_rows if split == "train" else self.source.num_examples(split)

    def __getattr__(self, name: str) -> Any:  # skipped, num_skipped...
        return getattr(self.source, name)
