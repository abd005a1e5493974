"""The consistency engines without sockets: rounds, backup workers, leases, the staleness bound,
the adaptive quorum (grace window, late pushes folded in) and async batch shares."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
import torch

from click.testing import CliRunner

from paramhub.common.codec import whole_regions
from paramhub.common.config import ServerConfig
from paramhub.common.layout import BUFFER, PARAM, Layout
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.consistency import AsyncEngine, StagedPush, SyncRounds, Ticker, auto_quorum
from paramhub.ps.grace import GraceWindow
from paramhub.ps.ledger import Ledger
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


def make(engine_cls, workers: int, clock=None, lr: float = 1.0, initial: torch.Tensor | None = None, **kwargs):
    """A store of one PARAM region of SIZE zeros (or ``initial``), a registry with ``workers`` joined, an engine."""
    clock = clock or time.monotonic
    layout = Layout.from_entries([("w", torch.float32, (SIZE,), PARAM)])
    store = ParameterStore(layout, [torch.zeros(SIZE) if initial is None else initial.clone()])
    registry = WorkerRegistry(lease_timeout=10.0, clock=clock)
    ids = [registry.join(f"w{i}", 1, False, i).worker_id for i in range(workers)]
    engine = engine_cls(store, SGDRule(lr=lr), registry, clock=clock, **kwargs)
    return engine, ids


class Pusher:
    """Builds StagedPushes with increasing sequence numbers per worker."""

    def __init__(self):
        self.sequence: dict[int, int] = {}

    def __call__(self, worker_id: int, base: int, value: float | torch.Tensor, samples: int = 1) -> StagedPush:
        self.sequence[worker_id] = self.sequence.get(worker_id, 0) + 1
        values = value.clone() if isinstance(value, torch.Tensor) else torch.full((SIZE,), float(value))
        return StagedPush(worker_id, 1, self.sequence[worker_id], base, samples, 0.0, whole_regions([values]))


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
    assert max(engine.ledger.staleness_histogram, default=0) <= 1 and engine.store.version == 2


def run_in_thread(fn, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("batch_share", [False, True])
def test_staleness_zero_behaves_exactly_like_sync(batch_share):
    """With batch shares on, the pushes applied together carry the whole global batch: share 1."""
    values = {0: [1.0, 2.0, 3.0], 1: [5.0, -1.0, 0.5]}
    sync, (a, b) = make(SyncRounds, 2, lr=0.1, num_workers=2)
    push = Pusher()
    for step in range(3):
        sync.submit(push(a, step, values[0][step]))
        sync.submit(push(b, step, values[1][step], samples=3))

    async_engine, (a, b) = make(AsyncEngine, 2, lr=0.1, staleness_bound=0, wait_timeout=10, batch_share=batch_share)
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
    assert max(async_engine.ledger.staleness_histogram, default=0) == 0
    assert {e.share for e in async_engine.ledger.entries} == {1.0}


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
    assert max(engine.ledger.staleness_histogram, default=0) <= bound
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
    assert engine.store.version == 2 and engine.pushes_dropped == 0
    assert max(engine.ledger.staleness_histogram, default=0) == 1


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


# -- --quorum auto: a quorum, an adaptive grace window, late pushes folded in ----------------------------


def grads(seed: int, *names: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(SIZE, generator=gen) for name in names}


def adaptive(workers: int = 3, **kwargs):
    """A SyncRounds with --quorum auto on a fake clock; window floor 10 ms."""
    clock = FakeClock()
    engine, ids = make(SyncRounds, workers, clock=clock, num_workers=workers, quorum="auto",
                       grace=GraceWindow(k=3.0, floor=0.01), **kwargs)
    return engine, ids, clock


def at(engine, clock, t: float, *alive: int) -> None:
    """Moves the fake clock to ``t``; the workers in ``alive`` (default all) renew their lease."""
    clock.now = t
    for record in engine.registry.trainers():
        if not alive or record.worker_id in alive:
            engine.registry.touch(record.worker_id)


def two_rounds_with_a_straggler():
    """Round 0: a, b, c push 0.1 s apart (measured: window median 0.1 + 3 MAD 0.1 = 0.4 s).
    Round 1: a and b (the majority) push; c does not. Returns the engine, ids, clock, grads, weights."""
    engine, (a, b, c), clock = adaptive()
    push, g = Pusher(), grads(0, "a0", "b0", "c0", "a1", "b1", "c1")
    for t, worker, name in [(0.0, a, "a0"), (0.1, b, "b0"), (0.2, c, "c0")]:
        at(engine, clock, t)
        assert engine.submit(push(worker, 0, g[name])).outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert engine.store.version == 1  # everyone arrived: closed at once, as today
    assert engine.grace.window() == pytest.approx(0.4)
    w1 = -(g["a0"] + g["b0"] + g["c0"]) / 3
    torch.testing.assert_close(weights(engine), w1)

    at(engine, clock, 10.0)
    engine.submit(push(a, 1, g["a1"]))
    engine.wakeup.clear()
    at(engine, clock, 10.1)
    engine.submit(push(b, 1, g["b1"]))
    assert engine.store.version == 1  # the quorum, 0.1 s into a 0.4 s window: not yet
    assert engine.wakeup.is_set() and engine.due_in() == pytest.approx(0.3)
    at(engine, clock, 10.35)
    engine.tick()
    assert engine.store.version == 1
    at(engine, clock, 10.45)
    engine.tick()
    assert engine.store.version == 2  # closed by the grace window with 2 of 3
    w2 = w1 - (g["a1"] + g["b1"]) / 2
    torch.testing.assert_close(weights(engine), w2)
    return engine, (a, b, c), clock, push, g, w2


def test_auto_quorum_is_a_majority_or_n_minus_backup_workers():
    assert [auto_quorum(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert auto_quorum(5, backup_workers=1) == 4
    engine, _ = make(SyncRounds, 4, num_workers=4, quorum=3)
    assert engine.quorum() == 3
    with pytest.raises(ValueError):
        make(SyncRounds, 2, num_workers=2, quorum=3)


def test_auto_quorum_closes_a_round_after_the_window_with_the_quorum_not_before():
    engine, *_ = two_rounds_with_a_straggler()
    assert [(e.version, e.staleness) for e in engine.ledger.entries][-2:] == [(2, 0), (2, 0)]


def test_a_stragglers_late_push_is_applied_in_the_next_update_damped():
    engine, (a, b, c), clock, push, g, w2 = two_rounds_with_a_straggler()
    g.update(grads(1, "a2", "b2", "c2"))
    at(engine, clock, 10.6)
    late = engine.submit(push(c, 1, g["c1"]))  # c's work on version 1, now that version 2 is out
    assert late.outcome == pb.PUSH_OUTCOME_ACCEPTED and late.next_version == 2  # pull version 2 and go on
    assert engine.store.version == 2 and engine.round_pushes == 1
    again = engine.submit(push(a, 1, g["a1"]))  # a already counted for round 1
    assert again.outcome == pb.PUSH_OUTCOME_DROPPED and again.reason == "closed_round"

    at(engine, clock, 20.0)
    engine.submit(push(a, 2, g["a2"]))
    at(engine, clock, 20.1)
    engine.submit(push(b, 2, g["b2"]))
    at(engine, clock, 20.2)
    fresh = engine.submit(push(c, 2, g["c2"]))  # c's own push for round 2 counts too
    assert fresh.outcome == pb.PUSH_OUTCOME_ACCEPTED and engine.store.version == 3
    # four pushes of one sample each; the late one weighs 1/(1+1)
    expected = w2 - (g["a2"] + g["b2"] + g["c2"] + 0.5 * g["c1"]) / 4
    torch.testing.assert_close(weights(engine), expected)
    update = [e for e in engine.ledger.entries if e.version == 3]
    assert sorted((e.worker_id, e.base_version, e.staleness, e.scale) for e in update) == [
        (a, 2, 0, 1.0), (b, 2, 0, 1.0), (c, 1, 1, 0.5), (c, 2, 0, 1.0)]
    assert engine.ledger.staleness_histogram[1] == 1 and engine.pushes_dropped == 1


def test_a_push_two_rounds_late_is_dropped():
    engine, (a, b, c), clock, push, g, w2 = two_rounds_with_a_straggler()
    at(engine, clock, 20.0)
    engine.submit(push(a, 2, 1.0))
    at(engine, clock, 20.5)
    engine.tick()
    assert engine.store.version == 2  # the window has passed, but one push is no quorum
    at(engine, clock, 20.6)
    engine.submit(push(b, 2, 3.0))  # the quorum after the window: closed at once
    assert engine.store.version == 3
    w3 = w2 - 2.0
    torch.testing.assert_close(weights(engine), w3)
    reply = engine.submit(push(c, 1, g["c1"]))  # based on version 1, the server is at 3
    assert reply.outcome == pb.PUSH_OUTCOME_DROPPED and reply.reason == "too_stale"
    assert engine.round_pushes == 0 and engine.pushes_dropped == 1
    torch.testing.assert_close(weights(engine), w3)
    assert max(engine.ledger.staleness_histogram, default=0) == 0


def test_with_everyone_on_time_auto_quorum_changes_nothing():
    """Same pushes, same arrival times: --quorum auto publishes bit for bit what --quorum all does."""
    results = []
    for quorum in ("all", "auto"):
        clock = FakeClock()
        engine, ids = make(SyncRounds, 3, clock=clock, lr=0.1, num_workers=3, quorum=quorum)
        push, rng = Pusher(), random.Random(3)
        gen = torch.Generator().manual_seed(3)
        for step in range(5):
            for i, worker in enumerate(ids):
                at(engine, clock, 10.0 * step + 0.1 * i)
                engine.submit(push(worker, step, torch.randn(SIZE, generator=gen), samples=rng.randint(1, 64)))
        assert engine.store.version == 5 and engine.pushes_dropped == 0
        results.append((weights(engine), list(engine.ledger.entries)))
    (w_all, ledger_all), (w_auto, ledger_auto) = results
    assert torch.equal(w_all, w_auto) and ledger_all == ledger_auto


def test_auto_quorum_waits_for_a_lost_worker_no_longer():
    engine, (a, b, c), clock = adaptive()
    push = Pusher()
    at(engine, clock, 0.0)
    engine.submit(push(a, 0, 1.0))
    engine.submit(push(b, 0, 1.0))
    assert engine.store.version == 0  # no history: wait for everyone
    at(engine, clock, 11.0, a, b)  # c's lease (10 s) expires
    engine.tick()
    assert engine.store.version == 1 and engine.expected() == 2


def test_the_ticker_ends_a_grace_window_on_time_not_at_its_next_interval():
    engine, (a, b, c) = make(SyncRounds, 3, num_workers=3, quorum="auto", grace=GraceWindow(floor=0.01))
    engine.grace.observe([0.0, 0.1, 0.2])  # window 0.4 s
    ticker = Ticker(engine, interval=30.0).start()
    try:
        started = time.monotonic()
        push = Pusher()
        engine.submit(push(a, 0, 1.0))
        engine.submit(push(b, 0, 1.0))
        engine.store.wait_changed(0, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        ticker.stop()
    assert engine.store.version == 1
    assert 0.4 <= elapsed < 2.0  # the deadline, not the 30 s interval


def test_quorum_settings_are_checked_in_the_config_and_on_the_command_line():
    assert ServerConfig(quorum="auto", workers=3).quorum == "auto"
    for bad in (dict(quorum="auto", mode="async"), dict(quorum=4, workers=3), dict(quorum=0, workers=3),
                dict(quorum=2, workers=3, backup_workers=1), dict(quorum="most"), dict(quorum=True),
                dict(grace_k=-1.0), dict(batch_share=True, mode="sync")):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    from paramhub.ps.cli import main

    assert main.make_context("ps-server", ["--quorum", "2", "--grace-k", "2.5"]).params["quorum"] == 2
    assert main.make_context("ps-server", ["--quorum", "auto"]).params["quorum"] == "auto"
    for args in (["--quorum", "most"], ["--quorum", "auto", "--mode", "async"], ["--batch-share"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)


# -- async: --lr is the synchronous-equivalent rate (each update scaled by its share of the global batch) --


def test_two_async_pushes_each_take_half_a_step_with_batch_share_and_a_full_one_without():
    w0, g = torch.randn(SIZE, generator=torch.Generator().manual_seed(5)), grads(6, "g1", "g2")
    for batch_share, expected in [(True, w0 - 1.0 * (g["g1"] + g["g2"]) / 2),
                                  (False, w0 - 1.0 * (g["g1"] + g["g2"]))]:  # the old, N-times step
        engine, (a, b) = make(AsyncEngine, 2, lr=1.0, initial=w0, staleness_bound=None, batch_share=batch_share)
        push = Pusher()
        engine.submit(push(a, 0, g["g1"]))
        engine.submit(push(b, 0, g["g2"]))
        torch.testing.assert_close(weights(engine), expected)
        assert [e.share for e in engine.ledger.entries] == ([0.5, 0.5] if batch_share else [1.0, 1.0])


def test_unequal_batches_take_shares_by_their_samples():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=None, batch_share=True)
    push = Pusher()
    engine.submit(push(a, 0, 1.0, samples=16))  # b not heard from yet: counts as 16 too
    engine.submit(push(b, 1, 1.0, samples=48))
    engine.submit(push(a, 2, 1.0, samples=16))
    engine.submit(push(b, 3, 1.0, samples=48))
    assert [e.share for e in engine.ledger.entries] == [0.5, 0.75, 0.25, 0.75]
    torch.testing.assert_close(weights(engine), torch.full((SIZE,), -(0.5 + 0.75 + 0.25 + 0.75)))


def test_a_dead_worker_no_longer_counts_in_the_global_batch():
    clock = FakeClock()
    engine, (a, b, c) = make(AsyncEngine, 3, clock=clock, staleness_bound=None, batch_share=True)
    push = Pusher()
    for worker in (a, b, c):
        engine.submit(push(worker, engine.store.version, 1.0, samples=10))
    assert [e.share for e in engine.ledger.entries] == [pytest.approx(1 / 3)] * 3
    at(engine, clock, 11.0, a, b)  # c's lease expires
    engine.tick()
    before = weights(engine).clone()
    engine.submit(push(a, 3, 2.0, samples=10))
    assert engine.ledger.entries[-1].share == 0.5
    torch.testing.assert_close(weights(engine), before - 2.0 * 0.5)


def test_batch_share_scales_the_params_but_not_the_batchnorm_statistics():
    layout = Layout.from_entries([("w", torch.float32, (SIZE,), PARAM),
                                  ("bn.running_mean", torch.float32, (4,), BUFFER)])
    store = ParameterStore(layout, [torch.zeros(SIZE), torch.zeros(4)])
    registry = WorkerRegistry(lease_timeout=10.0)
    a, _ = (registry.join(f"w{i}", 1, False, i).worker_id for i in range(2))
    engine = AsyncEngine(store, SGDRule(lr=1.0), registry, batch_share=True)
    engine.submit(StagedPush(a, 1, 1, 0, 8, 0.0, whole_regions([torch.full((SIZE,), 2.0), torch.full((4,), 3.0)])))
    param, buffer = store.snapshot().regions
    torch.testing.assert_close(param, torch.full((SIZE,), -1.0))  # half a step
    torch.testing.assert_close(buffer, torch.full((4,), 3.0))  # the statistics as pushed


def test_batch_share_is_on_by_default_for_async_gradients_only():
    from paramhub.ps.builder import _batch_share

    assert _batch_share(ServerConfig(mode="async")) is True
    assert _batch_share(ServerConfig(mode="async", batch_share=False)) is False
    assert _batch_share(ServerConfig(mode="async", update="avg")) is False
    assert _batch_share(ServerConfig(mode="sync")) is False


def test_the_ledger_keeps_shares_in_checkpoints_and_reads_old_ones():
    engine, (a, b) = make(AsyncEngine, 2, staleness_bound=None, batch_share=True)
    push = Pusher()
    engine.submit(push(a, 0, 1.0, samples=16))
    engine.submit(push(b, 1, 1.0, samples=48))
    tensors = engine.ledger.to_tensors()
    assert list(Ledger.from_tensors(tensors).entries) == list(engine.ledger.entries)
    old = {key: value for key, value in tensors.items() if key != "ledger.shares"}  # before shares existed
    assert [e.share for e in Ledger.from_tensors(old).entries] == [1.0, 1.0]
