"""Reusable staging buffers for incoming pushes, and a bound on how many exist at once.

Every push is received into buffers of the whole model's size before anything is
validated or applied. Allocating them fresh per push made the kernel hand out and
zero 25,000 new pages each time (torch's aligned allocations defeat glibc's reuse),
which measured about a third of a push's server time; reusing them removes that.

A sync round starts N pushes at the same moment. Given a set each, the server held
N × model bytes of staging at once (8 ResNet50 workers: 820 MB of a 2.5 GB peak,
BENCHMARKS.md "Server memory") and faulted in fresh pages for every set beyond the
free list. Receiving more pushes at once does not make them arrive sooner: the
per-chunk work runs under one process's GIL. So the pool hands out at most
``limit`` sets; a push that finds none free waits for one to be released.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch


class StagingPool:
    """A free list of region sets that bounds how many are out at once, without ever deadlocking.

    A set that has been out for longer than ``stale_s`` stops counting against the
    limit. Its push is most likely held in an SSP wait for a slower worker (the
    engine keeps the regions until it applies them), or arriving over a slow link;
    waiting for it could stall the very push it waits for. So a waiting push waits
    at most ``stale_s``, and then gets a fresh set.

    Args:
        allocate: makes one set of regions.
        keep: how many free sets to keep for reuse (more are dropped).
        limit: how many sets may be out at once, young ones (see above) counted.
        stale_s: seconds after which an outstanding set no longer counts.
        clock: injectable monotonic clock.
    """

    def __init__(self, allocate: Callable[[], list[torch.Tensor]], keep: int = 2, limit: int = 2,
                 stale_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if limit < 1 or keep < 0:
            raise ValueError(f"need limit >= 1 and keep >= 0, got limit {limit}, keep {keep}")
        self._allocate = allocate
        self._keep = keep
        self._limit = limit
        self._stale_s = stale_s
        self._clock = clock
        self._free: list[list[torch.Tensor]] = []
        self._out: dict[int, float] = {}  # id of a set handed out -> when
        self._changed = threading.Condition()

    def acquire(self) -> list[torch.Tensor]:
        """A set of regions with arbitrary contents (every byte is overwritten by a complete push).

        Waits while ``limit`` young sets are out and none is free: at most ``stale_s``.
        """
        with self._changed:
            while not self._free:
                now = self._clock()
                young = [t for t in self._out.values() if now - t < self._stale_s]
                if len(young) < self._limit:
                    break
                self._changed.wait(min(young) + self._stale_s - now)  # until one is released or turns stale
            regions = self._free.pop() if self._free else None
            if regions is None:
                regions = self._allocate()  # under the lock: two waiters never both allocate past the limit
            self._out[id(regions)] = self._clock()
            return regions

    def release(self, regions: list[torch.Tensor]) -> None:
        """Returns a set that nothing references any more."""
        with self._changed:
            self._out.pop(id(regions), None)
            if len(self._free) < self._keep:
                self._free.append(regions)
            self._changed.notify()

    @property
    def outstanding(self) -> int:
        """Sets handed out and not yet released."""
        with self._changed:
            return len(self._out)
