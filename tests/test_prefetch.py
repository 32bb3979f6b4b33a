"""Batches built off the training thread (smt_host.train.prefetch)."""

from __future__ import annotations

import threading
import time

import pytest

from smt_host.train.prefetch import prefetched


def test_order_and_every_item_are_kept():
    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))


def test_items_are_built_ahead_in_another_thread():
    made_in = []

    def items():
        for i in range(4):
            made_in.append(threading.current_thread().name)
            yield i

    it = prefetched(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)  # the producer fills the queue meanwhile
    assert len(made_in) >= 3 and set(made_in) == {"smt-prefetch"}
    assert list(it) == [1, 2, 3]


def test_an_error_reaches_the_consumer_at_its_item():
    def items():
        yield 1
        yield 2
        raise ValueError("train.csv:3: bad label")

    it = prefetched(items())
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ValueError, match="train.csv:3: bad label"):
        next(it)


def test_closing_early_stops_the_producer():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetched(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count <= 3 + 2 + 1
    assert not any(t.name == "smt-prefetch" and t.is_alive() for t in threading.enumerate())


def test_depth_zero_iterates_in_the_calling_thread():
    seen = []

    def items():
        seen.append(threading.current_thread().name)
        yield 1

    assert list(prefetched(items(), depth=0)) == [1]
    assert seen == [threading.current_thread().name]
