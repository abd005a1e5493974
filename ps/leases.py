"""The lease table: every sample of an epoch trained on exactly once, across joins, deaths and restarts.

Each position of an open epoch is in exactly one of four states:

    pending ──grant──▶ leased to a worker ──claim (a push names it)──▶ in a push ──commit (applied)──▶ done
       ▲                      │                                          │
       └──── revoke ──────────┘ (the worker died, left, joined again)    │
       ▲                      ▲                                          │
       └──────────────────────┴───────── unclaim (the push was dropped) ─┘
                                          (back to its worker if it still holds leases, else pending)

Only ``commit`` makes a position done, and the engine calls it for exactly the
pushes of an update it publishes, inside ``_publish``, under the store's lock;
a checkpoint taken under that lock therefore holds the weights and the done
positions of the same cut, and a resumed server leases out again everything
that was not done. No lock of its own: the engine calls it under the store's lock.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from paramhub.common.leases import Span, Spans
from paramhub.ps.errors import FailedPrecondition, InvalidArgument

OPEN_EPOCHS = 2  # epoch e+1 is leased out once e has nothing pending; never further ahead
MAX_SPANS_PER_PUSH = 4096  # ranges one push may name (a push trains on at most 2^24 samples)
MAX_FINGERPRINT_CHARS = 128


@dataclasses.dataclass(frozen=True)
class EpochState:
    """How one open epoch's positions stand (they add up to the dataset's samples)."""

    epoch: int
    done: int
    in_pushes: int
    leased: int
    pending: int


class NotLeased(Exception):
    """A push names positions that are not leased to its worker (any more): it is dropped, not applied."""


class LeaseTable:
    """Leases of each epoch's positions to workers, and which ones are done.

    Args:
        lease_size: positions per lease (a grant hands out whole leases).
        seed: the seed of every epoch's order (``common.leases.epoch_order``), sent to workers.
        epochs: the run is finished once this many epochs are done (None: never).
        state: what ``export`` wrote (a resumed run): done positions and counters.
    """

    def __init__(self, lease_size: int = 256, seed: int = 0, epochs: int | None = None, state: dict | None = None):
        if lease_size < 1:
            raise ValueError(f"lease_size must be at least 1, got {lease_size}")
        self.lease_size = lease_size
        self.seed = seed
        self.epochs = epochs
        self.num_samples: int | None = None  # fixed by the first pull that names the dataset
        self.fingerprint = ""
        self.completed = 0  # epochs whose every position is done
        self.next_epoch = 0  # the next epoch to open (epochs may complete out of order; none opens twice)
        self.reassigned = 0  # leased positions given back to the pool by a worker that died, left or joined again
        self._pending: dict[int, Spans] = {}  # open epoch -> positions not handed out
        self._done: dict[int, Spans] = {}
        self._leased: dict[int, dict[int, Spans]] = {}  # worker -> epoch -> positions leased to it
        self._held: dict[tuple, tuple[int, list[Span]]] = {}  # push key -> (worker, its positions)
        self.idle: set[int] = set()  # workers whose latest grant was empty
        if state:
            self._restore(state)

    # -- the dataset --------------------------------------------------------------------

    def check_dataset(self, num_samples: int, fingerprint: str) -> None:
        """The first call fixes the run's dataset; later ones must name the same.

        Raises:
            InvalidArgument: no samples, or a fingerprint too long to be one.
            FailedPrecondition: another dataset than the run's.
        """
        if not 1 <= num_samples < 1 << 40:
            raise InvalidArgument(f"dataset_samples must be from 1 to 2^40, got {num_samples}")
        if len(fingerprint) > MAX_FINGERPRINT_CHARS:
            raise InvalidArgument(f"dataset_fingerprint has {len(fingerprint)} characters, at most "
                                  f"{MAX_FINGERPRINT_CHARS}")
        if self.num_samples is None:
            self.num_samples, self.fingerprint = num_samples, fingerprint
            if not self._pending:
                self._epoch_with_pending()  # opens the next epoch, if the run has one left
            return
        if (num_samples, fingerprint) != (self.num_samples, self.fingerprint):
            raise FailedPrecondition(
                f"this run leases a dataset of {self.num_samples} samples (fingerprint {self.fingerprint[:16]}), "
                f"the worker has {num_samples} (fingerprint {fingerprint[:16]}): every worker needs the same data")

    @property
    def finished(self) -> bool:
        """Whether the run's ``epochs`` are all done."""
        return self.epochs is not None and self.completed >= self.epochs

    def _open(self, epoch: int) -> None:
        self._pending[epoch] = Spans([(0, self.num_samples)])
        self._done[epoch] = Spans()
        self.next_epoch = epoch + 1

    # -- the four moves -------------------------------------------------------------------

    def grant(self, worker_id: int, wanted: int) -> list[Span]:
        """Tops the worker's leases up to at least ``wanted`` positions (whole leases); returns all it holds.

        Leases come from the oldest open epoch with positions pending; the next epoch
        opens when none has any (at most ``OPEN_EPOCHS`` open at once). Empty when
        nothing is left to hand out: the worker is idle (a sync round does not wait for it).
        """
        held = self._leased.setdefault(worker_id, {})
        missing = wanted - sum(len(spans) for spans in held.values())
        while missing > 0:
            epoch = self._epoch_with_pending()
            if epoch is None:
                break
            for start, end in self._pending[epoch].take(self.lease_size):
                held.setdefault(epoch, Spans()).add(start, end)
                missing -= end - start
        leases = self.leases_of(worker_id)
        (self.idle.discard if leases else self.idle.add)(worker_id)
        return leases

    def _epoch_with_pending(self) -> int | None:
        """The oldest open epoch with positions pending, opening the next one when needed."""
        for epoch in sorted(self._pending):
            if self._pending[epoch]:
                return epoch
        if self.num_samples is None or len(self._pending) >= OPEN_EPOCHS:
            return None
        if self.epochs is not None and self.next_epoch >= self.epochs:
            return None
        epoch = self.next_epoch
        self._open(epoch)
        return epoch

    def leases_of(self, worker_id: int) -> list[Span]:
        """The positions leased to a worker (not in its pushes), oldest epoch and position first."""
        held = self._leased.get(worker_id, {})
        return [Span(epoch, start, end) for epoch in sorted(held) for start, end in held[epoch].intervals()]

    def claim(self, worker_id: int, key: tuple, spans: Sequence[Span], num_samples: int) -> None:
        """A push of ``worker_id`` trained on ``spans``: they move from its leases into the push ``key``.

        All or nothing: on any error the leases are as before.

        Raises:
            InvalidArgument: no spans, too many, empty or reversed ones, or lengths that do not add up
                to ``num_samples``.
            NotLeased: a position that is not leased to this worker (it was revoked, or never was).
        """
        if not spans:
            raise InvalidArgument("data leases are on: a push names the positions it trained on (PushHeader.trained)")
        if len(spans) > MAX_SPANS_PER_PUSH:
            raise InvalidArgument(f"a push names at most {MAX_SPANS_PER_PUSH} ranges, this one {len(spans)}")
        if any(span.start >= span.end for span in spans):
            raise InvalidArgument("every trained range needs start < end")
        if sum(len(span) for span in spans) != num_samples:
            raise InvalidArgument(f"the trained ranges hold {sum(len(s) for s in spans)} positions, but num_samples "
                                  f"says {num_samples}")
        if key in self._held:
            raise FailedPrecondition(f"push {key} already holds positions")
        held = self._leased.get(worker_id, {})
        taken: list[Span] = []
        try:
            for span in spans:
                mine = held.get(span.epoch)
                if mine is None or not mine.covers(span.start, span.end):
                    raise NotLeased(f"positions [{span.start}, {span.end}) of epoch {span.epoch} are not leased to "
                                    "this worker (any more)")
                mine.remove(span.start, span.end)
                taken.append(span)
        except NotLeased:
            for span in taken:
                held[span.epoch].add(span.start, span.end)
            raise
        self._held[key] = (worker_id, taken)

    def commit(self, key: tuple) -> list[Span]:
        """The push ``key`` is in a published update: its positions are done (epochs that fill up complete).

        Returns them (a standby records the same with ``record_done``).
        """
        _, spans = self._held.pop(key, (None, []))
        self._mark_done(spans)
        return spans

    def record_done(self, spans: Sequence[Span]) -> None:
        """A standby's table: positions its primary counted done. Nothing is leased on a standby, so they
        are pending here; epochs the primary opened since are opened first."""
        for span in spans:
            while span.epoch >= self.next_epoch:
                self._open(self.next_epoch)
            self._pending[span.epoch].remove(span.start, span.end)
        self._mark_done(spans)

    def _mark_done(self, spans: Sequence[Span]) -> None:
        for span in spans:
            self._done[span.epoch].add(span.start, span.end)
        for epoch in sorted({span.epoch for span in spans}):
            if len(self._done[epoch]) == self.num_samples:
                del self._pending[epoch], self._done[epoch]
                self.completed += 1

    def unclaim(self, key: tuple) -> None:
        """The push ``key`` was dropped or failed: its positions go back to its worker, or to the pool if revoked."""
        worker_id, spans = self._held.pop(key, (None, []))
        held = self._leased.get(worker_id)
        for span in spans:
            if held is not None:
                held.setdefault(span.epoch, Spans()).add(span.start, span.end)
            else:
                self._pending[span.epoch].add(span.start, span.end)

    def revoke(self, worker_id: int) -> int:
        """The worker died, left or joined again: its leases go back to the pool; returns how many positions.

        Its pushes the engine still holds keep their positions (they may yet be applied).
        """
        held = self._leased.pop(worker_id, {})
        self.idle.discard(worker_id)
        returned = 0
        for epoch, spans in held.items():
            for start, end in spans.intervals():
                self._pending[epoch].add(start, end)
                returned += end - start
        self.reassigned += returned
        return returned

    # -- reporting and checkpoints ----------------------------------------------------------

    def restored(self, state: dict | None) -> "LeaseTable":
        """A fresh table with these settings and ``state`` (a standby takes its primary's so)."""
        return LeaseTable(self.lease_size, self.seed, self.epochs, state=state)

    def summary(self) -> list[EpochState]:
        """Each open epoch's positions by state, the oldest first."""
        states = []
        for epoch in sorted(self._pending):
            in_pushes = sum(len(s) for _, spans in self._held.values() for s in spans if s.epoch == epoch)
            leased = sum(len(by_epoch[epoch]) for by_epoch in self._leased.values() if epoch in by_epoch)
            states.append(EpochState(epoch, len(self._done[epoch]), in_pushes, leased, len(self._pending[epoch])))
        return states

    def export(self) -> dict:
        """The table for a checkpoint (JSON): the dataset, counters and done positions of the open epochs.

        Leases and pushes in flight are not kept: after a restart their positions are pending again.
        """
        return {"num_samples": self.num_samples, "fingerprint": self.fingerprint, "lease_size": self.lease_size,
                "seed": self.seed, "completed": self.completed, "reassigned": self.reassigned,
                "next_epoch": self.next_epoch,
                "done": {str(epoch): spans.intervals() for epoch, spans in self._done.items()}}

    def _restore(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the checkpoint's leases follow seed {state['seed']}, this server's --seed is "
                             f"{self.seed}: resume with the same seed")
        self.completed = int(state["completed"])
        self.reassigned = int(state["reassigned"])
        self.next_epoch = int(state["next_epoch"])
        if state.get("num_samples") is None:
            return
        self.num_samples, self.fingerprint = int(state["num_samples"]), str(state["fingerprint"])
        for epoch, intervals in sorted((int(e), v) for e, v in state["done"].items()):
            done = Spans(tuple(interval) for interval in intervals)
            self._done[epoch] = done
            pending = Spans([(0, self.num_samples)])
            for start, end in done.intervals():
                pending.remove(start, end)
            self._pending[epoch] = pending
            self.next_epoch = max(self.next_epoch, epoch + 1)
