"""The update ledger: for every applied update, who, from which version, how stale, how scaled."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One push that went into the update producing ``version``."""

    version: int  # the global version the update produced
    worker_id: int
    sequence: int
    base_version: int
    staleness: int  # version at apply time − base_version
    scale: float  # staleness damping factor applied to the update (1.0 when off)
    num_samples: int


class Ledger:
    """Keeps the last ``capacity`` entries in full and counts for all of them.

    Not thread-safe by itself: engines call it under the store's lock.
    """

    def __init__(self, capacity: int = 100_000):
        self.entries: collections.deque[LedgerEntry] = collections.deque(maxlen=capacity)
        self.staleness_histogram: collections.Counter[int] = collections.Counter()
        self.applied_per_worker: collections.Counter[int] = collections.Counter()
        self.total = 0

    def record(self, entry: LedgerEntry) -> None:
        """Adds one applied push."""
        self.entries.append(entry)
        self.staleness_histogram[entry.staleness] += 1
        self.applied_per_worker[entry.worker_id] += 1
        self.total += 1

    @property
    def max_staleness(self) -> int:
        """The largest staleness ever applied (0 before any update)."""
        return max(self.staleness_histogram, default=0)
