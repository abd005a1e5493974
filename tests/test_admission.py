"""PushAdmission: the bound on pushes held at once, and never a deadlock."""

from __future__ import annotations

import threading

import pytest

from helpers_unit import FakeClock
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps import servicer
from paramhub.ps.admission import PushAdmission

pytestmark = pytest.mark.timeout(10)


def test_a_push_beyond_the_limit_waits_until_one_leaves():
    admission = PushAdmission(limit=2, stale_s=30)
    first, _ = admission.admit(), admission.admit()
    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: (admission.admit(), admitted.set()))
    waiter.start()
    assert not admitted.wait(0.2), "a third push was admitted while two young ones were in"
    admission.leave(first)
    assert admitted.wait(5)
    waiter.join(timeout=5)
    assert admission.admitted == 2


def test_a_push_held_past_stale_s_stops_counting_so_nothing_deadlocks():
    # A push arriving over a slow link must not hold the others back for long.
    clock = FakeClock()
    admission = PushAdmission(limit=1, stale_s=0.3, clock=clock)
    parked = admission.admit()
    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: (admission.admit(), admitted.set()))
    waiter.start()
    assert not admitted.wait(0.1)
    clock.advance(0.5)  # the parked push is now stale; the waiter's timed wait ends and sees it
    assert admitted.wait(5)
    waiter.join(timeout=5)
    admission.leave(parked)
    assert admission.admitted == 1


def test_leave_is_idempotent_and_limit_must_be_positive():
    admission = PushAdmission()
    ticket = admission.admit()
    admission.leave(ticket)
    admission.leave(ticket)
    assert admission.admitted == 0
    with pytest.raises(ValueError):
        PushAdmission(limit=0)


def test_a_push_held_for_a_slower_worker_lets_that_worker_s_push_in(start_server, connect, monkeypatch):
    # Without the hand-back (StagedPush.parked) the slow worker's push would wait stale_s to be admitted.
    monkeypatch.setattr(servicer, "PushAdmission", lambda limit: PushAdmission(limit, stale_s=600))
    server = start_server(mode="async", staleness=0, workers=2)
    fast, slow = connect(server.port), connect(server.port)
    fast.join("fast")
    slow.join("slow")
    regions = fast.info.layout.empty_regions()
    for client in (fast, slow):
        client.pull(regions)
    held = {}
    thread = threading.Thread(target=lambda: held.setdefault(
        "reply", fast.push(pb.PUSH_KIND_GRADIENT, 0, regions, num_samples=1, loss=0.0)), daemon=True)
    thread.start()
    with server.store.lock:
        assert server.store.lock.wait_for(lambda: server.engine.round_pushes == 1, timeout=5)
    reply = slow.push(pb.PUSH_KIND_GRADIENT, 0, regions, num_samples=1, loss=0.0)
    thread.join(timeout=5)
    assert reply.outcome == held["reply"].outcome == pb.PUSH_OUTCOME_ACCEPTED and server.store.version == 1
