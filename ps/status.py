"""One view of a run's status: what the Status RPC answers, the status page shows and ``ps-ctl status`` prints.

``server_status`` takes one cut of the engine's progress and the registry's
roster; ``to_response`` and ``from_response`` carry it over the wire, so ps-ctl
reads back the same view the server built. The status page adds the metrics'
rates and histories to it (``status_page.page_status``). No torch here: ps-ctl
imports this module.
"""

from __future__ import annotations

import dataclasses

from paramhub.common.config import staleness_bound_from_wire, staleness_bound_on_wire
from paramhub.common.pb import paramhub_pb2 as pb


def worker_state(alive: bool, left: bool) -> str:
    """``alive``, ``left`` (it said Leave) or ``lost`` (its lease expired)."""
    return "alive" if alive else "left" if left else "lost"


@dataclasses.dataclass(frozen=True)
class WorkerView:
    """One trainer as the status shows it."""

    worker_id: int
    name: str
    incarnation: int
    shard: int | None  # None when read back from a Status reply, which does not carry it
    alive: bool
    left: bool
    last_base_version: int
    applied: int  # pushes that went into applied updates (the ledger)
    accepted: int
    dropped: int
    seconds_since_seen: float
    last_loss: float  # NaN before any accepted push

    @property
    def state(self) -> str:
        return worker_state(self.alive, self.left)


@dataclasses.dataclass(frozen=True)
class EpochView:
    """One open epoch under data leases: its samples by state (they add up to the dataset's)."""

    epoch: int
    done: int
    in_pushes: int
    leased: int
    pending: int


@dataclasses.dataclass(frozen=True)
class Membership:
    """Who trains: the bounds the run was given, who a round counts now, and the churn so far."""

    min_workers: int
    max_workers: int | None  # None: no limit but the registry's
    round_members: int  # the pushes a sync round waits for now
    joins: int
    departures: int


@dataclasses.dataclass(frozen=True)
class LeaseView:
    """The data leases (``--data-leases``): the open epochs, those completed, leased samples given back."""

    epochs: list[EpochView]
    completed: int
    reassigned: int


@dataclasses.dataclass(frozen=True)
class StatusView:
    """The run at one moment."""

    version: int
    done: bool
    mode: str
    update: str
    workers_expected: int | None  # --workers; None when read back from a Status reply
    staleness_bound: int | None  # None: unbounded async
    epoch: str
    pushes_applied: int
    pushes_dropped: int | None  # None when read back from a Status reply
    pushes_rejected: int
    round_pushes: int  # pushes held for the next update
    last_loss: float  # mean loss of the last applied update (NaN before any)
    staleness_histogram: dict[int, int]  # staleness -> applied pushes
    workers: list[WorkerView]  # live ones by id, then the most recent departures
    live_workers: int
    departed_workers: int
    not_listed: int  # trainers known but not in ``workers`` (the oldest departures)
    membership: Membership | None = None
    leases: LeaseView | None = None  # None: the run has no data leases
    # replication (ps/replication.py): primary or standby, the term, the standby's state, its newest version
    role: str = "primary"
    term: int = 1
    standby_state: str = "none"  # primary: none, attached, unprotected; standby: following, disconnected
    replicated_version: int = 0
    primary: str = ""  # a standby: the primary it follows
    failovers: int = 0


def server_status(engine, registry, run: pb.RunSpec, *, epoch: str, pushes_rejected: int, role=None,
                  durability=None) -> StatusView:
    """The status of a running server.

    Args:
        engine: the ``ConsistencyEngine`` (its progress is one consistent cut).
        registry: the ``WorkerRegistry``.
        run: the run's settings as workers receive them.
        epoch: the server process's epoch.
        pushes_rejected: pushes refused with an error status so far.
        role, durability: the server's ``Role`` and its ``Replicator`` (or standby ``Follower``), if any.
    """
    progress = engine.progress()
    applied = progress.applied_per_worker
    roster = registry.roster()  # bounded: live ones, then the most recent departures
    lease_epochs, completed = engine.lease_summary()
    leases = (LeaseView([EpochView(**dataclasses.asdict(e)) for e in lease_epochs], completed,
                        engine.leases.reassigned) if engine.leases is not None else None)
    workers = [
        WorkerView(worker_id=r.worker_id, name=r.name, incarnation=r.incarnation, shard=r.shard, alive=r.alive,
                   left=r.left, last_base_version=r.last_base_version, applied=applied.get(r.worker_id, 0),
                   accepted=r.pushes_accepted, dropped=r.pushes_dropped,
                   seconds_since_seen=registry.seconds_since_seen(r), last_loss=r.last_loss)
        for r in roster.live + roster.departed
    ]
    return StatusView(
        version=progress.version, done=progress.done, mode=run.mode, update=run.update,
        workers_expected=run.num_workers, staleness_bound=staleness_bound_from_wire(run.staleness_bound),
        epoch=epoch, pushes_applied=progress.pushes_applied, pushes_dropped=progress.pushes_dropped,
        pushes_rejected=pushes_rejected, round_pushes=engine.round_pushes, last_loss=progress.last_loss,
        staleness_histogram=dict(progress.staleness_histogram), workers=workers, live_workers=len(roster.live),
        departed_workers=len(roster.departed) + roster.forgotten, not_listed=roster.forgotten,
        membership=Membership(run.num_workers, run.max_workers or None, engine.expected(), registry.joins,
                              registry.departures),
        leases=leases,
        **_replication_view(role, durability, progress.version),
    )


def _replication_view(role, durability, version: int) -> dict:
    if role is None:
        return {}
    view = {"role": role.role, "term": role.term, "failovers": role.failovers}
    if role.role == "standby":
        following = getattr(durability, "connected", False)
        view.update(standby_state="following" if following else "disconnected", replicated_version=version,
                    primary=role.peer)
    elif durability is not None:
        view.update(standby_state=durability.state, replicated_version=durability.acked)
    return view


def to_response(status: StatusView, budget_bytes: int) -> pb.StatusResponse:
    """The Status reply: as many workers as fit in ``budget_bytes``, the rest counted as not listed."""
    workers = [
        pb.WorkerStatus(worker_id=w.worker_id, worker_name=w.name, incarnation=w.incarnation,
                        pushes_accepted=w.accepted, pushes_dropped=w.dropped, last_base_version=w.last_base_version,
                        seconds_since_seen=w.seconds_since_seen, alive=w.alive, last_loss=w.last_loss,
                        updates_applied=w.applied, left=w.left)
        for w in status.workers
    ]
    listed = fit_in_message(workers, budget_bytes)
    histogram = status.staleness_histogram
    return pb.StatusResponse(
        version=status.version, mode=status.mode, update=status.update, done=status.done, workers=workers[:listed],
        round_pushes=status.round_pushes, pushes_rejected=status.pushes_rejected, server_epoch=status.epoch,
        last_loss=status.last_loss,
        staleness_histogram=[pb.StalenessCount(staleness=k, count=v) for k, v in sorted(histogram.items())],
        max_staleness=max(histogram, default=0), staleness_bound=staleness_bound_on_wire(status.staleness_bound),
        pushes_applied=status.pushes_applied, live_workers=status.live_workers,
        departed_workers=status.departed_workers, workers_not_listed=len(workers) - listed + status.not_listed,
        role=status.role, term=status.term, standby_state=status.standby_state,
        replicated_version=status.replicated_version, primary=status.primary, failovers=status.failovers,
        **_membership_fields(status),
    )


def _membership_fields(status: StatusView) -> dict:
    """The StatusResponse fields of the membership and the data leases."""
    fields = {}
    if status.membership is not None:
        m = status.membership
        fields.update(min_workers=m.min_workers, max_workers=m.max_workers or 0, round_members=m.round_members,
                      joins=m.joins, departures=m.departures)
    if status.leases is not None:
        fields.update(epochs=[pb.EpochLeases(**dataclasses.asdict(e)) for e in status.leases.epochs],
                      epochs_completed=status.leases.completed, leases_reassigned=status.leases.reassigned)
    return fields


def from_response(reply: pb.StatusResponse) -> StatusView:
    """The view a Status reply carries (what the wire leaves out is None)."""
    workers = [
        WorkerView(worker_id=w.worker_id, name=w.worker_name, incarnation=w.incarnation, shard=None, alive=w.alive,
                   left=w.left, last_base_version=w.last_base_version, applied=w.updates_applied,
                   accepted=w.pushes_accepted, dropped=w.pushes_dropped, seconds_since_seen=w.seconds_since_seen,
                   last_loss=w.last_loss)
        for w in reply.workers
    ]
    return StatusView(
        version=reply.version, done=reply.done, mode=reply.mode, update=reply.update, workers_expected=None,
        staleness_bound=staleness_bound_from_wire(reply.staleness_bound), epoch=reply.server_epoch,
        pushes_applied=reply.pushes_applied, pushes_dropped=None, pushes_rejected=reply.pushes_rejected,
        round_pushes=reply.round_pushes, last_loss=reply.last_loss,
        staleness_histogram={h.staleness: h.count for h in reply.staleness_histogram}, workers=workers,
        live_workers=reply.live_workers, departed_workers=reply.departed_workers,
        not_listed=reply.workers_not_listed, role=reply.role or "primary", term=reply.term,
        standby_state=reply.standby_state or "none", replicated_version=reply.replicated_version,
        primary=reply.primary, failovers=reply.failovers,
        membership=Membership(reply.min_workers, reply.max_workers or None, reply.round_members, reply.joins,
                              reply.departures) if reply.min_workers else None,
        leases=LeaseView([EpochView(e.epoch, e.done, e.in_pushes, e.leased, e.pending) for e in reply.epochs],
                         reply.epochs_completed, reply.leases_reassigned)
        if reply.epochs or reply.epochs_completed else None,
    )


def fit_in_message(workers: list[pb.WorkerStatus], budget_bytes: int) -> int:
    """How many of ``workers`` (from the first) a Status reply lists within ``budget_bytes``.

    The registry bounds how many records there are; this bounds their bytes
    whatever the chunk size, so Status always fits in one message.
    """
    used = 0
    for count, worker in enumerate(workers):
        used += worker.ByteSize() + 4  # the field's tag and length
        if used > budget_bytes:
            return count
    return len(workers)
