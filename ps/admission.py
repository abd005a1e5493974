"""A bound on how many pushes are received and held at once.

A push is kept as the messages it arrived in until the engine has added it to the
next update (or dropped it), so each push in progress holds up to the model's size
on the wire. A sync round starts N pushes at the same moment; receiving them all
at once would hold N × model bytes (8 ResNet50 workers: 820 MB, BENCHMARKS.md
"Server memory") and does not make them arrive sooner: the per-chunk work runs
under one process's GIL. So at most ``limit`` pushes are admitted; the others
wait, their bytes held back by gRPC's flow control.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable


class PushAdmission:
    """Admits at most ``limit`` pushes at once, without ever deadlocking.

    A push that the engine holds for slower workers (SSP) leaves as it starts to
    wait (``StagedPush.parked``): the pushes it waits for must come in. A push
    admitted more than ``stale_s`` ago stops counting against the limit too: it is
    arriving over a slow link, and the others should not wait for that link. So a
    push waits at most ``stale_s`` to be admitted.

    Args:
        limit: how many pushes may be in at once, young ones (see above) counted.
        stale_s: seconds after which an admitted push no longer counts.
        clock: injectable monotonic clock.
    """

    def __init__(self, limit: int = 1, stale_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if limit < 1:
            raise ValueError(f"need limit >= 1, got {limit}")
        self._limit = limit
        self._stale_s = stale_s
        self._clock = clock
        self._tickets = itertools.count()
        self._admitted: dict[int, float] = {}  # ticket -> when admitted
        self._changed = threading.Condition()

    def admit(self) -> int:
        """Waits (at most ``stale_s``) until fewer than ``limit`` young pushes are in; returns a ticket."""
        with self._changed:
            while True:
                now = self._clock()
                young = [t for t in self._admitted.values() if now - t < self._stale_s]
                if len(young) < self._limit:
                    break
                self._changed.wait(min(young) + self._stale_s - now)  # until one leaves or turns stale
            ticket = next(self._tickets)
            self._admitted[ticket] = self._clock()
            return ticket

    def leave(self, ticket: int) -> None:
        """The push of ``ticket`` is done (applied, accumulated, dropped or failed)."""
        with self._changed:
            self._admitted.pop(ticket, None)
            self._changed.notify()

    @property
    def admitted(self) -> int:
        """Pushes admitted and not yet done."""
        with self._changed:
            return len(self._admitted)
