"""StagingPool: reuse, the bound on sets out at once, and never a deadlock."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from paramhub.ps.staging import StagingPool


def _counting_allocator():
    made = []

    def allocate():
        made.append([torch.zeros(4)])
        return made[-1]

    return allocate, made


def test_released_sets_are_reused():
    allocate, made = _counting_allocator()
    pool = StagingPool(allocate)
    first = pool.acquire()
    pool.release(first)
    assert pool.acquire() is first
    assert len(made) == 1


@pytest.mark.timeout(10)
def test_a_push_beyond_the_limit_waits_for_a_released_set():
    allocate, made = _counting_allocator()
    pool = StagingPool(allocate, keep=2, limit=2, stale_s=30)
    held = [pool.acquire(), pool.acquire()]
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.2)
    assert not got, "a third set was handed out while two young ones were out"
    pool.release(held[0])
    waiter.join(timeout=5)
    assert got == [held[0]] and len(made) == 2


@pytest.mark.timeout(10)
def test_a_set_held_past_stale_s_stops_counting_so_nothing_deadlocks():
    # An SSP push keeps its set while it waits for a slower worker, whose push must still get one.
    allocate, made = _counting_allocator()
    pool = StagingPool(allocate, keep=1, limit=1, stale_s=0.3)
    parked = pool.acquire()
    started = time.monotonic()
    fresh = pool.acquire()
    assert fresh is not parked and len(made) == 2
    assert 0.2 < time.monotonic() - started < 3
    pool.release(fresh)
    pool.release(parked)  # beyond keep: dropped
    assert pool.outstanding == 0 and pool.acquire() is fresh


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        StagingPool(lambda: [], limit=0)
