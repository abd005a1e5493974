"""Who may apply when: the consistency engines.

An engine takes a validated, fully received push and decides, under one lock,
whether it joins the current round, is applied, or is dropped; it owns the
dedup check so that a retried push is applied at most once. The servicer calls
``submit`` and ``tick`` without knowing which engine it has.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import torch

from paramhub.common.layout import BUFFER, PARAM
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.errors import FailedPrecondition
from paramhub.ps.registry import WorkerRegistry
from paramhub.ps.rules import UpdateRule, WeightedMean
from paramhub.ps.store import ParameterStore

log = logging.getLogger("paramhub.ps")


@dataclasses.dataclass(frozen=True)
class StagedPush:
    """A push whose bytes all arrived and passed validation."""

    worker_id: int
    incarnation: int
    sequence: int
    base_version: int
    kind: int
    num_samples: int
    loss: float
    regions: list[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class PushResult:
    """The engine's answer, turned into a PushResponse by the servicer."""

    outcome: int  # pb.PushOutcome
    version: int
    next_version: int
    done: bool


class ConsistencyEngine:
    """Shared machinery: dedup, progress accounting, applying a mean update, ending the run.

    Subclasses implement ``_admit`` (and optionally ``_on_tick``), called with the
    store's lock held.

    Args:
        store: the global state.
        rule: turns the mean PARAM update into new weights.
        registry: the workers.
        max_versions: finish the run at this version (None: never).
        clock: injectable monotonic clock.
    """

    def __init__(self, store: ParameterStore, rule: UpdateRule, registry: WorkerRegistry, *,
                 max_versions: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.rule = rule
        self.registry = registry
        self.max_versions = max_versions
        self._clock = clock
        layout = store.layout
        self._param_regions = layout.region_indices(PARAM)
        self._buffer_regions = layout.region_indices(BUFFER)
        self.pushes_dropped = 0
        self.last_loss = float("nan")

    def submit(self, push: StagedPush) -> PushResult:
        """Handles one push exactly once; a retry of the last sequence gets the same reply."""
        with self.store.lock:
            record = self.registry.get(push.worker_id, push.incarnation)
            if push.sequence == record.last_sequence and record.last_reply is not None:
                return record.last_reply
            if push.sequence <= record.last_sequence:
                raise FailedPrecondition(
                    f"push sequence {push.sequence} is not after the last one ({record.last_sequence})")
            if self.store.done:
                result = self._result(pb.PUSH_OUTCOME_DROPPED)
            else:
                result = self._admit(push, record)
            record.last_sequence = push.sequence
            record.last_reply = result
            record.last_base_version = push.base_version
            if result.outcome == pb.PUSH_OUTCOME_ACCEPTED:
                record.pushes_accepted += 1
                record.last_loss = push.loss
            else:
                record.pushes_dropped += 1
                self.pushes_dropped += 1
            return result

    def tick(self) -> None:
        """Periodic housekeeping: expire leases, let the engine react (round timeouts)."""
        self.registry.expire()
        with self.store.lock:
            if not self.store.done:
                self._on_tick()

    # -- for subclasses -------------------------------------------------------------

    def _admit(self, push: StagedPush, record) -> PushResult:
        raise NotImplementedError

    def _on_tick(self) -> None:
        pass

    def _result(self, outcome: int, next_version: int | None = None) -> PushResult:
        version = self.store.version
        return PushResult(outcome, version, version if next_version is None else next_version, self.store.done)

    def _apply_mean(self, mean: WeightedMean, losses: list[float]) -> int:
        """Applies a mean update: the rule on PARAM regions, plain averaging for buffers."""
        snapshot = self.store.snapshot()
        averaged = mean.mean()
        regions = list(snapshot.regions)
        for r in self._param_regions:
            state = self.store.rule_state.setdefault(r, {})
            regions[r] = self.rule.apply(snapshot.regions[r], averaged[r], state, snapshot.version)
        for r in self._buffer_regions:
            regions[r] = averaged[r]
        version = self.store.publish(regions)
        if losses:
            self.last_loss = sum(losses) / len(losses)
        if self.max_versions is not None and version >= self.max_versions:
            log.info("reached version %d of %d: run complete", version, self.max_versions)
            self.store.finish()
        return version


class SyncRounds(ConsistencyEngine):
    """Bulk-synchronous rounds (BSP), with backup workers and bounded waits.

    Round r takes pushes based on version r. It closes when ``quorum`` pushes
    arrived: N − b, less the workers whose lease expired. Pushes for a closed round
    are dropped and counted; the worker is told to pull. ``round_timeout`` closes a
    round with whatever arrived, so a round never waits forever.

    Args:
        num_workers: N, the workers the run expects.
        backup_workers: b, how many of the slowest pushes a round does not wait for.
        round_timeout: seconds after a round's first push before it closes anyway.
    """

    def __init__(self, store: ParameterStore, rule: UpdateRule, registry: WorkerRegistry, *,
                 num_workers: int, backup_workers: int = 0, round_timeout: float | None = None, **kwargs):
        super().__init__(store, rule, registry, **kwargs)
        if not 0 <= backup_workers < num_workers:
            raise ValueError(f"backup workers ({backup_workers}) must be fewer than workers ({num_workers})")
        self.num_workers = num_workers
        self.backup_workers = backup_workers
        self.round_timeout = round_timeout
        self._mean = WeightedMean(store.snapshot().regions)
        self._pushed: set[int] = set()
        self._losses: list[float] = []
        self._round_started: float | None = None

    @property
    def round_pushes(self) -> int:
        """Pushes received for the round in progress."""
        with self.store.lock:
            return len(self._pushed)

    def quorum(self) -> int:
        """Pushes needed to close the current round."""
        return max(1, self.num_workers - self.backup_workers - self.registry.lost_trainers())

    def _admit(self, push: StagedPush, record) -> PushResult:
        version = self.store.version
        if push.base_version < version:
            log.info("dropped push of %s for closed round %d (now %d)", record.name, push.base_version, version)
            return self._result(pb.PUSH_OUTCOME_DROPPED)
        if push.base_version > version:
            raise FailedPrecondition(f"push based on version {push.base_version}, but the server is at {version}")
        if push.worker_id in self._pushed:
            raise FailedPrecondition(f"{record.name} already pushed for round {version}; pull before pushing again")
        self._mean.add(push.regions, float(push.num_samples))
        self._pushed.add(push.worker_id)
        self._losses.append(push.loss)
        if self._round_started is None:
            self._round_started = self._clock()
        if len(self._pushed) >= self.quorum():
            self._close_round("quorum")
        return self._result(pb.PUSH_OUTCOME_ACCEPTED, next_version=version + 1)

    def _on_tick(self) -> None:
        if not self._pushed:
            return
        if len(self._pushed) >= self.quorum():
            self._close_round("lost workers")
        elif self.round_timeout is not None and self._clock() - self._round_started > self.round_timeout:
            self._close_round("round timeout")

    def _close_round(self, reason: str) -> None:
        count = len(self._pushed)
        version = self._apply_mean(self._mean, self._losses)
        log.debug("round %d closed by %s with %d pushes", version - 1, reason, count)
        if reason != "quorum":
            log.warning("round %d closed by %s with %d of %d pushes", version - 1, reason, count, self.num_workers)
        self._mean.reset()
        self._pushed.clear()
        self._losses.clear()
        self._round_started = None


class Ticker:
    """Calls ``engine.tick`` every ``interval`` seconds on a daemon thread until stopped."""

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
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._engine.tick()
            except Exception:  # keep ticking; a bug here must not stop leases
                log.exception("tick failed")
