"""One parameter-server process: the parts ``ps/builder.py`` makes, started, run and stopped.

``PSServer(config).start()`` returns the bound port (use port 0 in tests);
``run_until_done()`` blocks until the run finishes or ``stop()`` is called, writing
checkpoints on the way and a final one at the end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable

from grpc_health.v1 import health_pb2

from paramhub.common import checkpoint
from paramhub.common.config import ServerConfig
from paramhub.common.models import InitialState, initial_state
from paramhub.common.runtime import recheck_threads
from paramhub.ps.builder import build_server
from paramhub.ps.cut import Cut, state_cut
from paramhub.ps.replication import check_not_replaced
from paramhub.ps.metrics import ServerMetrics
from paramhub.ps.servicer import SERVICE

log = logging.getLogger("paramhub.ps")


class PSServer:
    """One parameter-server process.

    Args:
        config: the server's settings.
        build: makes the initial weights from (arch, num_classes, seed, init_from, new_head):
            ``initial_state`` here, or ``initial_state_in_child``, which keeps torchvision out
            of this process.
    """

    def __init__(self, config: ServerConfig, build: Callable[..., InitialState] = initial_state):
        parts = build_server(config, build)
        self.config = config
        self.layout = parts.layout
        self.frozen_layout = parts.frozen_layout
        self.frozen_regions = parts.frozen_regions
        self.store = parts.store
        self.registry = parts.registry
        self.metrics = parts.metrics
        self.engine = parts.engine
        self.servicer = parts.servicer
        self.request_waits = parts.request_waits
        self.evaluator = parts.evaluator
        self.finished_at_start = self.store.done  # resumed at --max-steps already
        self._health = parts.health
        self._handlers = parts.handlers
        self._grpc = parts.grpc_server
        self._ticker = parts.ticker
        self._status_page = parts.status_page
        self.role = parts.role
        self.replicator = parts.replicator
        self.follower = parts.follower
        self.metrics_port: int | None = None  # bound ports of the HTTP endpoints that are on
        self.http_port: int | None = None
        self._stop = threading.Event()
        self.port: int | None = None
        self.last_checkpoint: str | None = None
        self._ticking = False

    def start(self) -> int:
        """Binds and starts serving; returns the port (useful with port 0).

        A primary whose former standby took over refuses (``Fenced``); a standby starts following.
        """
        if self.follower is None:
            check_not_replaced(self.role, self.store.version, self.config.security)
        address = f"{self.config.host}:{self.config.port}"
        credentials = self.config.security.server_credentials()
        try:
            self.port = (self._grpc.add_secure_port(address, credentials) if credentials
                         else self._grpc.add_insecure_port(address))
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {address}: {exc}") from None
        self._serve_http()
        self._grpc.start()
        if self.follower is None:  # a standby's leases and dedup memory start when it takes over
            self._start_ticker()
        self._set_serving(True)
        if self.follower is not None:
            self.follower.own_address = f"{self.config.host}:{self.port}"
            self.follower.start()
            log.info("standby: following the primary at %s (takes over after %.1fs without it)",
                     self.config.standby_for, self.config.failover_after)
        log.info("serving %s (%d tensors, %.1f MB) on %s:%d, mode %s, update %s, %d workers",
                 self.config.model, len(self.layout.tensors), self.layout.nbytes / 1e6, self.config.host,
                 self.port, self.config.mode, self.config.update, self.config.workers)
        return self.port

    def _serve_http(self) -> None:
        """Starts the read-only, unauthenticated HTTP endpoints that are configured (README: Watching a run)."""
        host = self.config.host.strip("[]")  # an IPv6 gRPC address is bracketed; sockets want it bare
        try:
            if self.config.metrics_port is not None:
                self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
                log.info("Prometheus metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
            if self._status_page is not None:
                self.http_port = self._status_page.serve(host, self.config.http_port)
                log.info("status page on http://%s:%d/", self.config.host, self.http_port)
        except OSError as exc:
            self._close_http()
            raise RuntimeError(f"cannot serve HTTP on {host}: {exc}") from None

    def _close_http(self) -> None:
        if isinstance(self.metrics, ServerMetrics):
            self.metrics.close()
        if self._status_page is not None:
            self._status_page.close()

    def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self._health.set(name, status)

    def stop(self) -> None:
        """Asks ``run_until_done`` to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def model_state(self, regions: list) -> dict:
        """The full state_dict (trainable and frozen tensors) as views into the given regions."""
        state = self.layout.views(regions)
        if self.frozen_layout is not None:
            state.update(self.frozen_layout.views(self.frozen_regions))
        return state

    def state_cut(self, under_lock=lambda version: None) -> contextlib.AbstractContextManager[Cut]:
        """One consistent cut (weights, optimizer, ledger, workers): what a checkpoint and a standby's snapshot take."""
        frozen = (self.frozen_layout, self.frozen_regions) if self.frozen_layout is not None else None
        return state_cut(self.config, self.layout, frozen, self.engine, self.registry, under_lock)

    def checkpoint(self) -> str | None:
        """Writes a checkpoint of the current version; returns its path (None without a directory)."""
        if not self.config.checkpoint_dir:
            return None
        if self.store.failure:  # the optimizer state may hold inf (screen.py, layer 2): keep the last good one
            log.error("no checkpoint written: %s", self.store.failure)
            return None
        with self.state_cut() as cut:  # the weights stay untouched until written
            path = checkpoint.save_checkpoint(self.config.checkpoint_dir, cut.version, cut.model_state,
                                              cut.server_state, metadata=cut.metadata,
                                              keep_last=self.config.keep_checkpoints)
        self.last_checkpoint = str(path)
        log.info("checkpoint v%d written to %s", cut.version, path)
        return self.last_checkpoint

    def _start_ticker(self) -> None:
        self._ticker.start()
        self._ticking = True

    def _follow_until_promoted(self) -> bool:
        """A standby waits until it takes over (True), or until stopped or its primary's run ended (False)."""
        while not self._stop.is_set():
            if self.follower.promoted.wait(0.2):
                self._start_ticker()
                return True
            if self.follower.finished.is_set():
                return False
        return False

    def run_until_done(self) -> None:
        """Serves until the run completes (``--max-steps``) or ``stop()``, checkpointing on the way.

        Run complete: the workers are told (done) and given a bounded time to
        leave; with ``linger`` the server then keeps serving the final model (pulls,
        status, health) until ``stop()``. Stopped (SIGTERM): new pushes are refused with UNAVAILABLE, those in
        flight finish, and the workers are *not* told the run is done, so they
        retry and carry on with the restarted server (``--resume``). Both end
        with a final checkpoint. A resumed run that was already complete ends at
        once (or lingers): nothing is left to train, and no worker is waited for.
        """
        if self.follower is not None and not self._follow_until_promoted():
            self._set_serving(False)
            self.follower.stop()
            self.shutdown()
            return
        seen = last_checkpoint = self.store.version
        every = self.config.checkpoint_every
        if self.finished_at_start:
            log.info("run already complete: resumed at version %d, --max-steps %d; %s", seen, self.config.max_steps,
                     "serving the final model until stopped (--linger)" if self.config.linger else "exiting",
                     extra={"event": "run_already_complete", "version": seen})
        while not self.finished_at_start and not self._stop.is_set():
            snap = self.store.wait_changed(seen, timeout=0.2)
            seen = snap.version
            recheck_threads()  # ps-server's auto thread count follows the workers started beside it
            if every and seen - last_checkpoint >= every:
                self.checkpoint()
                last_checkpoint = seen
            if self.evaluator and (self.evaluator.due(seen) or snap.done and self.evaluator.last_version != seen):
                with self.store.reading() as current:  # and always the final version
                    record = self.evaluator.run(current.version, self.model_state(current.regions))
                self.metrics.evaluated(record)
            if snap.done:
                break
        if self.store.done:
            # Pushes still arriving get a "done" reply (not UNAVAILABLE), so their workers stop cleanly.
            if not self.config.linger:
                self._set_serving(False)
            if not self.finished_at_start:  # else the checkpoint resumed from holds this version already
                self.checkpoint()
                self._drain()
            if self.config.linger:
                if not self.finished_at_start:
                    log.info("run complete at version %d: serving the final model until stopped (--linger)",
                             self.store.version)
                self._stop.wait()  # linger: until SIGTERM, by design
                self._set_serving(False)
            self.shutdown()
        else:
            self._set_serving(False)
            log.info("stopping: refusing new pushes, finishing the ones in flight")
            self.servicer.stop_accepting()
            self.store.interrupt_waits()
            self.shutdown(grace=self.config.done_grace_s)
            self.checkpoint()

    def _drain(self) -> None:
        """Gives workers a bounded time to learn that the run is done (they Leave).

        A live worker in the middle of a slow step learns it with its next push, so
        the wait lasts until every worker left or its lease expired (a dead one stops
        heartbeating), and never longer than the lease timeout plus the grace period.
        Only workers that joined this process are waited for: one restored from the
        checkpoint counts as alive until its lease expires, but it may never come back.
        """
        deadline = time.monotonic() + self.config.done_grace_s + self.config.timeouts.lease
        while time.monotonic() < deadline:
            if not any(r.alive and r.joined for r in self.registry.trainers()):
                return
            time.sleep(0.05)

    def shutdown(self, grace: float = 2.0) -> None:
        """Stops the gRPC server (RPCs in flight get ``grace`` seconds) and background threads."""
        if self.follower is not None:
            self.follower.stop()
        self.replicator.close()
        self._grpc.stop(grace).wait(grace + 1)
        self._handlers.shutdown(wait=False, cancel_futures=True)  # grpc leaves the pool's threads alive
        self.request_waits.close()
        if self._ticking:
            self._ticker.stop()
        self._close_http()
