"""PushAdmission: the bound on pushes held at once, and never a deadlock."""

from __future__ import annotations

import threading

import pytest

from helpers_unit import FakeClock
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
    # An SSP push stays admitted while it waits for a slower worker, whose push must still get in.
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
