"""Data leases, the part both sides share: ranges of an epoch's positions, sets of them, and each epoch's order.

With ``ps-server --data-leases`` the server hands out the positions 0..N-1 of
each epoch in ranges (``DataRange`` on the wire), and every worker maps a
position to a sample of its dataset through the same permutation,
``epoch_order(N, seed, epoch)``. The server only ever counts positions; the
workers only ever turn them into samples.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True, order=True)
class Span:
    """Positions [start, end) of one epoch."""

    epoch: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


class Spans:
    """A set of positions of one epoch, kept as sorted, disjoint, non-adjacent [start, end) intervals.

    Everything is O(log n + intervals touched); the sets the lease table keeps
    (done, pending, a worker's leases) have a few intervals each, however large
    the dataset.
    """

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()):
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.size = 0
        for start, end in intervals:
            self.add(start, end)

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def intervals(self) -> list[tuple[int, int]]:
        """The intervals, ascending."""
        return list(zip(self._starts, self._ends))

    def covers(self, start: int, end: int) -> bool:
        """Whether every position of [start, end) is in the set."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any position of [start, end) is in the set."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return True
        return i + 1 < len(self._starts) and self._starts[i + 1] < end

    def add(self, start: int, end: int) -> None:
        """Adds [start, end); the positions must not be in the set yet (ValueError otherwise)."""
        if start >= end:
            return
        if self.overlaps(start, end):
            raise ValueError(f"positions [{start}, {end}) are in the set already")
        self.size += end - start
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._ends[i - 1] == start:  # joins the interval before
            i -= 1
            start = self._starts[i]
            del self._starts[i], self._ends[i]
        if i < len(self._starts) and self._starts[i] == end:  # and the one after
            end = self._ends[i]
            del self._starts[i], self._ends[i]
        self._starts.insert(i, start)
        self._ends.insert(i, end)

    def remove(self, start: int, end: int) -> None:
        """Removes [start, end), which must be covered by the set (ValueError otherwise)."""
        if start >= end:
            return
        if not self.covers(start, end):
            raise ValueError(f"positions [{start}, {end}) are not all in the set")
        i = bisect.bisect_right(self._starts, start) - 1
        s, e = self._starts[i], self._ends[i]
        del self._starts[i], self._ends[i]
        for piece in ((end, e), (s, start)):  # the right part first, so both insert at i in order
            if piece[0] < piece[1]:
                self._starts.insert(i, piece[0])
                self._ends.insert(i, piece[1])
        self.size -= end - start

    def take(self, count: int) -> list[tuple[int, int]]:
        """Removes and returns up to ``count`` positions from the front, as intervals."""
        taken = []
        while count > 0 and self._starts:
            start, end = self._starts[0], self._ends[0]
            stop = min(end, start + count)
            self.remove(start, stop)
            taken.append((start, stop))
            count -= stop - start
        return taken


@functools.lru_cache(maxsize=4)
def _order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    order.setflags(write=False)
    return order


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Which sample each position of ``epoch`` stands for: a seeded permutation of 0..num_samples-1.

    numpy's PCG64 ``Generator`` gives the same permutation on every machine for
    the same numpy stream (the wire contract names this exact call), so every
    worker maps a position to the same sample. Cached: a worker asks for the
    same epoch over and over.
    """
    if num_samples < 1 or seed < 0 or epoch < 0:
        raise ValueError(f"epoch_order needs num_samples >= 1, seed >= 0, epoch >= 0; got {num_samples}, {seed}, "
                         f"{epoch}")
    return _order(num_samples, seed, epoch)


def spans_from_wire(ranges: Iterable) -> list[Span]:
    """``DataRange`` messages as spans (values as sent; the server's ``LeaseTable.claim`` checks them)."""
    return [Span(r.epoch, r.start, r.end) for r in ranges]


def samples_of(spans: Iterable[Span], num_samples: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, sample index) for every position of ``spans``, in order."""
    return [(span.epoch, int(index)) for span in spans
            for index in epoch_order(num_samples, seed, span.epoch)[span.start:span.end]]
