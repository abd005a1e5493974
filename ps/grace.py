"""The adaptive grace window of ``--quorum auto``: how long a sync round waits for its stragglers.

A round of ``SyncRounds`` with an adaptive quorum closes once the quorum has
arrived and the grace window has passed since the round's first push. The window
comes from how late pushes have been arriving: the arrival offset of a push is
the seconds after its round's first push (so every round has one offset of 0),
and the window is ``median + k · MAD`` of the offsets of the last ``history``
rounds, pooled, clamped to ``[floor, cap]``. MAD is the plain median absolute
deviation (no 1.4826 factor: for normally distributed offsets k = 3 is about
two standard deviations). Median and MAD ignore a few stragglers where mean and
standard deviation would chase them, so a slow worker now and then does not
widen the window for everyone, which is the point (hivemind issue 676; the
adaptive grace window of Decoupled DiLoCo).

Pure and clock-free: the engine measures the offsets and decides; this only does
the statistics, so it is tested against ``statistics.median`` directly.
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Iterable


class GraceWindow:
    """Estimates the grace window from the arrival offsets of recent rounds.

    Args:
        k: how many MADs above the median the window reaches.
        history: how many recent rounds are pooled (older ones are forgotten).
        floor: the shortest window, seconds (pushes arriving together still get a moment).
        cap: the longest window, seconds.
    """

    def __init__(self, k: float = 3.0, history: int = 20, floor: float = 0.05, cap: float = 60.0):
        if not (k >= 0 and math.isfinite(k)):
            raise ValueError(f"k must be a finite number >= 0, got {k}")
        if history < 1:
            raise ValueError(f"history must be at least one round, got {history}")
        if not 0 < floor <= cap:
            raise ValueError(f"need 0 < floor <= cap, got floor {floor}, cap {cap}")
        self.k = float(k)
        self.floor = float(floor)
        self.cap = float(cap)
        self._rounds: collections.deque[tuple[float, ...]] = collections.deque(maxlen=history)
        self._window: float | None = None

    def observe(self, offsets: Iterable[float]) -> None:
        """Adds one round: the arrival offsets (seconds after its first push) of its pushes.

        A round with no offsets is ignored. Raises ValueError for a negative or
        non-finite offset (a clock that went backwards is a bug, not data).
        """
        values = tuple(float(x) for x in offsets)
        if not values:
            return
        if not all(math.isfinite(x) and x >= 0 for x in values):
            raise ValueError(f"arrival offsets must be finite and >= 0, got {values}")
        self._rounds.append(values)
        samples = [x for round_offsets in self._rounds for x in round_offsets]
        median = statistics.median(samples)
        mad = statistics.median([abs(x - median) for x in samples])
        self._window = min(self.cap, max(self.floor, median + self.k * mad))

    def window(self) -> float | None:
        """The grace window in seconds; None before any round was observed (then wait for everyone)."""
        return self._window

    @property
    def rounds(self) -> int:
        """How many rounds the window is computed from."""
        return len(self._rounds)
