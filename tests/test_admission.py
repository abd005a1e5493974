"""PushIntake: the bound on pushes held at once (never a deadlock), and the dedup memory of each worker's last push."""

from __future__ import annotations

import threading

import grpc
import pytest

from helpers_unit import FakeClock
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.errors import FailedPrecondition, Unavailable
from paramhub.ps.intake import PushIntake, Ticket

pytestmark = pytest.mark.timeout(10)


def in_thread(call) -> tuple[threading.Thread, dict]:
    """Runs ``call`` on a daemon thread; its return value lands in the dict under "value"."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()), daemon=True)
    thread.start()
    return thread, result


def test_a_push_beyond_the_limit_waits_until_one_is_taken():
    intake = PushIntake(threading.Condition(), limit=2, stale_s=30)
    first, _ = intake.begin(1, 1, 1, wait_s=5), intake.begin(2, 1, 1, wait_s=5)
    waiter, result = in_thread(lambda: intake.begin(3, 1, 1, wait_s=5))
    waiter.join(0.2)
    assert waiter.is_alive(), "a third push was let in while two young ones were received"
    assert intake.take(first) is None  # the engine has it now: its place is free
    waiter.join(5)
    assert isinstance(result["value"], Ticket) and intake.receiving == 2


def test_a_push_held_past_stale_s_stops_counting_so_nothing_deadlocks():
    # A push arriving over a slow link must not hold the others back for long.
    clock = FakeClock()
    intake = PushIntake(threading.Condition(), limit=1, stale_s=0.3, clock=clock)
    slow = intake.begin(1, 1, 1, wait_s=5)
    waiter, result = in_thread(lambda: intake.begin(2, 1, 1, wait_s=5))
    waiter.join(0.1)
    assert waiter.is_alive()
    clock.advance(0.5)  # the slow push is now stale; the waiter's timed wait ends and sees it
    waiter.join(5)
    assert isinstance(result["value"], Ticket)
    intake.release(slow)
    assert intake.receiving == 1


def test_release_is_idempotent_and_limit_must_be_positive():
    intake = PushIntake(threading.Condition())
    ticket = intake.begin(1, 1, 1, wait_s=5)
    intake.release(ticket)
    intake.release(ticket)
    assert intake.receiving == 0
    with pytest.raises(ValueError):
        PushIntake(threading.Condition(), limit=0)
    with pytest.raises(ValueError):
        intake.set_limit(0)


def test_a_retry_of_the_last_push_gets_its_reply_and_an_older_one_is_refused():
    intake = PushIntake(threading.Condition())
    ticket = intake.begin(1, 1, 7, wait_s=5)
    assert intake.take(ticket) is None
    intake.answer(ticket, "reply-7")
    assert intake.begin(1, 1, 7, wait_s=5) == "reply-7"  # before it is received: nothing to receive
    older = intake.begin(1, 1, 3, wait_s=5)
    with pytest.raises(FailedPrecondition, match="older"):
        intake.take(older)
    assert isinstance(intake.begin(1, 1, 8, wait_s=5), Ticket)  # the next push is let in


def test_a_new_incarnation_forgets_the_last_push_and_the_old_one_is_refused():
    intake = PushIntake(threading.Condition(), limit=10)
    ticket = intake.begin(1, 1, 7, wait_s=5)
    intake.take(ticket)
    intake.answer(ticket, "reply-7")
    assert intake.begin(1, 2, 7, wait_s=5) != "reply-7"  # restarted: its sequences start over
    with pytest.raises(FailedPrecondition, match="replaced"):
        intake.begin(1, 1, 7, wait_s=5)  # the replaced process retries


def test_a_failed_push_is_forgotten_and_the_push_before_still_gets_its_reply():
    intake = PushIntake(threading.Condition(), limit=10)
    first = intake.begin(1, 1, 1, wait_s=5)
    intake.take(first)
    intake.answer(first, "reply-1")
    failed = intake.begin(1, 1, 2, wait_s=5)
    intake.take(failed)
    intake.release(failed)  # the engine raised: nothing applied
    assert intake.begin(1, 1, 1, wait_s=5) == "reply-1"
    again = intake.begin(1, 1, 2, wait_s=5)  # the failed sequence may be sent again
    assert isinstance(again, Ticket) and intake.take(again) is None


def test_a_duplicate_of_a_held_push_waits_for_its_reply_without_holding_a_place():
    lock = threading.Condition()
    intake = PushIntake(lock, limit=1, stale_s=600)
    original = intake.begin(1, 1, 5, wait_s=5)
    intake.take(original)  # the engine holds it (say, SSP)
    duplicate, result = in_thread(lambda: intake.begin(1, 1, 5, wait_s=5))
    duplicate.join(0.2)
    assert duplicate.is_alive()
    other = intake.begin(2, 1, 1, wait_s=5)  # the one place is free: the waiting duplicate holds none
    intake.answer(original, "reply-5")
    duplicate.join(5)
    assert result["value"] == "reply-5"
    intake.release(other)


def test_a_duplicate_received_alongside_its_original_waits_for_the_original_s_reply():
    intake = PushIntake(threading.Condition(), limit=10)
    original, impatient, patient = (intake.begin(1, 1, 5, wait_s=wait) for wait in (5, 0.2, 5))
    intake.take(original)  # the original reached the engine first; the engine holds it
    with pytest.raises(Unavailable, match="still in progress"):
        intake.take(impatient)
    waiter, result = in_thread(lambda: intake.take(patient))
    waiter.join(0.2)
    assert waiter.is_alive()
    intake.answer(original, "reply-5")
    waiter.join(5)
    assert result["value"] == "reply-5"


def test_keep_only_forgets_the_workers_the_registry_no_longer_holds():
    intake = PushIntake(threading.Condition())
    ticket = intake.begin(1, 1, 7, wait_s=5)
    intake.take(ticket)
    intake.answer(ticket, "reply-7")
    intake.keep_only({1})
    assert intake.begin(1, 1, 7, wait_s=5) == "reply-7"
    intake.keep_only(set())
    assert isinstance(intake.begin(1, 1, 7, wait_s=5), Ticket)


def test_a_push_held_for_a_slower_worker_lets_that_worker_s_push_in(start_server, connect):
    # A push the engine holds (SSP) holds no place: otherwise the slow worker's push would wait stale_s to be let in.
    server = start_server(mode="async", staleness=0, workers=2)
    server.engine.intake.stale_s = 600
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


def test_a_refused_push_frees_its_place(start_server, connect):
    """With one place, a push refused while it is received must not keep the next push out."""
    server = start_server()
    server.engine.intake.stale_s = 600
    client = connect(server.port)
    client.join("w")
    regions = client.info.layout.empty_regions()
    client.pull(regions)
    regions[0][0] = float("nan")  # refused by the chunk checks, after the push was let in
    with pytest.raises(grpc.RpcError):
        client.push(pb.PUSH_KIND_GRADIENT, 0, regions, num_samples=1, loss=0.0)
    regions[0][0] = 0.0  # the control: the same push, valid
    assert client.push(pb.PUSH_KIND_GRADIENT, 0, regions, num_samples=1, loss=0.0).version == 1
    assert server.engine.intake.receiving == 0
