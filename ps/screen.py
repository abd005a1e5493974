"""Screening updates before they count.

Three layers, from always-on to opt-in:

1. **Bounds on every push** (always): its values are finite and at most
   ``max_abs`` in magnitude (checked chunk by chunk as they arrive, in
   the codec's receivers, ``common/codecs``), and it claims at most ``MAX_SAMPLES_PER_PUSH``
   samples. Together they keep the server's sums finite: finite values of 3e38
   from two workers overflowed the mean to inf before. Legitimate gradients,
   deltas and BatchNorm statistics stay many orders of magnitude below the
   default bound (1e8).
2. **Every new version is checked before it is published** (always, in the
   engine): a step that would make the weights non-finite, which bounded
   pushes can still cause through a diverging configuration (an lr × weight
   decay above 2), is not published and the run stops with the reason.
3. **Robust clipping** for untrusted fleets (``--clip-factor K``): each push's
   update is scaled down to at most K × the median L2 norm of recent pushes,
   and counts at most the median sample count of recent pushes. A minority of
   poisoning workers then moves the model no further than honest ones do.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import threading

import torch

from paramhub.common.codec import Piece, finite
from paramhub.common.config import MAX_UPDATE_ABS

MAX_SAMPLES_PER_PUSH = 1 << 24  # a push claiming more is refused: its weight would swamp the mean
CLIP_WINDOW = 32  # recent pushes whose norms and sample counts make the medians


def update_norm(pieces: list[Piece], regions: set[int]) -> float:
    """The L2 norm of a push's update over ``regions`` (dense and sparse pieces alike), in float64."""
    total = 0.0
    for piece in pieces:
        if piece.region in regions and piece.values.is_floating_point():
            total += float(torch.linalg.vector_norm(piece.values, dtype=torch.float32).double() ** 2)
    return math.sqrt(total)


@dataclasses.dataclass(frozen=True)
class Weighing:
    """How one push counts: ``clip`` scales its PARAM update, ``num_samples`` is its weight in the mean."""

    clip: float
    num_samples: int


class NormClip:
    """Clips each push to ``factor`` × the median norm of the recent ones (coordinate-free robust aggregation).

    The median is over the last ``window`` pushes, this one included, so a
    minority of poisoners cannot move it far; a push is never scaled up. Until
    the window holds ``min_history`` norms nothing is clipped: the first pushes of
    a run have nothing to be compared with (an attacker among the very first
    pushers gets one unclipped step; bounded by ``max_abs`` all the same).

    Args:
        factor: K, the multiple of the median norm a push may reach (> 0).
        window: how many recent pushes make the medians.
        min_history: pushes seen before clipping starts.
    """

    def __init__(self, factor: float, window: int = CLIP_WINDOW, min_history: int = 3):
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"the clip factor must be a finite number > 0, got {factor}")
        if window < 1 or min_history < 1:
            raise ValueError("window and min_history must be at least 1")
        self.factor = factor
        self.min_history = min_history
        self._norms: collections.deque[float] = collections.deque(maxlen=window)
        self._samples: collections.deque[int] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def weigh(self, norm: float, num_samples: int) -> Weighing:
        """Records one push and says how it counts."""
        with self._lock:
            self._norms.append(norm)
            self._samples.append(num_samples)
            if len(self._norms) < self.min_history:
                return Weighing(1.0, num_samples)
            limit = self.factor * statistics.median(self._norms)
            samples = min(num_samples, int(statistics.median(self._samples)))
        clip = 1.0 if norm <= limit else limit / norm
        return Weighing(clip, max(1, samples))


class UpdateScreen:
    """What the servicer asks about each received push before handing it to the engine.

    Args:
        param_regions: the regions whose values are the update (clipped); BatchNorm buffers are averaged as they are.
        max_abs: the largest magnitude a pushed value may have.
        clip: robust clipping, or None (off).
    """

    def __init__(self, param_regions: list[int], max_abs: float = MAX_UPDATE_ABS, clip: NormClip | None = None):
        if not (max_abs > 0):
            raise ValueError(f"max_abs must be > 0, got {max_abs}")
        self.max_abs = max_abs
        self.clip = clip
        self._param_regions = set(param_regions)

    def weigh(self, pieces: list[Piece], num_samples: int) -> Weighing:
        """How a push of these pieces counts (the norm is computed only when clipping is on)."""
        if self.clip is None:
            return Weighing(1.0, num_samples)
        return self.clip.weigh(update_norm(pieces, self._param_regions), num_samples)


def all_finite(tensors: list[torch.Tensor | None]) -> bool:
    """True when every floating tensor given is free of NaN and ±inf (None entries are skipped)."""
    return all(t is None or finite(t) for t in tensors)
