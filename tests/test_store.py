"""ps/store.py: versions, readers, and recycling the memory of versions nobody reads."""

from __future__ import annotations

import threading

import pytest
import torch

from paramhub.common.codec import whole_regions
from paramhub.common.layout import BUFFER, PARAM, Layout
from paramhub.ps.consistency import StagedPush, SyncRounds
from paramhub.ps.registry import WorkerRegistry
from paramhub.ps.rules import SGDRule
from paramhub.ps.store import ParameterStore

pytestmark = pytest.mark.timeout(60)

LAYOUT = Layout.from_entries([("w", torch.float32, (6,), PARAM), ("bn", torch.float32, (2,), BUFFER)])


def store_at(value: float) -> ParameterStore:
    return ParameterStore(LAYOUT, [torch.full((6,), value), torch.full((2,), value)])


def regions(value: float) -> list[torch.Tensor]:
    return [torch.full((6,), value), torch.full((2,), value)]


def test_an_old_version_nobody_reads_is_reclaimed_once():
    store = store_at(0.0)
    first = store.snapshot().regions
    store.publish(regions(1.0))
    spare = store.reclaim()
    assert [t.data_ptr() for t in spare] == [t.data_ptr() for t in first]
    assert store.reclaim() is None  # handed out once


def test_a_version_being_read_is_not_reclaimed_until_its_reader_is_done():
    store = store_at(0.0)
    with store.reading() as snap:
        store.publish(regions(1.0))
        store.publish(regions(2.0))
        spare = store.reclaim()  # version 1: nobody reads it
        assert spare is not None and torch.equal(spare[0], torch.full((6,), 1.0))
        assert store.reclaim() is None  # version 0 is still being read
        assert torch.equal(snap.regions[0], torch.zeros(6))
    spare = store.reclaim()
    assert spare is not None and spare[0].data_ptr() == snap.regions[0].data_ptr()


def test_a_region_carried_into_the_new_version_is_never_spare():
    store = store_at(0.0)
    kept = store.snapshot().regions[1]
    store.publish([torch.ones(6), kept])
    spare = store.reclaim()
    assert spare[0] is not None and spare[1] is None


def test_reading_waits_for_the_version_asked_for():
    store = store_at(0.0)
    threading.Timer(0.05, store.publish, args=(regions(1.0),)).start()
    with store.reading(min_version=1, timeout=10) as snap:
        assert snap.version == 1 and torch.equal(snap.regions[0], torch.ones(6))
    with store.reading(min_version=5, timeout=0.01) as snap:  # the wait ends first: the newest there is
        assert snap.version == 1


def _round(engine, push_ids, version: int, value: float, sequence: int) -> None:
    for worker in push_ids:
        engine.submit(StagedPush(worker, 1, sequence, version, 1, 0.0,
                                 whole_regions([torch.full((6,), value), torch.full((2,), value)])))


def test_sync_rounds_reuse_two_buffers_and_never_touch_a_version_being_read():
    """Steady rounds allocate nothing of the model's size; a slow reader still sees its version intact."""
    store = store_at(0.0)
    registry = WorkerRegistry(lease_timeout=10.0)
    workers = [registry.join(f"w{i}", 1, False, i).worker_id for i in range(2)]
    engine = SyncRounds(store, SGDRule(lr=0.5, momentum=0.9), registry, num_workers=2)
    seen = set()
    for version in range(6):
        _round(engine, workers, version, 1.0, version + 1)
        seen.add(store.snapshot().regions[0].data_ptr())
    assert len(seen) == 2  # the weights alternate between two buffers: the sums and the weights
    reference = torch.zeros(6)
    buf = None
    for _ in range(6):
        buf = torch.ones(6) if buf is None else buf * 0.9 + 1
        reference = reference - 0.5 * buf
    torch.testing.assert_close(store.snapshot().regions[0], reference)

    with store.reading() as slow:  # a pull still streaming version 6
        held = slow.regions[0].clone()
        for version in range(6, 10):
            _round(engine, workers, version, 1.0, version + 1)
        assert torch.equal(slow.regions[0], held)
        assert slow.regions[0].data_ptr() not in {store.snapshot().regions[0].data_ptr()}
