"""Who the workers are: ids, incarnations, leases and progress."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Sequence

from paramhub.ps.errors import FailedPrecondition, NotFound, ResourceExhausted
from paramhub.ps.identity import MAX_NAME_CHARS, is_plain_name, printable

MAX_LIVE_WORKERS = 1024  # --max-live-workers: records with a live lease at once (trainers and observers)
KEEP_DEPARTED = 128  # --keep-departed: departed records remembered (the most recent departures)


@dataclasses.dataclass
class WorkerRecord:
    """What the server knows about one worker (or observer)."""

    worker_id: int
    name: str
    incarnation: int
    observer: bool
    shard: int
    last_seen: float
    alive: bool = True
    pushes_accepted: int = 0
    pushes_dropped: int = 0
    last_base_version: int = 0
    last_loss: float = float("nan")
    joined: bool = True  # False for records restored from a checkpoint until the worker joins again
    left: bool = False  # this incarnation said Leave: its calls are refused until it joins again
    departure: int = 0  # orders departures (Leave or lease expiry): the larger, the more recent
    active: bool = False  # this incarnation pulled the model since it joined: it counts in rounds (members)


@dataclasses.dataclass(frozen=True)
class Roster:
    """The trainers as Status shows them."""

    live: list[WorkerRecord]  # by id
    departed: list[WorkerRecord]  # those remembered, the most recent departure first
    forgotten: int  # departed trainers no longer remembered


class WorkerRegistry:
    """Tracks workers; thread-safe.

    Both kinds of record are bounded, so a peer that joins name after name
    cannot grow the server's memory, its Status reply or its checkpoints:
    at most ``max_live`` records hold a live lease (further joins are refused),
    and of the departed ones (left, or silent past the lease) only the
    ``keep_departed`` most recent are remembered; the rest are forgotten and
    only counted.

    Args:
        lease_timeout: seconds of silence after which a worker is declared lost.
        clock: injectable monotonic clock (tests).
        on_lost: called with each trainer record whose lease expires.
        max_live: records (trainers and observers) with a live lease at once.
        keep_departed: departed records remembered.
        restored, first_free_id: a resumed run's exported records and the lowest id never given out (``restore``).
        max_trainers: trainers with a live lease at once (``--max-workers``); None: only ``max_live`` bounds them.
        on_departure: called with the id of a trainer whose incarnation ended: it left, its lease expired, or a
            newer incarnation joined (the engine gives its data leases back to the pool).
    """

    def __init__(self, lease_timeout: float, clock: Callable[[], float] = time.monotonic,
                 on_lost: Callable[[WorkerRecord], None] | None = None, *,
                 max_live: int = MAX_LIVE_WORKERS, keep_departed: int = KEEP_DEPARTED,
                 restored: Sequence[dict] = (), first_free_id: int = 1, max_trainers: int | None = None,
                 on_departure: Callable[[int], None] | None = None):
        self.lease_timeout = lease_timeout
        self.max_live = max_live
        self.max_trainers = max_trainers
        self.on_departure = on_departure or (lambda worker_id: None)
        self.joins = 0  # trainer joins that started an incarnation (a retried Join is not one)
        self.departures = 0  # trainer incarnations that ended: left, lost, or replaced by a newer one
        self.keep_departed = keep_departed
        self._clock = clock
        self._on_lost = on_lost or (lambda record: None)
        self._lock = threading.Lock()
        self._by_id: dict[int, WorkerRecord] = {}
        self._by_name: dict[str, int] = {}
        self._next_id = 1  # ids are never reused, not even those of forgotten records
        self._departures = 0
        self.forgotten_trainers = 0  # departed trainer records no longer remembered
        self.restore(list(restored), first_free_id)

    def join(self, name: str, incarnation: int, observer: bool, shard: int) -> WorkerRecord:
        """Registers a worker; the same name keeps its id across incarnations.

        A join repeated with the same incarnation returns the same record (retry);
        a newer incarnation replaces the old one, whose pushes are refused from then on.
        Either admits a worker that left again.

        Raises:
            FailedPrecondition: an incarnation older than the one registered.
            ResourceExhausted: ``max_live`` other records hold a live lease.
        """
        replaced = None
        with self._lock:
            now = self._clock()
            existing = self._by_id.get(self._by_name[name]) if name in self._by_name else None
            if existing is not None:
                if incarnation < existing.incarnation:
                    raise FailedPrecondition(
                        f"worker {name!r} incarnation {incarnation} is older than the live {existing.incarnation}")
                if not existing.alive:
                    self._check_room(existing.observer)
                starts = incarnation > existing.incarnation or not existing.alive or existing.left \
                    or not existing.joined
                if starts and not existing.observer:
                    if existing.alive and existing.joined and not existing.left:
                        self.departures += 1  # the old incarnation ends here, without a Leave
                        replaced = existing.worker_id
                    self.joins += 1
                    existing.active = False  # the new incarnation counts once it has pulled
                if incarnation > existing.incarnation:
                    existing.incarnation = incarnation  # its pushes start over (the engine's intake sees it)
                existing.alive = existing.joined = True
                existing.left = False
                existing.last_seen = now
                existing.shard = shard
                record = dataclasses.replace(existing)
            else:
                self._check_room(observer)
                worker_id = self._next_id
                self._next_id += 1
                record = WorkerRecord(worker_id, name or f"worker-{worker_id}", incarnation, observer, shard, now)
                self._by_id[worker_id] = record
                if name:
                    self._by_name[name] = worker_id
                if not observer:
                    self.joins += 1
                record = dataclasses.replace(record)
        if replaced is not None:
            self.on_departure(replaced)
        return record

    def _check_room(self, observer: bool) -> None:
        """Raises ResourceExhausted when one more live record would pass ``max_live``, or a trainer
        ``max_trainers`` (lock held)."""
        live = sum(1 for r in self._by_id.values() if r.alive)
        if live >= self.max_live:
            raise ResourceExhausted(
                f"{live} workers hold a live lease, the most this server registers (--max-live-workers); "
                "retry once one has left")
        trainers = sum(1 for r in self._by_id.values() if r.alive and not r.observer)
        if not observer and self.max_trainers is not None and trainers >= self.max_trainers:
            raise ResourceExhausted(
                f"the run has {trainers} live workers, the most it admits (--max-workers {self.max_trainers}); "
                "retry once one has left")

    def activate(self, worker_id: int) -> None:
        """A trainer pulled the model or pushed: from now on it counts in rounds (``members``)."""
        with self._lock:
            record = self._by_id.get(worker_id)
            if record is not None and record.joined and not record.observer:
                record.active = True

    def members(self) -> set[int]:
        """Trainers that joined this process, are live and have pulled (or pushed) since they joined."""
        with self._lock:
            return {r.worker_id for r in self._by_id.values()
                    if r.alive and r.joined and r.active and not r.left and not r.observer}

    def get(self, worker_id: int, incarnation: int) -> WorkerRecord:
        """The live record (not a copy) for a call from (worker_id, incarnation); renews the lease.

        A worker whose lease merely expired is alive again (it was slow, not gone);
        one that said Leave must join again.

        Raises:
            NotFound: unknown id.
            FailedPrecondition: an old incarnation, or one that left.
        """
        with self._lock:
            record = self._session(worker_id, incarnation)
            if record.left:
                raise FailedPrecondition(f"worker {record.name} incarnation {incarnation} left; join again")
            record.last_seen = self._clock()
            record.alive = True
            return record

    def _session(self, worker_id: int, incarnation: int) -> WorkerRecord:
        """The record of a worker that joined this process with this incarnation (call under the lock)."""
        record = self._by_id.get(worker_id)
        if record is None or not record.joined:
            raise NotFound(f"unknown worker id {worker_id} (the server may have restarted); join again")
        if incarnation != record.incarnation:
            raise FailedPrecondition(
                f"worker {record.name} incarnation {incarnation} was replaced by {record.incarnation}")
        return record

    def touch(self, worker_id: int) -> bool:
        """Renews a joined worker's lease (not one that left); returns whether the id joined this process."""
        with self._lock:
            record = self._by_id.get(worker_id)
            if record is None or not record.joined:
                return False
            if not record.left:
                record.last_seen = self._clock()
                record.alive = True
            return True

    def count_push(self, worker_id: int, accepted: bool, base_version: int, loss: float) -> None:
        """Counts a push the engine handled (accepted, or dropped) in its worker's progress."""
        with self._lock:
            record = self._by_id.get(worker_id)
            if record is None:
                return  # forgotten meanwhile
            record.last_base_version = base_version
            if accepted:
                record.pushes_accepted += 1
                record.last_loss = loss
            else:
                record.pushes_dropped += 1

    def known_ids(self) -> set[int]:
        """The ids of every record remembered (live or departed)."""
        with self._lock:
            return set(self._by_id)

    def leave(self, worker_id: int, incarnation: int) -> WorkerRecord:
        """Ends a worker's lease now, for good: its later calls are refused until it joins again.

        A repeated Leave is answered like the first. Returns a copy of the record.

        Raises:
            NotFound: unknown id.
            FailedPrecondition: an old incarnation.
        """
        with self._lock:
            record = self._session(worker_id, incarnation)
            departed = not record.left and record.alive and not record.observer
            if not record.left:
                record.left = True
                self._depart(record)
            if departed:
                self.departures += 1
            copy = dataclasses.replace(record)
            self._forget_departed()
        if departed:
            self.on_departure(worker_id)
        return copy

    def expire(self) -> list[WorkerRecord]:
        """Declares silent workers lost; returns the newly lost trainers.

        Observers' leases expire silently (they are not waited for): it only
        frees their place under ``max_live``.
        """
        lost = []
        with self._lock:
            now = self._clock()
            for record in self._by_id.values():
                if record.alive and now - record.last_seen > self.lease_timeout:
                    self._depart(record)
                    if not record.observer:
                        lost.append(record)
            self._forget_departed()
            self.departures += sum(1 for record in lost if record.joined)
        for record in lost:
            self._on_lost(record)
            self.on_departure(record.worker_id)
        return lost

    def _depart(self, record: WorkerRecord) -> None:
        """Marks a record departed, as the most recent departure (lock held)."""
        self._departures += 1
        record.alive = False
        record.departure = self._departures

    def _forget_departed(self) -> None:
        """Drops the oldest departed records beyond ``keep_departed`` (lock held)."""
        departed = [r for r in self._by_id.values() if not r.alive]
        if len(departed) <= self.keep_departed:
            return
        departed.sort(key=lambda r: r.departure)
        for record in departed[:len(departed) - self.keep_departed]:
            del self._by_id[record.worker_id]
            if self._by_name.get(record.name) == record.worker_id:
                del self._by_name[record.name]
            if not record.observer:
                self.forgotten_trainers += 1

    def trainer(self, worker_id: int) -> WorkerRecord:
        """A copy of a non-observer record; KeyError if unknown or an observer."""
        with self._lock:
            record = self._by_id[worker_id]
            if record.observer:
                raise KeyError(worker_id)
            return dataclasses.replace(record)

    def trainers(self) -> list[WorkerRecord]:
        """Copies of all non-observer records."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._by_id.values() if not r.observer]

    def lost_trainers(self) -> int:
        """How many joined trainers are not alive (lease expired or left), forgotten ones included."""
        with self._lock:
            return self.forgotten_trainers + sum(1 for r in self._by_id.values() if not r.observer and not r.alive)

    def roster(self) -> Roster:
        """The trainers for a Status reply, in one consistent cut."""
        with self._lock:
            trainers = [dataclasses.replace(r) for r in self._by_id.values() if not r.observer]
            forgotten = self.forgotten_trainers
        return Roster(live=sorted((r for r in trainers if r.alive), key=lambda r: r.worker_id),
                      departed=sorted((r for r in trainers if not r.alive), key=lambda r: r.departure, reverse=True),
                      forgotten=forgotten)

    def export(self) -> list[dict]:
        """Per-worker progress for a checkpoint (JSON-serialisable)."""
        with self._lock:
            return [{"worker_id": r.worker_id, "name": r.name, "incarnation": r.incarnation, "shard": r.shard,
                     "observer": r.observer, "pushes_accepted": r.pushes_accepted,
                     "pushes_dropped": r.pushes_dropped, "last_base_version": r.last_base_version}
                    for r in self._by_id.values()]

    def restore(self, records: list[dict], first_free_id: int = 1) -> None:
        """Reloads exported progress after a restart: same ids for the same names.

        Restored workers count as alive (their lease starts now, so one that never
        comes back is declared lost after the lease timeout) but must join again
        before any other call: their old sessions ended with the old process.
        New workers get ids from ``first_free_id`` up (or above the restored ones),
        so no id of the old process, remembered or forgotten, is given out again.
        """
        with self._lock:
            now = self._clock()
            for item in records:
                # a checkpoint of an older server may hold any name: keep it printable (it goes into logs)
                name = item["name"] if is_plain_name(item["name"]) else printable(item["name"], MAX_NAME_CHARS)
                record = WorkerRecord(item["worker_id"], name, item["incarnation"], item["observer"],
                                      item["shard"], now, alive=not item["observer"], joined=False,
                                      pushes_accepted=item["pushes_accepted"],
                                      pushes_dropped=item["pushes_dropped"],
                                      last_base_version=item["last_base_version"])
                self._by_id[record.worker_id] = record
                self._by_name[record.name] = record.worker_id
            self._next_id = max([self._next_id, first_free_id] + [worker_id + 1 for worker_id in self._by_id])

    def seconds_since_seen(self, record: WorkerRecord) -> float:
        """Age of the worker's last contact."""
        return max(0.0, self._clock() - record.last_seen)
