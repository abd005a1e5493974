"""Who the workers are: ids, incarnations, leases, progress, and the dedup memory."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

from paramhub.ps.errors import FailedPrecondition, NotFound


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
    last_sequence: int = 0
    last_reply: object = None  # the reply to last_sequence, returned again for a retry
    joined: bool = True  # False for records restored from a checkpoint until the worker joins again


class WorkerRegistry:
    """Tracks workers; thread-safe.

    Args:
        lease_timeout: seconds of silence after which a worker is declared lost.
        clock: injectable monotonic clock (tests).
        on_lost: called with each record whose lease expires.
    """

    def __init__(self, lease_timeout: float, clock: Callable[[], float] = time.monotonic,
                 on_lost: Callable[[WorkerRecord], None] | None = None):
        self.lease_timeout = lease_timeout
        self._clock = clock
        self._on_lost = on_lost or (lambda record: None)
        self._lock = threading.Lock()
        self._by_id: dict[int, WorkerRecord] = {}
        self._by_name: dict[str, int] = {}

    def join(self, name: str, incarnation: int, observer: bool, shard: int) -> WorkerRecord:
        """Registers a worker; the same name keeps its id across incarnations.

        A join repeated with the same incarnation returns the same record (retry);
        a newer incarnation replaces the old one, whose pushes are refused from then on.
        """
        with self._lock:
            now = self._clock()
            existing = self._by_id.get(self._by_name[name]) if name in self._by_name else None
            if existing is not None:
                if incarnation < existing.incarnation:
                    raise FailedPrecondition(
                        f"worker {name!r} incarnation {incarnation} is older than the live {existing.incarnation}")
                if incarnation > existing.incarnation:
                    existing.incarnation = incarnation
                    existing.last_sequence = 0
                    existing.last_reply = None
                existing.alive = existing.joined = True
                existing.last_seen = now
                existing.shard = shard
                return dataclasses.replace(existing)
            worker_id = max(self._by_id, default=0) + 1
            record = WorkerRecord(worker_id, name or f"worker-{worker_id}", incarnation, observer, shard, now)
            self._by_id[worker_id] = record
            if name:
                self._by_name[name] = worker_id
            return dataclasses.replace(record)

    def get(self, worker_id: int, incarnation: int) -> WorkerRecord:
        """The live record (not a copy) for a call from (worker_id, incarnation); renews the lease.

        Raises:
            NotFound: unknown id.
            FailedPrecondition: an old incarnation.
        """
        with self._lock:
            record = self._by_id.get(worker_id)
            if record is None or not record.joined:
                raise NotFound(f"unknown worker id {worker_id} (the server may have restarted); join again")
            if incarnation != record.incarnation:
                raise FailedPrecondition(
                    f"worker {record.name} incarnation {incarnation} was replaced by {record.incarnation}")
            record.last_seen = self._clock()
            if not record.alive:
                record.alive = True
            return record

    def touch(self, worker_id: int) -> None:
        """Renews a joined worker's lease if it is known; silently ignores unknown ids."""
        with self._lock:
            record = self._by_id.get(worker_id)
            if record is not None and record.joined:
                record.last_seen = self._clock()
                record.alive = True

    def leave(self, worker_id: int, incarnation: int) -> None:
        """Ends a worker's lease now."""
        record = self.get(worker_id, incarnation)
        with self._lock:
            record.alive = False

    def expire(self) -> list[WorkerRecord]:
        """Declares silent workers lost; returns the newly lost ones."""
        lost = []
        with self._lock:
            now = self._clock()
            for record in self._by_id.values():
                if record.alive and not record.observer and now - record.last_seen > self.lease_timeout:
                    record.alive = False
                    lost.append(record)
        for record in lost:
            self._on_lost(record)
        return lost

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
        """How many joined trainers are not alive (lease expired or left)."""
        with self._lock:
            return sum(1 for r in self._by_id.values() if not r.observer and not r.alive)

    def export(self) -> list[dict]:
        """Per-worker progress for a checkpoint (JSON-serialisable)."""
        with self._lock:
            return [{"worker_id": r.worker_id, "name": r.name, "incarnation": r.incarnation, "shard": r.shard,
                     "observer": r.observer, "pushes_accepted": r.pushes_accepted,
                     "pushes_dropped": r.pushes_dropped, "last_base_version": r.last_base_version}
                    for r in self._by_id.values()]

    def restore(self, records: list[dict]) -> None:
        """Reloads exported progress after a restart: same ids for the same names.

        Restored workers count as alive (their lease starts now, so one that never
        comes back is declared lost after the lease timeout) but must join again
        before any other call: their old sessions ended with the old process.
        """
        with self._lock:
            now = self._clock()
            for item in records:
                record = WorkerRecord(item["worker_id"], item["name"], item["incarnation"], item["observer"],
                                      item["shard"], now, alive=not item["observer"], joined=False,
                                      pushes_accepted=item["pushes_accepted"],
                                      pushes_dropped=item["pushes_dropped"],
                                      last_base_version=item["last_base_version"])
                self._by_id[record.worker_id] = record
                self._by_name[record.name] = record.worker_id

    def seconds_since_seen(self, record: WorkerRecord) -> float:
        """Age of the worker's last contact."""
        return max(0.0, self._clock() - record.last_seen)
