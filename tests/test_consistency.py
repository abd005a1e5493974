"""The consistency engines without sockets: rounds, backup workers, leases, the staleness bound."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
import torch

from paramhub.common.codec import whole_regions
from paramhub.common.layout import PARAM, Layout
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.consistency import AsyncEngine, StagedPush, SyncRounds
from paramhub.ps.registry import WorkerRegistry
from paramhub.ps.rules import SGDRule
from paramhub.ps.store import ParameterStore

pytestmark = pytest.mark.timeout(60)
SIZE = 8


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(engine_cls, workers: int, clock=None, lr: float = 1.0, **kwargs):
    """A store of one PARAM region of SIZE zeros, a registry with ``workers`` joined, an engine."""
    clock = clock or time.monotonic
    layout = Layout.from_entries([("w", torch.float32, (SIZE,), PARAM)])
    store = ParameterStore(layout, [torch.zeros(SIZE)])
    registry = WorkerRegistry(lease_timeout=10.0, clock=clock)
    ids = [registry.join(f"w{i}", 1, False, i).worker_id for i in range(workers)]
    engine = engine_cls(store, SGDRule(lr=lr), registry, clock=clock, **kwargs)
    return engine, ids


class Pusher:
    """Builds StagedPushes with increasing sequence numbers per worker."""

    def __init__(self):
        self.sequence: dict[int, int] = {}

    def __call__(self, worker_id: int, base: int, value: float, samples: int = 1) -> StagedPush:
        self.sequence[worker_id] = self.sequence.get(worker_id, 0) + 1
        return StagedPush(worker_id, 1, self.sequence[worker_id], base, pb.PUSH_KIND_GRADIENT, samples, 0.0,
                          whole_regions([torch.full((SIZE,), float(value))]))


def weights(engine) -> torch.Tensor:
    return engine.store.snapshot().regions[0]


def test_sync_round_closes_after_n_minus_b_and_drops_the_late_push():
    engine, (a, b, c) = make(SyncRounds, 3, num_workers=3, backup_workers=1)
    push = Pusher()
    assert engine.submit(push(a, 0, 1.0)).outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert engine.store.version == 0
    engine.submit(push(b, 0, 3.0))
    assert engine.store.version == 1  # N - b = 2 pushes closed the round
    torch.testing.assert_close(weights(engine), torch.full((SIZE,), -2.0))
    late = engine.submit(push(c, 0, 100.0))
    assert late.outcome == pb.PUSH_OUTCOME_DROPPED and late.next_version == 1
    assert engine.pushes_dropped == 1 and engine.store.version == 1
    torch.testing.assert_close(weights(engine), torch.full((SIZE,), -2.0))


def test_a_dead_worker_does_not_stall_a_sync_round():
    clock = FakeClock()
    engine, (a, b) = make(SyncRounds, 2, clock=clock, num_workers=2)
    push = Pusher()
    engine.submit(push(a, 0, 1.0))
    clock.now = 5.0
    engine.registry.get(a, 1)  # a stays alive; b falls silent
    engine.tick()
    assert engine.store.version == 0
    clock.now = 10.5  # b's lease (10 s) has expired
    engine.tick()
    assert engine.store.version == 1
    assert engine.quorum() == 1


def test_round_timeout_closes_a_round_with_what_arrived():
    clock = FakeClock()
    engine, (a, b) = make(SyncRounds, 2, clock=clock, num_workers=2, round_timeout=3.0)
    engine.submit(Pusher()(a, 0, 2.0))
    clock.now = 2.0
    engine.registry.get(b, 1)  # b is alive, just slow
    engine.tick()
    assert engine.store.version == 0
    clock.now = 3.5
    engine.registry.get(b, 1)
    engine.tick()
    assert engine.store.version == 1


def test_unbounded_async_applies_every_push_on_arrival_and_records_staleness():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=None)
    push = Pusher()
    engine.submit(push(a, 0, 1.0))
    engine.submit(push(b, 0, 1.0))  # based on 0, applied at 1: staleness 1
    engine.submit(push(a, 1, 1.0))  # staleness 1
    assert engine.store.version == 3
    assert [e.staleness for e in engine.ledger.entries] == [0, 1, 1]
    assert engine.ledger.staleness_histogram == {0: 1, 1: 2}


def test_damping_scales_each_update_by_one_over_one_plus_staleness():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=None, damping=True)
    push = Pusher()
    engine.submit(push(a, 0, 1.0))  # w = -1
    engine.submit(push(b, 0, 1.0))  # staleness 1: w = -1 - 0.5
    torch.testing.assert_close(weights(engine), torch.full((SIZE,), -1.5))
    assert [e.scale for e in engine.ledger.entries] == [1.0, 0.5]


def test_a_push_beyond_the_bound_is_dropped_never_applied():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=1)
    push = Pusher()
    engine.submit(push(a, 0, 1.0))
    engine.submit(push(a, 1, 1.0))
    assert engine.store.version == 2
    reply = engine.submit(push(b, 0, 1.0))  # 2 versions stale > 1 (b never pulled, so it blocked nobody)
    assert reply.outcome == pb.PUSH_OUTCOME_DROPPED
    assert engine.ledger.max_staleness <= 1 and engine.store.version == 2


def run_in_thread(fn, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, result


def test_staleness_zero_behaves_exactly_like_sync():
    values = {0: [1.0, 2.0, 3.0], 1: [5.0, -1.0, 0.5]}
    sync, (a, b) = make(SyncRounds, 2, lr=0.1, num_workers=2)
    push = Pusher()
    for step in range(3):
        sync.submit(push(a, step, values[0][step]))
        sync.submit(push(b, step, values[1][step], samples=3))

    async_engine, (a, b) = make(AsyncEngine, 2, lr=0.1, staleness_bound=0, wait_timeout=10)
    push = Pusher()
    for step in range(3):
        async_engine.on_pull(a, step)
        async_engine.on_pull(b, step)
        first, result = run_in_thread(async_engine.submit, push(a, step, values[0][step]))
        # a waits: applying it alone would leave b (pulled at `step`) one version behind
        with async_engine.store.lock:
            assert async_engine.store.lock.wait_for(lambda: async_engine.round_pushes == 1, timeout=5)
        assert async_engine.store.version == step
        async_engine.submit(push(b, step, values[1][step], samples=3))
        first.join(timeout=5)
        assert result["value"].outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert async_engine.store.version == sync.store.version == 3
    torch.testing.assert_close(weights(async_engine), weights(sync), rtol=0, atol=0)
    assert async_engine.ledger.max_staleness == 0


@pytest.mark.parametrize("bound", [1, 2, 4])
def test_ssp_bound_is_never_exceeded_and_fast_workers_wait_instead_of_wasting_work(bound):
    """Four workers, one four times slower than the rest, with random compute times."""
    engine, ids = make(AsyncEngine, 4, lr=0.01, staleness_bound=bound, wait_timeout=30)
    push = Pusher()
    lock = threading.Lock()
    rng = random.Random(bound)
    errors = []

    def worker(worker_id: int, slow: bool, pushes: int):
        try:
            for _ in range(pushes):
                version = engine.store.version
                engine.on_pull(worker_id, version)
                time.sleep(rng.uniform(0.0005, 0.002) * (4 if slow else 1))  # simulated compute
                with lock:
                    staged = push(worker_id, version, 1.0)
                engine.submit(staged)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w, i == 0, 15), daemon=True) for i, w in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert engine.ledger.total == 60
    assert engine.ledger.max_staleness <= bound
    assert engine.pushes_dropped == 0  # SSP made the fast ones wait: no work was thrown away


def overlapped_then_plain(keeps_base: bool):
    """Bound 1. Worker a overlaps: it pushes on version 0, prefetches version 1 while it computes on
    version 0 again, then pushes that. Worker b pushes on version 0 in between."""
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=1, wait_timeout=10)
    push = Pusher()
    engine.on_pull(a, 0)
    engine.on_pull(b, 0)
    first = engine.submit(dataclasses.replace(push(a, 0, 1.0), keeps_base=keeps_base))
    engine.on_pull(a, engine.store.version)  # the prefetch, while a computes on version 0 again
    thread_b, result_b = run_in_thread(engine.submit, push(b, 0, 1.0))
    with engine.store.lock:  # b either waits for a or is applied at once
        engine.store.lock.wait_for(lambda: engine.round_pushes == 1 or engine.store.version == 2, timeout=5)
    second = engine.submit(push(a, 0, 1.0))
    thread_b.join(timeout=5)
    return engine, [first.outcome, result_b["value"].outcome, second.outcome]


def test_an_overlapped_worker_reusing_its_base_holds_the_others_back_instead_of_losing_work():
    engine, outcomes = overlapped_then_plain(keeps_base=True)
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED] * 3
    assert engine.store.version == 2 and engine.pushes_dropped == 0 and engine.ledger.max_staleness == 1


def test_a_base_is_kept_only_while_work_on_it_can_still_be_applied():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=1, wait_timeout=10)
    push = Pusher()
    engine.on_pull(a, 0)
    engine.on_pull(b, 0)
    first = engine.submit(dataclasses.replace(push(a, 0, 1.0), keeps_base=True))
    assert first.base_kept  # version 1: work on version 0 is 1 stale, within the bound
    engine.on_pull(a, 1)
    late = dataclasses.replace(push(b, 0, 1.0), keeps_base=True)  # applied at version 1: a second step on 0 ...
    thread, result = run_in_thread(engine.submit, late)
    engine.submit(push(a, 0, 1.0))  # (a's second step on version 0; both apply together as version 2)
    thread.join(timeout=5)
    assert not result["value"].base_kept  # ... would be 2 stale: b must wait for newer weights instead
    assert engine.store.version == 2 and engine.pushes_dropped == 0


def test_without_keeps_base_the_overlapped_worker_s_reused_base_is_not_counted_and_its_push_is_dropped():
    engine, outcomes = overlapped_then_plain(keeps_base=False)
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED, pb.PUSH_OUTCOME_ACCEPTED, pb.PUSH_OUTCOME_DROPPED]
    assert engine.pushes_dropped == 1


def test_pulling_again_before_pushing_replaces_the_pending_version():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=1, wait_timeout=30)
    push = Pusher()
    engine.on_pull(a, 0)
    engine.on_pull(b, 0)
    engine.submit(push(b, 0, 1.0))  # version 1
    engine.on_pull(b, 1)
    engine.on_pull(a, 1)  # a polled again before computing: it works on version 1, not 0
    thread, result = run_in_thread(engine.submit, push(b, 1, 1.0))
    thread.join(timeout=5)  # a on version 1 is not left more than 1 behind: no wait
    assert result["value"].outcome == pb.PUSH_OUTCOME_ACCEPTED and engine.store.version == 2


def test_a_dead_worker_stops_blocking_the_ssp_bound():
    clock = FakeClock()
    engine, (a, b) = make(AsyncEngine, 2, clock=clock, staleness_bound=0, wait_timeout=1000)
    engine.on_pull(a, 0)
    engine.on_pull(b, 0)  # b pulls, then dies
    thread, result = run_in_thread(engine.submit, Pusher()(a, 0, 1.0))
    with engine.store.lock:
        assert engine.store.lock.wait_for(lambda: engine.round_pushes == 1, timeout=5)
    clock.now = 5.0
    engine.registry.get(a, 1)
    engine.tick()
    assert engine.store.version == 0
    clock.now = 11.0  # b's lease expires
    engine.registry.get(a, 1)
    engine.tick()
    thread.join(timeout=5)
    assert result["value"].outcome == pb.PUSH_OUTCOME_ACCEPTED and engine.store.version == 1


def test_a_duplicate_of_a_waiting_push_is_applied_once():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=0, wait_timeout=10)
    engine.on_pull(a, 0)
    engine.on_pull(b, 0)
    push = Pusher()
    original = push(a, 0, 1.0)
    first, first_result = run_in_thread(engine.submit, original)
    with engine.store.lock:
        assert engine.store.lock.wait_for(lambda: engine.round_pushes == 1, timeout=5)
    retry, retry_result = run_in_thread(engine.submit, original)  # same sequence, e.g. a client retry
    engine.submit(push(b, 0, 1.0))
    first.join(timeout=5), retry.join(timeout=5)
    assert first_result["value"] == retry_result["value"]
    assert engine.ledger.total == 2 and engine.store.version == 1
