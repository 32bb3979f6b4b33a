"""Batches and in-memory splits.

A batch is (dense (B, Nd) float32, sparse ``KeyedJaggedTensor`` with one key
per sparse feature in spec order then one per sequence feature (a history,
most recent id first), labels (B, T) float32 in {0, 1}).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import attrs
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@attrs.frozen
class Batch:
    """One batch of examples.

    Args:
        dense: (B, Nd) float32; Nd may be 0.
        sparse: ``KeyedJaggedTensor`` with keys = sparse feature names.
        labels: (B, T) float32.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.dense.to(device), self.sparse.to(device), self.labels.to(device))


@attrs.frozen
class Jagged:
    """A variable-length (sequence / multi-hot) column: ``values`` (total,)
    int64 and ``offsets`` (N + 1,) int64."""

    values: torch.Tensor
    offsets: torch.Tensor

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths) of the rows ``idx``, in that order."""
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        if int(lengths.sum()) == 0:
            return torch.empty(0, dtype=torch.int64), lengths
        # positions of every value: start of its row + 0..len-1
        row = torch.repeat_interleave(torch.arange(len(idx)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        pos = starts[row] + (torch.arange(int(lengths.sum())) - first[row])
        return self.values[pos], lengths


@attrs.frozen
class TensorSplit:
    """One split held in memory.

    Args:
        dense: (N, Nd) float32.
        ids: (N, S) int64, one id per single-valued sparse feature, columns in
            ``keys`` order for the features not in ``jagged``.
        keys: sparse feature names, in the spec's order (all of them).
        labels: (N, T) float32.
        jagged: sequence / multi-hot features, by name.
    """

    dense: torch.Tensor
    ids: torch.Tensor
    keys: tuple[str, ...]
    labels: torch.Tensor
    jagged: Mapping[str, Jagged] = attrs.Factory(dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor) -> Batch:
        """Gathers rows ``idx`` into a :class:`Batch`."""
        b = len(idx)
        if not self.jagged:
            ids = self.ids[idx]  # (B, S)
            values = ids.t().reshape(-1)
            lengths = torch.ones(values.numel(), dtype=torch.int32)
        else:
            vals, lens = [], []
            col = 0
            for key in self.keys:
                if key in self.jagged:
                    v, n = self.jagged[key].take(idx)
                else:
                    v, n = self.ids[idx, col], torch.ones(b, dtype=torch.int64)
                    col += 1
                vals.append(v)
                lens.append(n)
            values = torch.cat(vals)
            lengths = torch.cat(lens).to(torch.int32)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(self.keys), values=values, lengths=lengths)
        return Batch(self.dense[idx], kjt, self.labels[idx])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        max_batches: int | None = None,
    ) -> Iterator[Batch]:
        """Yields batches; with ``shuffle`` the order depends only on
        (seed, epoch), so a resumed run sees the same batches."""
        n = len(self)
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        count = 0
        for start in range(0, n, batch_size):
            if max_batches is not None and count >= max_batches:
                return
            yield self.batch(order[start : start + batch_size])
            count += 1


class DataSource(Protocol):
    """What the trainer needs from a model's data.

    ``splits`` are ``"train"``, ``"valid"`` and ``"test"``.
    """

    task_names: Sequence[str]

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        max_batches: int | None = None,
    ) -> Iterator[Batch]: ...

    def base_rates(self) -> torch.Tensor:
        """(T,) positive rate of each task on the train split (for NE)."""
        ...


@attrs.define
class InMemorySource:
    """A :class:`DataSource` over :class:`TensorSplit` objects."""

    splits: Mapping[str, TensorSplit]
    task_names: Sequence[str]
    #: rows whose history was cut to its max_length, by origin then feature
    truncated: dict[str, dict[str, int]] = attrs.Factory(dict)

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
        try:
            data = self.splits[split]
        except KeyError:
            raise ValueError(f"no {split!r} split; have {', '.join(self.splits)}") from None
        return data.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, max_batches=max_batches)

    def base_rates(self) -> torch.Tensor:
        return self.splits["train"].labels.mean(dim=0)

    def num_examples(self, split: str) -> int:
        return len(self.splits[split])
