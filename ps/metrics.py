"""What a server measures about its run, for Prometheus (``--metrics-port``) and the status page (``--http-port``).

The consistency engine and the servicer report events to a ``MetricsHook``. The
default hook does nothing, so a server with neither port set never imports
prometheus_client and pays one no-op call per event. ``ServerMetrics`` is the real
hook: Prometheus instruments on a registry of its own (several servers in one
process do not collide, as they would on prometheus_client's global registry),
per-worker gauges computed when scraped, and the bounded histories that the
status page plots.

Metrics (all prefixed ``paramhub_``):

==========================================  =========  ==================================================
name                                        type       meaning
==========================================  =========  ==================================================
version                                     gauge      the global version now
updates_applied_total                       counter    updates (versions) this process applied
pushes_accepted_total                       counter    pushes admitted (applied, or held for the round)
pushes_dropped_total{reason}                counter    closed_round, too_stale, run_done or not_leased
pushes_rejected_total{reason}               counter    refused with a gRPC status; reason is its name
streams_refused_total{limit}                counter    Push/Pull streams refused as busy: total or per_peer
push_staleness                              histogram  staleness of every applied push (buckets 0..16)
round_wait_seconds                          histogram  sync: a round's first push to its close;
                                                       async with a bound: how long a push waited
received_bytes_total, sent_bytes_total      counter    payload bytes of push chunks in, of pulls out
workers_alive                               gauge      trainers whose lease is live
worker_joins_total, worker_departures_total counter    trainer incarnations started; ended (left, lost, replaced)
lease_samples_reassigned_total              counter    leased samples given back to the pool by a departure
epoch_samples{epoch,state}                  gauge      data leases: an open epoch's samples that are done,
                                                       in_pushes, leased or pending
epochs_completed                            gauge      data leases: epochs trained exactly once
worker_last_seen_seconds{worker}            gauge      seconds since the worker's last call
worker_pushes_per_second{worker}            gauge      accepted pushes over the last ``window_s``
worker_samples_per_second{worker}           gauge      samples of those pushes over the last ``window_s``
==========================================  =========  ==================================================
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Sequence

from paramhub.ps.ledger import LedgerEntry

STALENESS_BUCKETS = tuple(range(17))  # 0..16, then +Inf
ROUND_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HISTORY_POINTS = 2000


class MetricsHook:
    """Events the engine and servicer report; every method does nothing.

    Engines call these with the store's lock held, so implementations must be
    quick and must not call back into the engine or store.
    """

    def push_accepted(self, worker_id: int, num_samples: int) -> None:
        """A push was admitted (applied now, or held for its round)."""

    def push_dropped(self, worker_id: int, reason: str) -> None:
        """A valid push was not applied: ``closed_round``, ``too_stale`` or ``run_done``."""

    def push_rejected(self, code: str) -> None:
        """A push was refused with the gRPC status named ``code`` (``INVALID_ARGUMENT``, ...)."""

    def stream_refused(self, limit: str) -> None:
        """A Push or Pull was refused at once because ``limit`` (``total`` or ``per_peer``) streams were open."""

    def update_applied(self, version: int, loss: float, entries: Sequence[LedgerEntry]) -> None:
        """An update produced ``version`` from ``entries``, whose workers' mean loss was ``loss``."""

    def round_waited(self, seconds: float) -> None:
        """Sync: a round closed ``seconds`` after its first push. Async: a push waited under the bound."""

    def bytes_received(self, n: int) -> None:
        """Payload bytes of push chunks received."""

    def bytes_sent(self, n: int) -> None:
        """Payload bytes of a pull stream sent."""

    def evaluated(self, record: dict) -> None:
        """The server evaluated its model (``ServerEvaluator.run``'s record: version, top1, top5, loss, time)."""

    def leases_reassigned(self, samples: int) -> None:
        """A departed worker's leases, ``samples`` positions, went back to the pool."""
    def failover(self) -> None:
        """This standby took over from its primary."""

    def standby_changed(self, attached: bool) -> None:
        """A standby attached (its snapshot sent) or was detached (the primary runs unprotected)."""

    def replication_bytes(self, n: int) -> None:
        """Bytes of replication stream sent to the standby."""


class ServerMetrics(MetricsHook):
    """The server's measurements: Prometheus instruments plus the status page's histories.

    Args:
        registry: the workers (names, leases) for the per-worker gauges.
        version: returns the global version now (read when scraped).
        window_s: per-worker rates are means over this many seconds.
        history: how many points of loss and evaluation history to keep.
        clock: monotonic clock for the rates (tests inject one).
    """

    def __init__(self, registry, version: Callable[[], int], *, window_s: float = 10.0,
                 history: int = HISTORY_POINTS, clock: Callable[[], float] = time.monotonic,
                 leases: Callable[[], tuple[list, int]] | None = None):
        # Imported here, not at the top: a server without metrics never loads prometheus_client.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry
        self.window_s = window_s
        self._version = version
        self.leases = leases  # (open epochs' EpochStates, epochs completed) under data leases, read when scraped
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[int, collections.deque] = {}  # worker id -> (time, samples) of accepted pushes
        self._last_staleness: dict[int, int] = {}  # worker id -> staleness of its last applied push
        self._losses: collections.deque = collections.deque(maxlen=history)  # (version, unix time, mean loss)
        self._evaluations: collections.deque = collections.deque(maxlen=history)  # ServerEvaluator records
        self._http = None  # the /metrics server, once serving
        self.prometheus = CollectorRegistry()
        on = {"registry": self.prometheus}
        self.updates = Counter("paramhub_updates_applied", "Updates (versions) this process applied.", **on)
        self.accepted = Counter("paramhub_pushes_accepted", "Pushes admitted: applied or held for the round.", **on)
        self.dropped = Counter("paramhub_pushes_dropped", "Valid pushes not applied, by reason.", ["reason"], **on)
        self.rejected = Counter("paramhub_pushes_rejected", "Pushes refused, by gRPC status code.", ["reason"], **on)
        self.streams_refused = Counter("paramhub_streams_refused",
                                       "Push and Pull streams refused as busy, by the limit that was full.",
                                       ["limit"], **on)
        self.staleness = Histogram("paramhub_push_staleness", "Staleness (versions) of each applied push.",
                                   buckets=STALENESS_BUCKETS, **on)
        self.round_wait = Histogram(
            "paramhub_round_wait_seconds",
            "Sync: seconds from a round's first push to its close; async with a bound: a push's wait.",
            buckets=ROUND_WAIT_BUCKETS, **on)
        self.received = Counter("paramhub_received_bytes", "Payload bytes of push chunks received.", **on)
        self.sent = Counter("paramhub_sent_bytes", "Payload bytes of pull streams sent.", **on)
        self.reassigned = Counter("paramhub_lease_samples_reassigned",
                                  "Leased samples given back to the pool when their worker left, died or rejoined.",
                                  **on)
        self.failovers = Counter("paramhub_failovers", "Times this server took over from its primary.", **on)
        self.standby_detached = Counter("paramhub_standby_detached",
                                        "Times the standby stopped acking and the primary went on unprotected.", **on)
        self.standby_attached = Gauge("paramhub_standby_attached", "1 while a standby follows this primary.", **on)
        self.replicated = Counter("paramhub_replication_bytes", "Bytes of replication stream sent to the standby.",
                                  **on)
        self.replication_lag = Gauge("paramhub_replication_lag_versions",
                                     "Versions published that the standby has not acked yet.", **on)
        self.replication_lag.set_function(lambda: self.lag())
        self.prometheus.register(_ScrapeTimeCollector(self))

    # -- MetricsHook ----------------------------------------------------------------

    def push_accepted(self, worker_id: int, num_samples: int) -> None:
        self.accepted.inc()
        now = self._clock()
        with self._lock:
            recent = self._recent.setdefault(worker_id, collections.deque())
            recent.append((now, num_samples))
            _forget_before(recent, now - self.window_s)  # bounded even when nobody reads the rates

    def push_dropped(self, worker_id: int, reason: str) -> None:
        self.dropped.labels(reason=reason).inc()

    def push_rejected(self, code: str) -> None:
        self.rejected.labels(reason=code).inc()

    def stream_refused(self, limit: str) -> None:
        self.streams_refused.labels(limit=limit).inc()

    def update_applied(self, version: int, loss: float, entries: Sequence[LedgerEntry]) -> None:
        self.updates.inc()
        for entry in entries:
            self.staleness.observe(entry.staleness)
        with self._lock:
            for entry in entries:
                self._last_staleness[entry.worker_id] = entry.staleness
            self._losses.append((version, time.time(), loss))

    def round_waited(self, seconds: float) -> None:
        self.round_wait.observe(seconds)

    def bytes_received(self, n: int) -> None:
        self.received.inc(n)

    def bytes_sent(self, n: int) -> None:
        self.sent.inc(n)

    def leases_reassigned(self, samples: int) -> None:
        self.reassigned.inc(samples)

    def evaluated(self, record: dict) -> None:
        with self._lock:
            self._evaluations.append(dict(record))

    def failover(self) -> None:
        self.failovers.inc()

    def standby_changed(self, attached: bool) -> None:
        self.standby_attached.set(1 if attached else 0)
        if not attached:
            self.standby_detached.inc()

    def replication_bytes(self, n: int) -> None:
        self.replicated.inc(n)

    lag: Callable[[], int] = staticmethod(lambda: 0)  # the Replicator's lag, set by the builder

    # -- reading --------------------------------------------------------------------

    def rates(self) -> dict[int, tuple[float, float]]:
        """Per worker id: (pushes/s, samples/s), means over the last ``window_s`` seconds."""
        horizon = self._clock() - self.window_s
        with self._lock:
            out = {}
            for worker_id, recent in self._recent.items():
                _forget_before(recent, horizon)
                out[worker_id] = (len(recent) / self.window_s, sum(n for _, n in recent) / self.window_s)
            return out

    def staleness_by_worker(self) -> dict[int, int]:
        """Worker id -> staleness of its last applied push."""
        with self._lock:
            return dict(self._last_staleness)

    def history(self) -> tuple[list, list]:
        """Copies of (loss points, evaluation records), oldest first."""
        with self._lock:
            return list(self._losses), list(self._evaluations)

    # -- serving ---------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` (0 picks a free port) from a daemon thread; returns the port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.prometheus)
        return self._http.server_port

    def close(self) -> None:
        """Stops serving ``/metrics`` (safe to call twice, or without ``serve``)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _forget_before(recent: collections.deque, horizon: float) -> None:
    """Drops the (time, samples) entries older than ``horizon`` from the left of ``recent``."""
    while recent and recent[0][0] < horizon:
        recent.popleft()


class _ScrapeTimeCollector:
    """Gauges computed when scraped, from the worker registry and the rate windows.

    Worker gauges would go stale if set on events (a lost worker sends none), so
    they are read fresh on every scrape instead.
    """

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self._metrics
        trainers = metrics.registry.trainers()
        rates = metrics.rates()
        version = GaugeMetricFamily("paramhub_version", "The global version now.")
        version.add_metric([], metrics._version())
        alive = GaugeMetricFamily("paramhub_workers_alive", "Trainers whose lease is live.")
        alive.add_metric([], sum(1 for r in trainers if r.alive))
        seen = GaugeMetricFamily("paramhub_worker_last_seen_seconds", "Seconds since the worker's last call.",
                                 labels=["worker"])
        pushes = GaugeMetricFamily("paramhub_worker_pushes_per_second",
                                   f"Accepted pushes per second over the last {metrics.window_s:g}s.",
                                   labels=["worker"])
        samples = GaugeMetricFamily("paramhub_worker_samples_per_second",
                                    f"Samples per second of accepted pushes over the last {metrics.window_s:g}s.",
                                    labels=["worker"])
        for record in trainers:
            seen.add_metric([record.name], metrics.registry.seconds_since_seen(record))
            push_rate, sample_rate = rates.get(record.worker_id, (0.0, 0.0))
            pushes.add_metric([record.name], push_rate)
            samples.add_metric([record.name], sample_rate)
        joins = CounterMetricFamily("paramhub_worker_joins", "Trainer incarnations that joined.")
        joins.add_metric([], metrics.registry.joins)
        departures = CounterMetricFamily("paramhub_worker_departures",
                                         "Trainer incarnations that ended: left, lost, or replaced by a newer one.")
        departures.add_metric([], metrics.registry.departures)
        families = [version, alive, seen, pushes, samples, joins, departures]
        if metrics.leases is not None:
            epochs, completed = metrics.leases()
            by_state = GaugeMetricFamily("paramhub_epoch_samples", "An open epoch's samples by state.",
                                         labels=["epoch", "state"])
            for e in epochs:
                for state in ("done", "in_pushes", "leased", "pending"):
                    by_state.add_metric([str(e.epoch), state], getattr(e, state))
            done = GaugeMetricFamily("paramhub_epochs_completed", "Epochs whose every sample was trained once.")
            done.add_metric([], completed)
            families += [by_state, done]
        return families
