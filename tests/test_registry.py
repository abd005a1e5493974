"""ps/registry.py: worker ids, incarnations, leases (with a fake clock), leave."""

from __future__ import annotations

import grpc
import pytest

from helpers_unit import FakeClock
from paramhub.ps.errors import FailedPrecondition, NotFound
from paramhub.ps.registry import WorkerRegistry

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def lost():
    return []


@pytest.fixture
def registry(clock, lost):
    return WorkerRegistry(lease_timeout=5.0, clock=clock, on_lost=lost.append)


def test_join_assigns_distinct_ids(registry):
    a = registry.join("a", incarnation=1, observer=False, shard=0)
    b = registry.join("b", incarnation=1, observer=False, shard=1)
    anon1 = registry.join("", incarnation=1, observer=False, shard=2)
    anon2 = registry.join("", incarnation=1, observer=False, shard=3)
    ids = [a.worker_id, b.worker_id, anon1.worker_id, anon2.worker_id]
    assert len(set(ids)) == 4 and all(i > 0 for i in ids)  # 0 is proto3's "unset"
    assert (a.name, b.name) == ("a", "b")
    assert anon1.name and anon1.name != anon2.name
    assert (b.shard, b.incarnation, b.observer, b.alive) == (1, 1, False, True)


def test_same_name_keeps_its_id_across_incarnations(registry):
    first = registry.join("w", incarnation=100, observer=False, shard=0)
    registry.join("other", incarnation=1, observer=False, shard=1)
    again = registry.join("w", incarnation=100, observer=False, shard=0)  # a retried join
    assert again.worker_id == first.worker_id and again.incarnation == 100
    restarted = registry.join("w", incarnation=200, observer=False, shard=3)
    assert restarted.worker_id == first.worker_id
    assert (restarted.incarnation, restarted.shard) == (200, 3)
    assert len(registry.trainers()) == 2


def test_count_push_keeps_a_worker_s_progress_and_ignores_a_forgotten_id(registry):
    rec = registry.join("w", incarnation=1, observer=False, shard=0)
    registry.count_push(rec.worker_id, accepted=True, base_version=3, loss=0.5)
    registry.count_push(rec.worker_id, accepted=False, base_version=4, loss=9.0)
    counted = registry.trainer(rec.worker_id)
    assert (counted.pushes_accepted, counted.pushes_dropped, counted.last_base_version, counted.last_loss) == \
        (1, 1, 4, 0.5)  # a dropped push's loss is not the worker's last
    registry.count_push(rec.worker_id + 1, accepted=True, base_version=0, loss=0.0)  # no such record: nothing
    assert registry.known_ids() == {rec.worker_id}


def test_old_incarnation_is_refused(registry):
    rec = registry.join("w", incarnation=5, observer=False, shard=0)
    registry.join("w", incarnation=6, observer=False, shard=0)
    with pytest.raises(FailedPrecondition) as info:
        registry.get(rec.worker_id, 5)  # the replaced process pushes or pulls
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(FailedPrecondition):
        registry.join("w", incarnation=5, observer=False, shard=0)  # ...or rejoins
    with pytest.raises(FailedPrecondition):
        registry.leave(rec.worker_id, 5)
    assert registry.get(rec.worker_id, 6).alive  # the new one is unaffected


def test_unknown_id_is_not_found(registry):
    with pytest.raises(NotFound) as info:
        registry.get(42, 1)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    rec = registry.join("w", incarnation=1, observer=False, shard=0)
    with pytest.raises(NotFound):
        registry.get(rec.worker_id + 1, 1)
    with pytest.raises(NotFound):
        registry.leave(rec.worker_id + 1, 1)


def test_join_returns_a_copy_get_returns_the_live_record(registry):
    rec = registry.join("w", incarnation=1, observer=False, shard=0)
    rec.pushes_accepted = 99
    live = registry.get(rec.worker_id, 1)
    assert live.pushes_accepted == 0
    live.pushes_accepted = 3
    assert registry.get(rec.worker_id, 1).pushes_accepted == 3
    assert registry.trainers()[0].pushes_accepted == 3


def test_lease_expiry_with_fake_clock(registry, clock, lost):
    registry.join("a", incarnation=1, observer=False, shard=0)
    b = registry.join("b", incarnation=1, observer=False, shard=1)
    clock.advance(4.0)
    registry.get(b.worker_id, 1)  # b renews its lease
    assert registry.expire() == [] and lost == []
    clock.advance(1.5)  # a silent for 5.5 s > 5 s, b for 1.5 s
    newly = registry.expire()
    assert [r.name for r in newly] == ["a"] and [r.name for r in lost] == ["a"]
    assert registry.lost_trainers() == 1
    assert registry.expire() == [] and len(lost) == 1  # reported once
    assert {r.name: r.alive for r in registry.trainers()} == {"a": False, "b": True}
    assert registry.seconds_since_seen(registry.get(b.worker_id, 1)) == 0.0
    clock.advance(5.0)  # exactly the timeout is not yet lost
    assert registry.expire() == []
    clock.advance(0.01)
    assert [r.name for r in registry.expire()] == ["b"]
    assert registry.lost_trainers() == 2


def test_a_lost_worker_comes_back(registry, clock, lost):
    rec = registry.join("a", incarnation=1, observer=False, shard=0)
    clock.advance(10)
    registry.expire()
    assert registry.lost_trainers() == 1
    assert registry.get(rec.worker_id, 1).alive  # any call renews the lease
    assert registry.lost_trainers() == 0
    clock.advance(10)
    registry.expire()
    back = registry.join("a", incarnation=2, observer=False, shard=0)  # or a restart rejoins
    assert back.alive and back.worker_id == rec.worker_id and registry.lost_trainers() == 0


def test_observers_never_expire_and_are_not_trainers(registry, clock, lost):
    obs = registry.join("eval", incarnation=1, observer=True, shard=-1)
    registry.join("w", incarnation=1, observer=False, shard=0)
    clock.advance(100)
    assert [r.name for r in registry.expire()] == ["w"]
    assert [r.name for r in registry.trainers()] == ["w"]
    assert registry.get(obs.worker_id, 1).alive and registry.lost_trainers() == 1


def test_seconds_since_seen(registry, clock):
    rec = registry.join("w", incarnation=1, observer=False, shard=0)
    clock.advance(2.5)
    assert registry.seconds_since_seen(rec) == pytest.approx(2.5)


def test_leave(registry, clock, lost):
    a = registry.join("a", incarnation=1, observer=False, shard=0)
    registry.join("b", incarnation=1, observer=False, shard=1)
    registry.leave(a.worker_id, 1)
    assert {r.name: r.alive for r in registry.trainers()} == {"a": False, "b": True}
    assert registry.lost_trainers() == 1
    clock.advance(100)
    assert [r.name for r in registry.expire()] == ["b"]  # a left: it is not reported lost again
    assert [r.name for r in lost] == ["b"]
    again = registry.join("a", incarnation=1, observer=False, shard=0)
    assert again.worker_id == a.worker_id and again.alive
