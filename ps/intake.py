"""A push's way into the engine: deduplication, the bound on pushes held at once, and their waits.

A push is kept as the messages it arrived in until the engine has added it to the
next update (or dropped it), so each push being received holds up to the model's
size on the wire. A sync round starts N pushes at the same moment; receiving them
all at once would hold N × model bytes (8 ResNet50 workers: 820 MB, BENCHMARKS.md
"Server memory") and does not make them arrive sooner: the per-chunk work runs
under one process's GIL. So at most ``limit`` pushes are received at once; the
others wait, their bytes held back by gRPC's flow control.

The intake also remembers each worker's last push and its reply, so a retry is
answered without being received or applied again. It shares the engine's lock:
the dedup memory changes exactly when the engine takes or answers a push.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Callable

from paramhub.ps.errors import FailedPrecondition, Unavailable


@dataclasses.dataclass(frozen=True)
class Ticket:
    """A push let in to be received; it holds one of the ``limit`` places until the engine takes it."""

    number: int
    worker_id: int
    incarnation: int
    sequence: int
    wait_s: float  # how long it waits for an original with its sequence that the engine holds


@dataclasses.dataclass
class _LastPush:
    """One worker incarnation's newest push that the engine took."""

    incarnation: int
    sequence: int = 0
    reply: object = None  # the engine's PushResult; None while the engine holds the push


@dataclasses.dataclass(frozen=True)
class _Taken:
    """A push the engine holds, and the memory to go back to if it fails."""

    last: _LastPush
    sequence: int
    reply: object


class PushIntake:
    """Lets pushes in, at most ``limit`` being received at once, and answers retries; never deadlocks.

    A push stops counting against the limit once the engine takes it, so one that
    the engine holds for slower workers (SSP) frees its place for the pushes it
    waits for. A push let in more than ``stale_s`` ago stops counting too: it is
    arriving over a slow link, and the others should not wait for that link. So a
    push waits at most ``stale_s`` to be let in.

    Every method runs under ``lock``, the engine's: ``take``, ``answer`` and
    ``release`` may be called with it held.

    Args:
        lock: the engine's condition (the store's lock).
        limit: how many pushes may be received at once, young ones (see above) counted.
        stale_s: seconds after which a push let in no longer counts.
        clock: injectable monotonic clock.
    """

    def __init__(self, lock: threading.Condition, limit: int = 1, stale_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = lock
        self.set_limit(limit)
        self.stale_s = stale_s
        self._clock = clock
        self._numbers = itertools.count()
        self._receiving: dict[int, float] = {}  # ticket number -> when it was let in
        self._taken: dict[int, _Taken] = {}  # ticket number -> its push, which the engine holds
        self._last: dict[int, _LastPush] = {}  # worker id -> its last push

    def set_limit(self, limit: int) -> None:
        """How many pushes may be received at once (``--concurrent-pushes``)."""
        if limit < 1:
            raise ValueError(f"need limit >= 1, got {limit}")
        self.limit = limit

    def begin(self, worker_id: int, incarnation: int, sequence: int, wait_s: float) -> object | Ticket:
        """Before a push is received: the reply of the push it retries, or a ticket to receive it.

        A retry of the last push gets that push's reply (waiting up to ``wait_s`` while
        the engine still holds it); any other push waits (at most ``stale_s``) until
        fewer than ``limit`` young pushes are being received.

        Raises:
            Unavailable: the original is still held after ``wait_s``, or it failed.
            FailedPrecondition: the worker's incarnation was replaced.
        """
        with self._lock:
            last = self._last_push(worker_id, incarnation)
            if last.sequence and sequence == last.sequence:  # sequences start at 1: 0 is "none yet"
                return self._await_reply(last, worker_id, sequence, wait_s)
            while True:
                now = self._clock()
                young = [t for t in self._receiving.values() if now - t < self.stale_s]
                if len(young) < self.limit:
                    break
                self._lock.wait(min(young) + self.stale_s - now)  # until one is taken or turns stale
            ticket = Ticket(next(self._numbers), worker_id, incarnation, sequence, wait_s)
            self._receiving[ticket.number] = self._clock()
            return ticket

    def take(self, ticket: Ticket) -> object | None:
        """The engine takes the push of ``ticket`` (lock held): None if it is the push to handle.

        Its place is free from now on. A push whose original the engine took while
        this one was being received gets the original's reply instead (as ``begin``).

        Raises:
            FailedPrecondition: a newer push of the worker was taken already.
            Unavailable: as ``begin``.
        """
        with self._lock:
            self._free(ticket)
            last = self._last_push(ticket.worker_id, ticket.incarnation)
            if last.sequence and ticket.sequence == last.sequence:
                return self._await_reply(last, ticket.worker_id, ticket.sequence, ticket.wait_s)
            if ticket.sequence < last.sequence:
                raise FailedPrecondition(
                    f"push sequence {ticket.sequence} is older than the last one ({last.sequence})")
            self._taken[ticket.number] = _Taken(last, last.sequence, last.reply)
            last.sequence, last.reply = ticket.sequence, None
            return None

    def answer(self, ticket: Ticket, reply: object) -> None:
        """The engine's reply to the push it took: a retry gets it too (lock held)."""
        with self._lock:
            taken = self._taken.pop(ticket.number, None)
            if taken is not None and taken.last.sequence == ticket.sequence:
                taken.last.reply = reply  # unless a newer push was taken meanwhile: only that one is remembered
            self._lock.notify_all()

    def release(self, ticket: Ticket) -> None:
        """Ends ``ticket`` however its push ended; idempotent, and a no-op once answered.

        Its place is freed, and if the engine took it and failed (nothing applied) the
        memory is as before: a retry may send it again, and a retry of the push before
        still gets its reply.
        """
        with self._lock:
            self._free(ticket)
            taken = self._taken.pop(ticket.number, None)
            if taken is not None and taken.last.sequence == ticket.sequence:  # no newer push was taken meanwhile
                taken.last.sequence, taken.last.reply = taken.sequence, taken.reply
                self._lock.notify_all()  # a duplicate waiting for it learns that it failed

    def keep_only(self, worker_ids: set[int]) -> None:
        """Drops the memory of workers the registry no longer holds (their ids never come back)."""
        with self._lock:
            for worker_id in [w for w in self._last if w not in worker_ids]:
                del self._last[worker_id]

    def incarnation_of(self, worker_id: int) -> int:
        """The incarnation of the worker's last push taken (0 when none is remembered)."""
        with self._lock:
            last = self._last.get(worker_id)
            return last.incarnation if last is not None else 0

    def remember(self, worker_id: int, incarnation: int, sequence: int, reply: object) -> None:
        """Sets the worker's last push and its reply, as its primary had them (a standby; ps/replication.py)."""
        with self._lock:
            last = self._last.get(worker_id)
            if last is None or incarnation >= last.incarnation:
                self._last[worker_id] = _LastPush(incarnation, sequence, reply)

    def memory(self) -> dict[int, tuple[int, int, object]]:
        """Each worker's last answered push: worker id -> (incarnation, sequence, reply)."""
        with self._lock:
            return {w: (last.incarnation, last.sequence, last.reply) for w, last in self._last.items()
                    if last.reply is not None}

    @property
    def receiving(self) -> int:
        """Pushes let in and not yet taken or released."""
        with self._lock:
            return len(self._receiving)

    def _free(self, ticket: Ticket) -> None:
        if self._receiving.pop(ticket.number, None) is not None:
            self._lock.notify_all()

    def _last_push(self, worker_id: int, incarnation: int) -> _LastPush:
        """The worker's memory; a newer incarnation starts over (its sequences start at 1 again)."""
        last = self._last.get(worker_id)
        if last is None or incarnation > last.incarnation:
            last = self._last[worker_id] = _LastPush(incarnation)
        elif incarnation < last.incarnation:
            raise FailedPrecondition(f"worker {worker_id} incarnation {incarnation} was replaced by {last.incarnation}")
        return last

    def _await_reply(self, last: _LastPush, worker_id: int, sequence: int, timeout: float) -> object:
        """Waits (bounded) for the reply of the push with ``sequence`` that the engine holds."""
        deadline = self._clock() + timeout
        while last.reply is None and last.sequence == sequence:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise Unavailable(f"push {sequence} of worker {worker_id} is still in progress; retry later")
            self._lock.wait(remaining)
        if last.sequence != sequence:
            raise Unavailable(f"push {sequence} of worker {worker_id} failed; send it again")
        return last.reply
