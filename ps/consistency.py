"""Who may apply when: the consistency engines.

An engine owns a push on the server from its header to its reply. Before the
push is received, ``begin`` answers a retry from memory or lets the push in
(``PushIntake``: at most ``--concurrent-pushes`` received at once); once it is
received whole and validated, ``submit`` decides, under the store's lock, whether
it joins the current round, is applied, waits, or is dropped. The engine keeps
each worker's last push and its reply, so a retried push is applied at most once,
and the ledger of applied updates. The servicer calls ``begin``, ``submit``,
``release`` and ``on_pull`` without knowing which engine it has; the Ticker calls
``tick``.

- ``SyncRounds`` (``--mode sync``): bulk-synchronous rounds with backup workers,
  or (``--quorum auto``) rounds that close after a quorum and an adaptive grace
  window and fold late pushes into the next update.
- ``AsyncEngine`` (``--mode async``): each push applies on arrival; with a
  staleness bound s, no push more than s versions stale is applied, and pushes
  that would push a slower worker past the bound wait for it (SSP). With
  ``batch_share`` each update is scaled by its share of the global batch, so
  ``--lr`` is the synchronous-equivalent rate.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from typing import Callable

import torch


from paramhub.common.codec import Piece
from paramhub.common.leases import Span
from paramhub.common.layout import BUFFER, PARAM
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.errors import FailedPrecondition, InvalidArgument
from paramhub.ps.grace import GraceWindow
from paramhub.ps.intake import PushIntake, Ticket
from paramhub.ps.leases import LeaseTable, NotLeased
from paramhub.ps.ledger import Ledger, LedgerEntry
from paramhub.ps.metrics import MetricsHook
from paramhub.ps.registry import WorkerRecord, WorkerRegistry
from paramhub.ps.rules import UpdateRule, WeightedMean
from paramhub.ps.screen import all_finite
from paramhub.ps.store import ParameterStore

log = logging.getLogger("paramhub.ps")


@dataclasses.dataclass(frozen=True)
class StagedPush:
    """A push whose bytes all arrived and passed validation."""

    worker_id: int
    incarnation: int
    sequence: int
    base_version: int
    num_samples: int
    loss: float
    pieces: list[Piece]  # the update's values, as received (codec.whole_regions for full tensors)
    keeps_base: bool = False  # the worker goes on computing from base_version (it overlaps transfers)
    clip: float = 1.0  # robust clipping's factor for the PARAM update (screen.NormClip; 1.0 when off)
    trained: tuple[Span, ...] = ()  # data leases: the positions the push trained on

    @property
    def key(self) -> tuple[int, int, int]:
        """Who sent it and which of their pushes it is: (worker id, incarnation, sequence)."""
        return self.worker_id, self.incarnation, self.sequence


@dataclasses.dataclass(frozen=True)
class PushResult:
    """The engine's answer, turned into a PushResponse by the servicer."""

    outcome: int  # pb.PushOutcome
    version: int
    next_version: int
    done: bool
    reason: str = ""  # why a push was dropped: closed_round, too_stale, run_done or not_leased
    base_kept: bool = False  # a keeps_base push whose base still counts as pending (SSP)


@dataclasses.dataclass(frozen=True)
class AppliedUpdate:
    """What the rule consumed to make one version: a standby applies it and ends bitwise equal.

    ``regions`` are the averaged update (PARAM: the mean after ``share``; BUFFER: the
    plain means) in the layout's dtypes; ``pushes`` the (worker id, incarnation,
    sequence) of each push in it (for the dedup memory); ``extra`` JSON-able state
    deltas of other features, handed to ``ConsistencyEngine._apply_extra``.
    """

    version: int  # the version the update produces
    regions: list  # torch tensors, one per layout region
    share: float
    entries: list[LedgerEntry]
    loss: float
    pushes: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Progress:
    """The run's progress in one consistent cut: what Status and the status page both show."""

    version: int
    done: bool
    staleness_histogram: dict[int, int]  # staleness -> applied pushes
    applied_per_worker: dict[int, int]  # worker id -> applied pushes
    pushes_dropped: int
    last_loss: float  # mean loss of the last applied update (NaN before any)

    @property
    def pushes_applied(self) -> int:
        return sum(self.staleness_histogram.values())


def damping_scale(staleness: int) -> float:
    """Staleness-aware damping: an update ``staleness`` versions old counts 1/(1+staleness)."""
    return 1.0 / (1.0 + staleness)


class ConsistencyEngine:
    """Shared machinery: a push's way in (``intake``), progress accounting, the ledger, applying a mean update.

    Subclasses implement ``_admit`` (and optionally ``_on_tick``, ``on_pull``),
    called with the store's lock held.

    Args:
        store: the global state.
        rule: turns the mean PARAM update into new weights.
        registry: the workers.
        max_versions: finish the run at this version (None: never).
        damping: scale each update by 1/(1+staleness).
        ledger: the applied updates so far (a resumed run's); default empty.
        metrics: where events go (the server's ServerMetrics); default nowhere.
        concurrent_pushes: pushes received at once (each holds up to the model's wire size).
        clock: injectable monotonic clock.
        leases: the data lease table (``--data-leases``); None: workers train on their own shards.
        min_workers: N, the trainers the run starts with (``--workers``): a round waits for the members,
            and never for fewer than N less the lost ones (``expected``).
        on_published: called with each published version's ``AppliedUpdate`` (store's lock held).
    """

    def __init__(self, store: ParameterStore, rule: UpdateRule, registry: WorkerRegistry, *,
                 max_versions: int | None = None, damping: bool = False, ledger: Ledger | None = None,
                 metrics: MetricsHook | None = None, concurrent_pushes: int = 1,
                 clock: Callable[[], float] = time.monotonic, leases: LeaseTable | None = None,
                 min_workers: int = 1, on_published: Callable[["AppliedUpdate"], None] | None = None):
        self.store = store
        # called under the store's lock with each published version's AppliedUpdate (ps/replication.py)
        self.on_published = on_published
        # --replicate-in-wire-dtype: each averaged PARAM update is rounded to this dtype before the rule
        self.update_dtype: torch.dtype | None = None
        self.rule = rule
        self.registry = registry
        self.leases = leases
        self.min_workers = min_workers
        self.max_versions = max_versions
        self.damping = damping
        self._clock = clock
        layout = store.layout
        self._param_regions = layout.region_indices(PARAM)
        self._buffer_regions = layout.region_indices(BUFFER)
        self._mean = WeightedMean(store.snapshot().regions)  # the next update, accumulated in place
        self._losses: list[float] = []
        self.ledger = ledger or Ledger()
        self.pushes_dropped = 0
        self.last_loss = float("nan")
        self.metrics = metrics or MetricsHook()
        # set when the engine has a new deadline sooner than the Ticker's next tick (see ``due_in``)
        self.wakeup = threading.Event()
        # dedup memory, pushes being received, duplicates waiting: all under the store's lock
        self.intake = PushIntake(store.lock, limit=concurrent_pushes, clock=clock)

    # -- called by the servicer -----------------------------------------------------

    def begin(self, worker_id: int, incarnation: int, sequence: int, wait_s: float = 30.0) -> PushResult | Ticket:
        """Before a push is received: the reply of the push it retries, or a ticket to receive it.

        A retry waits up to ``wait_s`` for an original the engine still holds; any other
        push waits for its place among those received at once (``PushIntake.begin``).
        The ticket goes to ``submit`` with the push, or to ``release`` if none follows.
        """
        return self.intake.begin(worker_id, incarnation, sequence, wait_s)

    def submit(self, push: StagedPush, ticket: Ticket | None = None) -> PushResult:
        """Handles one push, received whole and validated, exactly once.

        ``ticket`` is what ``begin`` gave before the push was received; a push already
        in memory (no ticket) begins here. A retry of the push in progress or of the
        last one gets the same reply; an older sequence is refused.
        """
        if ticket is None:
            ticket = self.begin(push.worker_id, push.incarnation, push.sequence)
            if not isinstance(ticket, Ticket):
                return ticket  # a retry of the last push: its reply
        with self.store.lock:
            try:
                record = self.registry.get(push.worker_id, push.incarnation)
                self.registry.activate(push.worker_id)  # pushing from Join's version counts like a pull
                original = self.intake.take(ticket)  # from here on it holds no place, waiting or not
                if original is not None:
                    return original  # a duplicate: the reply of the push it repeats
                result = (self._result(pb.PUSH_OUTCOME_DROPPED, reason="run_done") if self.store.done
                          else self._admit_trained(push, record))
            except BaseException:
                self.intake.release(ticket)  # nothing was applied
                raise
            self.intake.answer(ticket, result)
            accepted = result.outcome == pb.PUSH_OUTCOME_ACCEPTED
            self.registry.count_push(push.worker_id, accepted, push.base_version, push.loss)
            if accepted:
                self.metrics.push_accepted(push.worker_id, push.num_samples)
            else:
                self.pushes_dropped += 1
                self.metrics.push_dropped(push.worker_id, result.reason)
            return result

    def _admit_trained(self, push: StagedPush, record: WorkerRecord) -> PushResult:
        """``_admit``, with the push's data leases claimed first and given back unless it was taken."""
        if self.leases is None:
            return self._admit(push, record)
        try:
            self.leases.claim(push.worker_id, push.key, push.trained, push.num_samples)
        except NotLeased as exc:
            log.info("dropped push of %s: %s", record.name, exc,
                     extra={"event": "push_dropped", "reason": "not_leased", "worker": record.name})
            return self._result(pb.PUSH_OUTCOME_DROPPED, reason="not_leased")
        try:
            result = self._admit(push, record)
        except BaseException:
            self.leases.unclaim(push.key)
            raise
        if result.outcome != pb.PUSH_OUTCOME_ACCEPTED:
            self.leases.unclaim(push.key)  # a no-op for a push already applied (committed)
        return result

    def release(self, ticket: Ticket) -> None:
        """Ends a ticket however its push ended (a dry run, a stream cut short, an error); idempotent."""
        self.intake.release(ticket)

    def progress(self) -> Progress:
        """Version, ledger summary and counters, taken together under the store's lock."""
        with self.store.lock:
            snap = self.store.snapshot()
            return Progress(snap.version, snap.done, dict(self.ledger.staleness_histogram),
                            dict(self.ledger.applied_per_worker), self.pushes_dropped, self.last_loss)

    def on_pull(self, worker_id: int, version: int) -> None:
        """A worker is about to receive ``version`` (its next push will be based on it): it is a member now."""
        self.registry.activate(worker_id)

    def grant_leases(self, worker_id: int, num_samples: int, fingerprint: str, wanted: int) -> list[Span]:
        """A trainer's pull asks for data: the dataset is checked and its leases topped up (``LeaseTable.grant``).

        Raises:
            FailedPrecondition: the run has no data leases, or another dataset.
            InvalidArgument: a dataset or a number of samples no worker sends.
        """
        if self.leases is None:
            raise FailedPrecondition("this run has no data leases (ps-server --data-leases): train on a shard")
        if not 1 <= wanted <= MAX_LEASE_WANTED:
            raise InvalidArgument(f"lease_samples_wanted must be from 1 to {MAX_LEASE_WANTED}, got {wanted}")
        with self.store.lock:
            self.leases.check_dataset(num_samples, fingerprint)
            return self.leases.grant(worker_id, wanted)

    def members(self) -> set[int]:
        """The trainers that count now: live, pulled or pushed since they joined, with data to train on."""
        members = self.registry.members()
        if self.leases is None:
            return members
        with self.store.lock:  # reentrant: engines call this holding it, Status does not
            return members - self.leases.idle

    def expected(self) -> int:
        """The pushes a sync round waits for at most: the members, and never fewer than ``min_workers`` less
        the trainers lost (so the first rounds wait for the N the run starts with, joined or still to come).

        A joiner counts from its first pull: one that joins mid-round does not hold that round back.
        Under data leases, a worker with nothing to train on (idle) is not waited for.
        """
        with self.store.lock:
            idle = len(self.leases.idle) if self.leases is not None else 0
            floor = self.min_workers - self.registry.lost_trainers() - idle
            return max(1, floor, len(self.members()))

    def lease_summary(self) -> tuple[list, int]:
        """The open epochs' ``EpochState``s and the epochs completed, in one cut (empty without leases)."""
        if self.leases is None:
            return [], 0
        with self.store.lock:
            return self.leases.summary(), self.leases.completed

    def on_departure(self, worker_id: int) -> None:
        """A worker left, was lost, or joined again as a new incarnation: its leases go back to the pool."""
        if self.leases is not None:
            with self.store.lock:
                returned = self.leases.revoke(worker_id)
            if returned:
                self.metrics.leases_reassigned(returned)

    def tick(self) -> None:
        """Periodic housekeeping: expire leases, let the engine react (round timeouts)."""
        lost = self.registry.expire()  # their leases go back through the registry's on_departure
        known = self.registry.known_ids()
        with self.store.lock:
            self.intake.keep_only(known)  # forgotten records never push again
            if not self.store.done:
                self._on_tick([r.worker_id for r in lost])
            self.store.lock.notify_all()

    def due_in(self) -> float | None:
        """Seconds until the engine next needs a tick sooner than the Ticker's interval; None: no such need."""
        return None

    @property
    def round_pushes(self) -> int:
        """Pushes held for the next update (sync: the round so far; async: those waiting)."""
        return 0

    # -- for subclasses -------------------------------------------------------------

    def _admit(self, push: StagedPush, record: WorkerRecord) -> PushResult:
        raise NotImplementedError

    def _on_tick(self, lost_worker_ids: list[int]) -> None:
        pass

    def _result(self, outcome: int, next_version: int | None = None, reason: str = "",
                base_kept: bool = False) -> PushResult:
        version = self.store.version
        return PushResult(outcome, version, version if next_version is None else next_version, self.store.done,
                          reason, base_kept)

    def _accumulate(self, push: StagedPush, damp: bool | None = None) -> LedgerEntry:
        """Adds a push to the next update's mean (damped for its staleness); returns its ledger line.

        ``damp`` overrides the engine's ``damping`` for this push. The ledger
        line's ``version`` and ``share`` are filled in by ``_publish``.
        """
        staleness = self.store.version - push.base_version
        scale = (damping_scale(staleness) if (self.damping if damp is None else damp) else 1.0) * push.clip
        per_region = [scale if r in self._param_regions else 1.0 for r in range(len(self.store.layout.regions))]
        self._mean.add(push.pieces, float(push.num_samples), per_region)
        self._losses.append(push.loss)
        return LedgerEntry(0, push.worker_id, push.sequence, push.base_version, staleness, scale, push.num_samples,
                           incarnation=push.incarnation)

    def _publish(self, contributions: list[LedgerEntry], share: float = 1.0) -> int:
        """Applies the accumulated mean as one update; returns the new version.

        PARAM regions go through the update rule, their mean first multiplied by
        ``share`` (async: the update's share of the global batch); BUFFER regions
        (BatchNorm statistics) become the plain sample-weighted mean. With
        ``on_published`` set, what the rule consumed goes to it as an ``AppliedUpdate``
        once the version is published (a standby applies it the same way).
        """
        averaged = self._mean.mean_()  # in place: the sums become the mean
        if share != 1.0:  # skipped at 1.0, so an unscaled update stays bit for bit what it was
            for r in self._param_regions:
                averaged[r].mul_(share)
        if self.update_dtype is not None:  # rounded to the wire dtype here too: a standby gets it in half the bytes
            for r in self._param_regions:
                averaged[r].copy_(averaged[r].to(self.update_dtype))
        loss = sum(self._losses) / len(self._losses)
        self._losses.clear()
        version = self.store.version + 1
        entries = [dataclasses.replace(entry, version=version, share=share) for entry in contributions]
        # the rule overwrites the mean with the new weights: a standby needs the mean itself
        hook = self.on_published
        narrow = set(self._param_regions) if self.update_dtype is not None else set()
        update = (AppliedUpdate(version, [t.to(self.update_dtype) if r in narrow else t.clone()
                                          for r, t in enumerate(averaged)], share, entries, loss,
                                pushes=[(e.worker_id, self.intake.incarnation_of(e.worker_id), e.sequence)
                                        for e in entries])
                  if hook is not None else None)
        new_version = self._install(averaged, version - 1, entries, loss)
        # The next sums take the memory of an old version that no pull reads any more, so a
        # steady run allocates nothing of the model's size per update.
        self._mean.reset(self.store.reclaim())
        if self.leases is not None and new_version == version:
            # the positions of the applied pushes are done in the same cut as the weights; a standby
            # marks the same ones (``_apply_extra``)
            trained = [span for entry in entries for span in self.leases.commit(entry.key)]
            if update is not None:
                update.extra["trained"] = [[span.epoch, span.start, span.end] for span in trained]
                update.extra["dataset"] = [self.leases.num_samples, self.leases.fingerprint]
            self._finish_after_epochs(new_version)
        if update is not None and new_version == version:
            hook(update)
        return new_version

    def apply_replicated(self, update: "AppliedUpdate") -> int:
        """A standby applies its primary's ``update`` through the same rule; returns the new version.

        Its pushes' replies go into the dedup memory, so a push retried here after a
        failover gets its original's reply instead of being applied twice.

        Raises:
            ValueError: the update does not follow the store's version (a gap or a repeat).
        """
        with self.store.lock:
            if update.version != self.store.version + 1:
                raise ValueError(f"replicated update for version {update.version}, but the store is at "
                                 f"{self.store.version}: a gap or a repeat")
            dtypes = [region.dtype for region in self.store.layout.regions]
            regions = [t if t.dtype == dtypes[r] else t.to(dtypes[r]) for r, t in enumerate(update.regions)]
            new_version = self._install(regions, self.store.version, update.entries, update.loss)
            if new_version != update.version:
                raise ValueError(f"replicated update {update.version} diverged here")
            reply = self._result(pb.PUSH_OUTCOME_ACCEPTED)
            for worker_id, incarnation, sequence in update.pushes:
                self.intake.remember(worker_id, incarnation, sequence, reply)
            self._apply_extra(update.extra)
            self.store.lock.notify_all()
            return new_version

    def _apply_extra(self, extra: dict) -> None:
        """Per-version state other features replicate (``AppliedUpdate.extra``): the data leases' done positions."""
        if self.leases is not None and "trained" in extra:
            if extra["dataset"][0] is not None:
                self.leases.check_dataset(int(extra["dataset"][0]), str(extra["dataset"][1]))
            self.leases.record_done([Span(int(e), int(start), int(end)) for e, start, end in extra["trained"]])
            self._finish_after_epochs(self.store.version)

    def _install(self, averaged: list, version: int, entries: list[LedgerEntry], loss: float) -> int:
        """The rule on the mean ``averaged`` (overwritten), then publish, ledger, done: shared with the standby."""
        snapshot = self.store.snapshot()
        regions = list(snapshot.regions)
        for r in self._param_regions:
            state = self.store.rule_state.setdefault(r, {})
            # the new weights overwrite the mean, which is not needed after the step
            regions[r] = self.rule.apply(snapshot.regions[r], averaged[r], state, snapshot.version, out=averaged[r])
        for r in self._buffer_regions:
            regions[r] = averaged[r]
        if not self._finite(regions):
            return self._diverged(snapshot.version)
        new_version = self.store.publish(regions)
        for entry in entries:
            self.ledger.record(entry)
        self.last_loss = loss
        self.metrics.update_applied(new_version, self.last_loss, entries)
        if self.max_versions is not None and new_version >= self.max_versions:
            log.info("reached version %d of %d: run complete", new_version, self.max_versions,
                     extra={"event": "run_complete", "version": new_version})
            self.store.finish()
        return new_version

    def _finish_after_epochs(self, version: int) -> None:
        """Under data leases with ``--epochs``: the run is complete once the last epoch is trained."""
        if self.leases is not None and self.leases.finished and not self.store.done:
            log.info("all %d epochs trained at version %d: run complete", self.leases.epochs, version,
                     extra={"event": "run_complete", "version": version, "epochs": self.leases.epochs})
            self.store.finish()

    def _finite(self, regions: list) -> bool:
        """Whether the new weights, buffers and optimizer state are all finite (one pass each)."""
        state = [t for r in self._param_regions for t in self.store.rule_state.get(r, {}).values()]
        return all_finite([regions[r] for r in self._param_regions + self._buffer_regions] + state)

    def _diverged(self, version: int) -> int:
        """The step from ``version`` is not finite: it is not published and the run stops (screen.py, layer 2).

        Pushes are bounded (finite, at most ``--max-update-abs``), so only the
        configuration can get here: a step that grows the weights each version
        (lr × weight decay above 2, an outer lr far above 1). Going on would
        publish inf; the optimizer state may already hold it, so no later
        checkpoint is written either (``ParameterStore.fail``).
        """
        reason = (f"the update to version {version + 1} made the weights or the optimizer state non-finite; it was "
                  f"not published and the run stops at version {version} (lower --lr, --weight-decay or "
                  f"--outer-lr; the last checkpoint holds finite weights)")
        log.error("%s", reason, extra={"event": "run_diverged", "version": version})
        self._mean.reset(None)
        self._losses.clear()
        self.store.fail(reason)
        return version


QUORUM_MODES = ("all", "auto")
MAX_LEASE_WANTED = 1 << 24  # positions one pull may ask to hold (a push trains on at most 2^24 samples)


def auto_quorum(num_workers: int, backup_workers: int = 0) -> int:
    """The quorum of ``--quorum auto``: N − b when backup workers are given, else a strict majority of N."""
    return num_workers - backup_workers if backup_workers else num_workers // 2 + 1


class SyncRounds(ConsistencyEngine):
    """Bulk-synchronous rounds (BSP), with backup workers or an adaptive quorum, and bounded waits.

    Round r takes pushes based on version r. ``round_timeout`` closes a round with
    whatever arrived, so a round never waits forever. Workers whose lease expired
    are not waited for.

    Who a round waits for follows the membership (``expected``): the live workers
    that pulled or pushed since they joined, and never fewer than N less the lost
    ones, so the first rounds wait for the N the run starts with.

    ``quorum="all"`` (the default): a round closes when that many less b pushes
    arrived. Pushes for a closed round are dropped and counted; the worker is
    told to pull (backup workers).

    ``quorum="auto"`` or an integer Q (adaptive): a round closes when (a) every
    expected worker pushed, or (b) at least the quorum pushed (``auto``: expected − b
    if backup workers are given, else a strict majority of them; or Q) and the
    grace window has passed since the round's first push. The window is
    median + k·MAD of recent rounds' arrival offsets (``GraceWindow``); before
    any round was measured it is unknown and a round waits for everyone (a).
    A round's offsets are measured once it is complete: at once if everyone
    pushed on time, else at the next close, with its late arrivals.

    A late push (based on the previous round, whose worker did not push for it
    yet) is not wasted: it is accepted and added to the *current* round's mean,
    damped by 1/(1 + staleness) = 1/2, and recorded in the ledger with its true
    base version and staleness 1. It does not count towards the current round's
    quorum, and its worker is told to pull the current version: that worker's
    fresh push for the current round is accepted as well (one push per worker per
    round, counted by the round its base belongs to). A push two or more rounds
    late is dropped (``too_stale``); a second push for the previous round from a
    worker that already gave one is dropped (``closed_round``).

    Args:
        num_workers: N, the workers the run starts with (``--workers``).
        backup_workers: b, how many of the slowest pushes a round does not wait for.
        round_timeout: seconds after a round's first push before it closes anyway.
        quorum: ``"all"``, ``"auto"`` or a number of pushes Q (1 ≤ Q ≤ N).
        grace: the window estimator for an adaptive quorum (default ``GraceWindow()``).
    """

    def __init__(self, store: ParameterStore, rule: UpdateRule, registry: WorkerRegistry, *,
                 num_workers: int, backup_workers: int = 0, round_timeout: float | None = None,
                 quorum: str | int = "all", grace: GraceWindow | None = None, **kwargs):
        super().__init__(store, rule, registry, min_workers=num_workers, **kwargs)
        if not 0 <= backup_workers < num_workers:
            raise ValueError(f"backup workers ({backup_workers}) must be fewer than workers ({num_workers})")
        if isinstance(quorum, bool) or not (quorum in QUORUM_MODES or
                                            isinstance(quorum, int) and 1 <= quorum <= num_workers):
            raise ValueError(f"quorum must be 'all', 'auto' or a number from 1 to {num_workers}, got {quorum!r}")
        self.num_workers = num_workers
        self.backup_workers = backup_workers
        self.round_timeout = round_timeout
        self.adaptive = quorum != "all"
        self._fixed_quorum = quorum if isinstance(quorum, int) else None  # None: auto (follows the members)
        self.grace = (grace or GraceWindow()) if self.adaptive else None
        self._round: list[LedgerEntry] = []  # pushes already added to the mean
        self._round_started: float | None = None
        # adaptive quorum only
        self._offsets: list[float] = []  # arrival offsets of this round's pushes
        self._late: list[LedgerEntry] = []  # late pushes for the previous round, folded into this one
        self._previous_started: float | None = None  # when the previous round's first push came
        self._previous_offsets: list[float] | None = None  # its offsets, while late arrivals may add to them
        self._previous_workers: set[int] = set()  # who contributed to the previous round (on time or late)
        self._logged_window: float | None = None

    @property
    def round_pushes(self) -> int:
        with self.store.lock:
            return len(self._round) + len(self._late)

    def quorum(self) -> int:
        """Pushes needed to close the current round (adaptive: once the grace window has passed).

        It follows the membership (``expected``): all: the members less b; auto: the
        members less b when b is given, else their majority; Q: Q, or all members when fewer.
        """
        expected = self.expected()
        if not self.adaptive:
            return max(1, expected - self.backup_workers)
        if self._fixed_quorum is not None:
            return min(self._fixed_quorum, expected)
        return max(1, auto_quorum(expected, self.backup_workers))

    def due_in(self) -> float | None:
        with self.store.lock:
            window = self.grace.window() if self.adaptive else None
            if window is None or self.store.done or self._round_started is None or len(self._round) < self.quorum():
                return None
            return max(0.0, self._round_started + window - self._clock())

    def _grace_passed(self, now: float) -> bool:
        window = self.grace.window()
        return (window is not None and len(self._round) >= self.quorum()
                and now - self._round_started >= window)

    def _admit(self, push: StagedPush, record: WorkerRecord) -> PushResult:
        version = self.store.version
        if push.base_version < version:
            if self.adaptive:
                return self._admit_late(push, record, version)
            log.info("dropped push of %s for closed round %d (now %d)", record.name, push.base_version, version,
                     extra={"event": "push_dropped", "reason": "closed_round", "worker": record.name,
                            "base_version": push.base_version, "version": version})
            return self._result(pb.PUSH_OUTCOME_DROPPED, reason="closed_round")
        if push.base_version > version:
            raise FailedPrecondition(f"push based on version {push.base_version}, but the server is at {version}")
        if any(p.worker_id == push.worker_id for p in self._round):
            raise FailedPrecondition(f"{record.name} already pushed for round {version}; pull before pushing again")
        self._round.append(self._accumulate(push))  # in place: memory does not grow with workers
        now = self._clock()
        if self._round_started is None:
            self._round_started = now
        if not self.adaptive:
            if len(self._round) >= self.quorum():
                self._close_round("quorum")
        else:
            self._offsets.append(now - self._round_started)
            if len(self._round) >= self.expected():
                self._close_round("quorum")
            elif self._grace_passed(now):
                self._close_round("grace window")
            elif len(self._round) == self.quorum() and self.grace.window() is not None:
                self.wakeup.set()  # the Ticker closes the round when the window ends
        return self._result(pb.PUSH_OUTCOME_ACCEPTED, next_version=version + 1)

    def _admit_late(self, push: StagedPush, record: WorkerRecord, version: int) -> PushResult:
        """Adaptive quorum: a push for a closed round joins the current one, damped, or is dropped."""
        late = version - push.base_version
        if late > 1:
            log.info("dropped push of %s: %d rounds late", record.name, late,
                     extra={"event": "push_dropped", "reason": "too_stale", "worker": record.name,
                            "base_version": push.base_version, "version": version})
            return self._result(pb.PUSH_OUTCOME_DROPPED, reason="too_stale")
        if push.worker_id in self._previous_workers:
            log.info("dropped push of %s: it already pushed for round %d", record.name, push.base_version,
                     extra={"event": "push_dropped", "reason": "closed_round", "worker": record.name,
                            "base_version": push.base_version, "version": version})
            return self._result(pb.PUSH_OUTCOME_DROPPED, reason="closed_round")
        self._previous_workers.add(push.worker_id)
        if self._previous_offsets is not None:
            self._previous_offsets.append(self._clock() - self._previous_started)
        self._late.append(self._accumulate(push, damp=True))
        log.info("late push of %s for round %d folded into round %d, damped", record.name, push.base_version,
                 version, extra={"event": "push_folded", "worker": record.name, "base_version": push.base_version,
                                 "version": version, "scale": self._late[-1].scale})
        return self._result(pb.PUSH_OUTCOME_ACCEPTED)  # next_version = version: pull, then push for this round

    def _on_tick(self, lost_worker_ids: list[int]) -> None:
        if not self._round:
            return
        now = self._clock()
        if len(self._round) >= (self.expected() if self.adaptive else self.quorum()):
            self._close_round("lost workers")
        elif self.adaptive and self._grace_passed(now):
            self._close_round("grace window")
        elif self.round_timeout is not None and now - self._round_started > self.round_timeout:
            self._close_round("round timeout")

    def _close_round(self, reason: str) -> None:
        count, expected = len(self._round), self.expected()
        self.metrics.round_waited(self._clock() - self._round_started)
        version = self._publish(self._round + self._late)
        # every round is an event for JSON logs; only the ones that did not wait for their quorum (and,
        # adaptive, the grace window) are news
        log.log(logging.DEBUG if reason in ("quorum", "grace window") else logging.WARNING,
                "round %d closed by %s with %d of %d pushes", version - 1, reason, count, expected,
                extra={"event": "round_closed", "round": version - 1, "reason": reason, "pushes": count,
                       "workers": expected, "late_pushes": len(self._late)})
        if self.adaptive:
            self._measure(complete=count >= self.expected())
        self._round = []
        self._round_started = None

    def _measure(self, complete: bool) -> None:
        """Feeds the grace window: the previous round (its late arrivals are in), and this one if complete."""
        if self._previous_offsets is not None:
            self._observe(self._previous_offsets)
        self._previous_started = self._round_started
        self._previous_workers = {entry.worker_id for entry in self._round}
        if complete:
            self._observe(self._offsets)
            self._previous_offsets = None
        else:
            self._previous_offsets = self._offsets
        self._offsets = []
        self._late = []

    def _observe(self, offsets: list[float]) -> None:
        self.grace.observe(offsets)
        window, logged = self.grace.window(), self._logged_window
        if window is not None and (logged is None or abs(window - logged) > 0.2 * logged):
            log.info("grace window now %.3fs (median + %g MAD over %d rounds)", window, self.grace.k,
                     self.grace.rounds, extra={"event": "grace_window", "window_s": window, "k": self.grace.k,
                                               "rounds": self.grace.rounds})
            self._logged_window = window


class AsyncEngine(ConsistencyEngine):
    """Asynchronous updates, optionally with a staleness bound (stale-synchronous parallel).

    Without a bound every push is applied when it arrives. With bound s:

    - a push whose staleness (version now − its base version) exceeds s is dropped
      and the worker told to pull;
    - a worker is *pending* from its pull until its push is applied, with the
      version it pulled; applying an update must not leave any live pending worker
      more than s versions behind, so a push that would do so waits (inside its
      Push call) for the slower workers' pushes;
    - a worker that overlaps transfers with computation pulls the next weights
      before it has pushed the work on the previous ones, so it is pending with
      every version it may still push from: a pull after a push adds one, a pull
      right after a pull replaces it (polling), and an applied or dropped push
      settles its base (once) and everything older; a push marked ``keeps_base`` (the
      worker computes on the same weights again) leaves its base pending while
      that base is still within the bound, and its reply says so (``base_kept``);
    - a waiting push no longer counts against ``--concurrent-pushes`` (the intake
      freed its place when the engine took it), so the pushes it waits for can be
      received;
    - when every worker that blocks progress is itself waiting, their pushes are
      applied together as one update (with s = 0 this is exactly a sync round);
    - a wait ends after ``wait_timeout`` seconds (the stragglers' later pushes
      will then be too stale and dropped), and a worker whose lease expires stops
      blocking anyone.

    With ``batch_share`` the learning rate is the synchronous-equivalent one: an
    update's PARAM mean (damped per push as usual) is multiplied by the share of
    the global batch it carries, (its pushes' samples) / (global batch), capped at
    1, before the rule. The global batch is the sum over the live trainers of the
    samples of each one's latest push (a live worker that has not pushed yet
    counts as the mean of those that have), so N workers pushing equal batches
    each move the weights 1/N of a sync step, and k pushes applied together
    count k shares. BatchNorm buffers stay the plain mean. The factor is the
    ledger entries' ``share``.

    Args:
        staleness_bound: s, or None for unbounded.
        wait_timeout: the longest a push waits for slower workers.
        batch_share: scale each update by its share of the global batch.
    """

    def __init__(self, store: ParameterStore, rule: UpdateRule, registry: WorkerRegistry, *,
                 staleness_bound: int | None = None, wait_timeout: float = 300.0, batch_share: bool = False,
                 **kwargs):
        super().__init__(store, rule, registry, **kwargs)
        if staleness_bound is not None and staleness_bound < 0:
            raise ValueError(f"the staleness bound must be >= 0, got {staleness_bound}")
        self.staleness_bound = staleness_bound
        self.wait_timeout = wait_timeout
        self._pending: dict[int, list[int]] = {}  # worker id -> versions it may still push from, oldest first
        self._pulled_last: set[int] = set()  # workers whose latest call was a pull (a new pull replaces it)
        self._waiting: list[StagedPush] = []
        self._applied: dict[tuple[int, int], bool] = {}  # (worker, sequence) of waiting pushes now applied
        # -> whether its base was kept pending
        self.batch_share = batch_share
        self._samples: dict[int, int] = {}  # worker id -> samples of its latest applied push (batch_share)

    @property
    def round_pushes(self) -> int:
        with self.store.lock:
            return len(self._waiting)

    def on_pull(self, worker_id: int, version: int) -> None:
        super().on_pull(worker_id, version)
        if self.staleness_bound is None:
            return  # nobody waits for anybody
        with self.store.lock:
            if self.leases is not None and worker_id in self.leases.idle:
                return  # no data to train on: it will not push from this version
            if any(p.worker_id == worker_id for p in self._waiting):
                return  # its push is still waiting: its base stays the pushed one
            try:
                record = self.registry.trainer(worker_id)
            except KeyError:
                return  # anonymous reader or observer
            if record.alive:
                bases = self._pending.setdefault(worker_id, [])
                if bases and worker_id in self._pulled_last:
                    bases[-1] = version
                else:
                    bases.append(version)
                self._pulled_last.add(worker_id)

    def _settle(self, push: StagedPush) -> bool:
        """The push was applied or dropped: its worker no longer pushes from its base or older ones.

        With ``keeps_base`` the worker asks to compute on its base again; that stays
        pending unless it is already too stale. Returns whether it was kept.
        """
        self._pulled_last.discard(push.worker_id)
        bases = [b for b in self._pending.get(push.worker_id, ()) if b >= push.base_version]
        keep = push.keeps_base and self.store.version - push.base_version <= self.staleness_bound
        if bases and bases[0] == push.base_version and not keep:
            del bases[0]  # one pull is one push's base: a later pull of the same version is other work
        if bases:
            self._pending[push.worker_id] = bases
        else:
            self._pending.pop(push.worker_id, None)
        return keep

    def _admit(self, push: StagedPush, record: WorkerRecord) -> PushResult:
        version = self.store.version
        if push.base_version > version:
            raise FailedPrecondition(f"push based on version {push.base_version}, but the server is at {version}")
        bound = self.staleness_bound
        if bound is not None and version - push.base_version > bound:
            log.info("dropped push of %s: %d versions stale, bound %d", record.name, version - push.base_version,
                     bound, extra={"event": "push_dropped", "reason": "too_stale", "worker": record.name,
                                   "base_version": push.base_version, "version": version, "bound": bound})
            self._settle(push)
            return self._result(pb.PUSH_OUTCOME_DROPPED, reason="too_stale")
        if bound is None:
            self._publish([self._accumulate(push)], self._share([push]))
            return self._result(pb.PUSH_OUTCOME_ACCEPTED)
        bases = self._pending.setdefault(push.worker_id, [])
        if push.base_version not in bases:  # e.g. the version Join gave, with no pull
            bisect.insort(bases, push.base_version)
        self._waiting.append(push)
        self._drain(force=False)
        started = self._clock()
        deadline = started + self.wait_timeout
        key = (push.worker_id, push.sequence)
        while key not in self._applied:
            remaining = deadline - self._clock()
            if remaining <= 0:
                log.warning("%s waited %.0fs for slower workers; applying without them", record.name,
                            self.wait_timeout, extra={"event": "wait_expired", "worker": record.name,
                                                      "waited_s": self.wait_timeout})
                self._drain(force=True)
                break
            self.store.lock.wait(min(remaining, 1.0))
        base_kept = self._applied.pop(key, False)
        self.metrics.round_waited(self._clock() - started)
        return self._result(pb.PUSH_OUTCOME_ACCEPTED, base_kept=base_kept)

    def _on_tick(self, lost_worker_ids: list[int]) -> None:
        for worker_id in lost_worker_ids:
            self._pending.pop(worker_id, None)
            self._pulled_last.discard(worker_id)
        if self._waiting:
            self._drain(force=False)

    def _share(self, batch: list[StagedPush]) -> float:
        """The share of the global batch that ``batch`` (applied as one update) carries; 1.0 when off."""
        if not self.batch_share:
            return 1.0
        for p in batch:
            self._samples[p.worker_id] = p.num_samples
        live = {r.worker_id for r in self.registry.trainers() if r.alive} | {p.worker_id for p in batch}
        known = [self._samples[w] for w in live if w in self._samples]
        global_batch = sum(known) * len(live) / len(known)  # those not heard from yet count as the mean
        return min(1.0, sum(p.num_samples for p in batch) / global_batch)

    def _blockers(self, version: int) -> set[int]:
        """Live pending workers that one more update would leave more than s versions behind."""
        alive = {r.worker_id for r in self.registry.trainers() if r.alive}
        return {w for w, bases in self._pending.items()
                if w in alive and version + 1 - bases[0] > self.staleness_bound}

    def _drain(self, force: bool) -> None:
        """Applies waiting pushes while the bound allows (all of them when ``force``)."""
        while self._waiting and not self.store.done:
            blockers = self._blockers(self.store.version)
            waiting_workers = {p.worker_id for p in self._waiting}
            if force:
                batch = list(self._waiting)
            elif not blockers:
                batch = [self._waiting[0]]  # first come, first applied
            elif blockers <= waiting_workers:
                batch = [p for p in self._waiting if p.worker_id in blockers]
            else:
                return  # someone still computing would fall too far behind: wait for them
            self._publish([self._accumulate(p) for p in batch], self._share(batch))
            for p in batch:
                self._waiting.remove(p)
                self._applied[(p.worker_id, p.sequence)] = self._settle(p)
        if self.store.done:
            for p in self._waiting:  # the run ended: release everyone
                self._applied[(p.worker_id, p.sequence)] = False
                if self.leases is not None:
                    self.leases.unclaim(p.key)  # not applied: its positions were not trained into the model
            self._waiting.clear()
        self.store.lock.notify_all()


class Ticker:
    """Calls ``engine.tick`` every ``interval`` seconds on a daemon thread until stopped.

    Sooner when the engine asks: it sets ``engine.wakeup`` when it has a new
    deadline and says how far off it is in ``engine.due_in()`` (an adaptive
    round's grace window), so the tick comes at the deadline, not up to
    ``interval`` after it, and nothing polls.
    """

    def __init__(self, engine: ConsistencyEngine, interval: float = 0.5):
        self._engine = engine
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ps-ticker", daemon=True)

    def start(self) -> "Ticker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._engine.wakeup.set()
        self._thread.join(timeout=5)

    def _timeout(self) -> float:
        due = self._engine.due_in()
        return self._interval if due is None else min(self._interval, max(due, 0.001))

    def _run(self) -> None:
        timeout = self._interval
        while True:
            self._engine.wakeup.wait(timeout)
            self._engine.wakeup.clear()  # before the tick: a deadline set during it wakes the next wait
            if self._stop.is_set():
                return
            try:
                self._engine.tick()
                timeout = self._timeout()
            except Exception:  # keep ticking; a bug here must not stop leases
                log.exception("tick failed")
                timeout = self._interval
