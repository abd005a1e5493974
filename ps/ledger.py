"""The update ledger: for every applied update, who, from which version, how stale, how scaled."""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

import torch


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
    # async --batch-share: the update's share of the global batch, the factor on the whole applied
    # update's PARAM mean (the same for every push applied together; 1.0 in sync mode or when off)
    share: float = 1.0
    incarnation: int = 0  # of the worker that pushed it (sequences start over with each incarnation)

    @property
    def key(self) -> tuple[int, int, int]:
        """The push it records: (worker id, incarnation, sequence)."""
        return self.worker_id, self.incarnation, self.sequence


class Ledger:
    """Keeps the last ``capacity`` entries in full and counts for all of them.

    Not thread-safe by itself: engines call it under the store's lock.

    Args:
        capacity: entries kept in full (the oldest go first).
        entries, staleness_histogram, applied_per_worker, total: what a resumed run's ledger held.
    """

    def __init__(self, capacity: int = 100_000, entries: Iterable[LedgerEntry] = (),
                 staleness_histogram: dict[int, int] | None = None, applied_per_worker: dict[int, int] | None = None,
                 total: int = 0):
        self.entries: collections.deque[LedgerEntry] = collections.deque(entries, maxlen=capacity)
        self.staleness_histogram: collections.Counter[int] = collections.Counter(staleness_histogram or {})
        self.applied_per_worker: collections.Counter[int] = collections.Counter(applied_per_worker or {})
        self.total = total

    def record(self, entry: LedgerEntry) -> None:
        """Adds one applied push."""
        self.entries.append(entry)
        self.staleness_histogram[entry.staleness] += 1
        self.applied_per_worker[entry.worker_id] += 1
        self.total += 1

    # -- checkpointing ------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The ledger as tensors, for the checkpoint."""
        rows = [[e.version, e.worker_id, e.sequence, e.base_version, e.staleness, e.num_samples] for e in self.entries]
        return {
            "ledger.entries": torch.tensor(rows, dtype=torch.int64).reshape(-1, 6),
            "ledger.scales": torch.tensor([e.scale for e in self.entries], dtype=torch.float64),
            "ledger.shares": torch.tensor([e.share for e in self.entries], dtype=torch.float64),
            # incarnations are uint64 on the wire: stored as int64 with the same 64 bits
            "ledger.incarnations": torch.tensor([e.incarnation - (1 << 64) if e.incarnation >= 1 << 63
                                                 else e.incarnation for e in self.entries], dtype=torch.int64),
            "ledger.histogram": torch.tensor(sorted(self.staleness_histogram.items()),
                                             dtype=torch.int64).reshape(-1, 2),
            "ledger.applied": torch.tensor(sorted(self.applied_per_worker.items()), dtype=torch.int64).reshape(-1, 2),
            "ledger.total": torch.tensor(self.total, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], capacity: int = 100_000) -> "Ledger":
        """Rebuilds a ledger saved by ``to_tensors`` (an empty one when the keys are absent).

        Checkpoints written before ``ledger.shares`` or ``ledger.incarnations`` existed load with
        every share 1.0 and every incarnation 0.
        """
        if "ledger.entries" not in tensors:
            return cls(capacity)
        rows = tensors["ledger.entries"].tolist()
        shares = tensors["ledger.shares"].tolist() if "ledger.shares" in tensors else [1.0] * len(rows)
        incarnations = ([i % (1 << 64) for i in tensors["ledger.incarnations"].tolist()]
                        if "ledger.incarnations" in tensors else [0] * len(rows))
        entries = [LedgerEntry(version, worker_id, sequence, base, staleness, scale, samples, share, incarnation)
                   for (version, worker_id, sequence, base, staleness, samples), scale, share, incarnation
                   in zip(rows, tensors["ledger.scales"].tolist(), shares, incarnations)]
        return cls(capacity, entries, staleness_histogram=dict(tensors["ledger.histogram"].tolist()),
                   applied_per_worker=dict(tensors["ledger.applied"].tolist()), total=int(tensors["ledger.total"]))
