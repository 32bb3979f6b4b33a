"""Batches built off the training thread: a bounded background producer.

The readers build each batch (parsing, id checks, the ``KeyedJaggedTensor``)
in Python and numpy, which mostly release the GIL in their inner loops; the
training step runs in torch's own threads. :func:`prefetched` runs the
batch iterator in a daemon thread, ``depth`` batches ahead, so building the
next batch overlaps the current step. The order of the items is unchanged,
so a run is bit-identical with and without it.

An exception in the producer is raised in the consumer, at the item where it
happened, with its own traceback; closing the generator early (``break``,
an error in the step, ``max_batches``) stops the producer.

Example:
    >>> list(prefetched(iter(range(5)), depth=2))
    [0, 1, 2, 3, 4]
    >>> def bad():
    ...     yield 1
    ...     raise ValueError("row 2: bad label")
    >>> it = prefetched(bad())
    >>> next(it)
    1
    >>> next(it)
    Traceback (most recent call last):
    ...
    ValueError: row 2: bad label
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``items``, produced by a background thread up to ``depth`` ahead.

    Args:
        items: any iterable (typically ``DataSource.batches(...)``).
        depth: how many items may wait ready; 0 iterates in the calling thread.
    """
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Raised(exc))
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="smt-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)
        close = getattr(items, "close", None)
        if close is not None and not worker.is_alive():
            close()
