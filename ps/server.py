"""Wires a parameter server together: model → layout → store, rule, engine, servicer, gRPC.

``PSServer(config).start()`` returns the bound port (use port 0 in tests);
``run_until_done()`` blocks until the run finishes or ``stop()`` is called, writing
checkpoints on the way and a final one at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramhub.common import checkpoint, codec
from paramhub.common.config import ServerConfig, staleness_bound_on_wire
from paramhub.common.layout import DTYPE_TO_WIRE, PARAM, Layout, LayoutError, partition_names
from paramhub.common.models import InitialState, initial_state
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.runtime import recheck_threads, release_free_memory
from paramhub.common.security import check_listen_address
from paramhub.ps.consistency import AsyncEngine, ConsistencyEngine, SyncRounds, Ticker
from paramhub.ps.grace import GraceWindow
from paramhub.ps.identity import printable
from paramhub.ps.ledger import Ledger
from paramhub.ps.limits import StreamLimits
from paramhub.ps.metrics import MetricsHook, ServerMetrics
from paramhub.ps.registry import WorkerRegistry
from paramhub.ps.request_gate import RequestGate, RequestWaits
from paramhub.ps.rules import AdamWRule, AveragingRule, LRSchedule, SGDRule, UpdateRule, async_momentum
from paramhub.ps.screen import NormClip, UpdateScreen, all_finite
from paramhub.ps.servicer import SERVICE, ParameterServerServicer, add_to_server
from paramhub.ps.status_page import StatusPage, run_status
from paramhub.ps.store import ParameterStore

log = logging.getLogger("paramhub.ps")

# Keepalive: notice dead peers within a minute even when no RPC is in flight.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def receive_window_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """A fixed HTTP/2 receive window per stream: two chunks.

    gRPC otherwise grows each stream's window by probing the bandwidth-delay
    product, and pushes waiting for admission (``--concurrent-pushes``) then had
    their bytes buffered anyway: 8 ResNet50 workers, bf16, 300 MB more peak RSS.
    Two chunks keep a push streaming at full speed on loopback (same push phase).
    """
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 2 * chunk_bytes)]


def _schedule(config: ServerConfig) -> LRSchedule:
    return LRSchedule(config.lr_schedule, warmup=config.warmup_versions, total=config.max_steps,
                      step_size=config.lr_step_size, gamma=config.lr_gamma)


def _gradient_rule(config: ServerConfig) -> UpdateRule:
    if config.optimizer == "adamw":
        return AdamWRule(lr=config.lr, weight_decay=config.weight_decay, schedule=_schedule(config))
    momentum = config.momentum
    correct = config.momentum_correction if config.momentum_correction is not None else config.mode == "async"
    if correct and config.mode == "async":
        momentum = async_momentum(config.momentum, config.workers)
        log.info("async with %d workers: server momentum %.3g (--momentum %.3g less the implicit %.3g of "
                 "asynchrony; --no-momentum-correction keeps it as given)", config.workers, momentum,
                 config.momentum, config.momentum - momentum)
    return SGDRule(lr=config.lr, momentum=momentum, weight_decay=config.weight_decay,
                   nesterov=config.nesterov, schedule=_schedule(config))


def _averaging_rule(config: ServerConfig) -> UpdateRule:
    # async: each push is about 1/N of a round, so the outer momentum steps once per N pushes (delayed Nesterov)
    return AveragingRule(config.outer_optimizer, outer_lr=config.outer_lr, outer_momentum=config.outer_momentum,
                         momentum_every=config.workers if config.mode == "async" else 1)


def _damping(config: ServerConfig) -> bool:
    if config.staleness_damping is not None:
        return config.staleness_damping
    return config.mode == "async" and config.update == "avg"  # async averaging scales stale deltas by default


def _batch_share(config: ServerConfig) -> bool:
    if config.batch_share is not None:
        return config.batch_share
    return config.mode == "async" and config.update == "grad"  # --lr is the sync-equivalent rate by default


def _sync_engine(config: ServerConfig, store, rule, registry, **parts) -> ConsistencyEngine:
    return SyncRounds(store, rule, registry, **parts, num_workers=config.workers, backup_workers=config.backup_workers,
                      round_timeout=config.timeouts.round, max_versions=config.max_steps,
                      damping=_damping(config), quorum=config.quorum,
                      grace=GraceWindow(k=config.grace_k) if config.quorum != "all" else None)


def _async_engine(config: ServerConfig, store, rule, registry, **parts) -> ConsistencyEngine:
    return AsyncEngine(store, rule, registry, **parts, staleness_bound=config.staleness,
                       wait_timeout=config.timeouts.round or 300.0, max_versions=config.max_steps,
                       damping=_damping(config), batch_share=_batch_share(config))


# The only place that looks at --update and --mode: everything below takes the result.
RULES = {"grad": _gradient_rule, "avg": _averaging_rule}
ENGINES = {"sync": _sync_engine, "async": _async_engine}
PUSH_KINDS = {"grad": pb.PUSH_KIND_GRADIENT, "avg": pb.PUSH_KIND_DELTA}


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What a checkpoint gives back on --resume."""

    store: ParameterStore
    server_state: dict
    workers: list[dict]


class PSServer:
    """One parameter-server process.

    Args:
        config: the server's settings.
        build: makes the initial weights from (arch, num_classes, seed, init_from, new_head):
            ``initial_state`` here, or ``initial_state_in_child``, which keeps torchvision out
            of this process.
    """

    def __init__(self, config: ServerConfig, build: Callable[..., InitialState] = initial_state):
        self.config = config
        # ps-server passes initial_state_in_child: the model is built in a child process
        initial = build(config.model, config.num_classes, config.seed, config.init_from, config.new_head)
        # With a frozen backbone only the head is laid out for the wire; the rest is
        # served once (Pull with frozen=true) and never changes. A partition lays out
        # its contiguous share of what travels.
        state = initial.state
        trainable = initial.head if config.freeze_backbone else list(state)
        frozen = [name for name in state if name not in trainable]
        k, m = config.partition
        if m > 1:
            trainable = partition_names(trainable, [state[n].numel() * state[n].element_size() for n in trainable],
                                        k, m)
        self.layout = Layout.from_state(state, initial.param_names, trainable)
        self.frozen_layout = Layout.from_state(state, initial.param_names, frozen) if frozen else None
        self.frozen_regions = self.frozen_layout.flatten(state) if frozen else []
        resumed = self._resume() if config.resume else None
        self.store = resumed.store if resumed else ParameterStore(self.layout, self.layout.flatten(state))
        if not all_finite(self.store.snapshot().regions):
            raise RuntimeError("the initial weights hold NaN or infinite values (--init-from?): nothing to train")
        del initial, state
        release_free_memory()  # the initial tensors: freed, but resident while the allocator keeps them
        self.registry = WorkerRegistry(
            config.timeouts.lease,
            on_lost=lambda r: log.warning("worker %s (id %d) lost: silent for over %.0fs",
                                          printable(r.name), r.worker_id, config.timeouts.lease,
                                          extra={"event": "worker_lost", "worker": r.name, "worker_id": r.worker_id,
                                                 "lease_s": config.timeouts.lease}),
            max_live=config.max_live_workers, keep_departed=config.keep_departed)
        # /metrics and the status page both read one ServerMetrics; with neither, events go to a no-op.
        self.metrics = (ServerMetrics(self.registry, lambda: self.store.version)
                        if config.metrics_port is not None or config.http_port is not None else MetricsHook())
        self.engine = ENGINES[config.mode](config, self.store, RULES[config.update](config), self.registry,
                                           ledger=Ledger.from_tensors(resumed.server_state) if resumed else None,
                                           metrics=self.metrics)
        if resumed:
            # ids of workers the old process forgot still hold ledger entries: never hand them out again
            self.registry.restore(resumed.workers,
                                  first_free_id=max(self.engine.ledger.applied_per_worker, default=0) + 1)
            if config.max_steps is not None and self.store.version >= config.max_steps:
                self.store.finish()  # a finished run stays finished: no worker will push again
        self.finished_at_start = self.store.done
        self.servicer = ParameterServerServicer(
            self.engine,
            pb.ModelSpec(arch=config.model, num_classes=config.num_classes),
            pb.RunSpec(mode=config.mode, update=config.update, num_workers=config.workers,
                       local_steps=config.local_steps if config.update == "avg" else 1,
                       # three heartbeats per lease, so one lost packet does not cost a worker its lease
                       heartbeat_interval_s=min(config.timeouts.heartbeat, config.timeouts.lease / 3),
                       local_lr=config.local_lr,
                       local_momentum=config.local_momentum,
                       staleness_bound=staleness_bound_on_wire(config.staleness_bound),
                       max_push_wait_s=config.timeouts.round or 300.0,
                       wire_dtype=DTYPE_TO_WIRE[codec.WIRE_DTYPES[config.wire_dtype]],
                       partition=config.partition[0], num_partitions=config.partition[1],
                       codec=config.update_codec.spec,
                       topk_ratio=config.update_codec.params.get("ratio", 0.0)
                       if config.update_codec.name == "topk" else 0.0),
            chunk_bytes=config.chunk_bytes, pull_wait_s=config.timeouts.pull_wait,
            expected_kind=PUSH_KINDS[config.update], push_wait_s=config.timeouts.round or 300.0,
            frozen=(self.frozen_layout, self.frozen_regions) if self.frozen_layout else None,
            stall_s=config.timeouts.stall, wire_dtype=codec.WIRE_DTYPES[config.wire_dtype],
            concurrent_pushes=config.concurrent_pushes,
            screen=UpdateScreen(self.layout.region_indices(PARAM), max_abs=config.max_update_abs,
                                clip=NormClip(config.clip_factor) if config.clip_factor else None),
            limits=StreamLimits(total=config.stream_limit, per_peer=config.max_streams_per_peer),
            metrics=self.metrics,
        )
        self._health = health.HealthServicer()
        self._handlers = futures.ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="ps-rpc")
        # calls waiting for their request take the threads streams leave; one host at most half of them
        self.request_waits = RequestWaits(threads=config.request_wait_threads,
                                          per_peer=config.request_wait_threads // 2, timeout_s=config.timeouts.request,
                                          held_by_streams=lambda: self.servicer.limits.open)
        self._grpc = grpc.server(
            self._handlers,  # the token check first: a call without the token is refused before it is counted
            interceptors=config.security.server_interceptors() + [RequestGate(self.request_waits)],
            options=KEEPALIVE_OPTIONS + receive_window_options(config.chunk_bytes) + [
                ("grpc.max_receive_message_length", config.chunk_bytes + codec.MESSAGE_OVERHEAD_BYTES),
                # replies are at most a chunk, or a Join/Status reply that may outgrow a tiny --chunk-bytes
                ("grpc.max_send_message_length", max(config.chunk_bytes + codec.MESSAGE_OVERHEAD_BYTES,
                                                     codec.MIN_REPLY_LIMIT_BYTES)),
            ],
        )
        add_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        self.evaluator = self._evaluator(config)
        self._ticker = Ticker(self.engine)
        self._status_page = StatusPage(lambda: run_status(self)) if config.http_port is not None else None
        self.metrics_port: int | None = None  # bound ports of the HTTP endpoints that are on
        self.http_port: int | None = None
        self._stop = threading.Event()
        self.port: int | None = None
        self.last_checkpoint: str | None = None

    def _evaluator(self, config: ServerConfig):
        """The server's own evaluation (--eval-data), or None; imported only then (it needs torchvision)."""
        if not (config.eval_data and config.eval_every):
            return None
        from paramhub.ps.evaluation import ServerEvaluator

        return ServerEvaluator(
            config.model, config.num_classes, config.eval_data, config.eval_every, image_size=config.eval_image_size,
            size=config.eval_size, batch_size=64, out_dir=config.checkpoint_dir,
            facts={"model": config.model, "num_classes": config.num_classes, "layout_hash": self.layout.hash},
            precise_bn_data=config.eval_precise_bn_data, precise_bn_batches=config.eval_precise_bn_batches,
            frozen=[t.name for t in self.frozen_layout.tensors] if self.frozen_layout is not None else (),
        )

    def _resume(self) -> "Resumed | None":
        """The state of the newest readable, matching checkpoint; None when there is none.

        A checkpoint that cannot be read, fails its checksum, or belongs to another
        model is reported and the previous one tried.
        """
        for path in reversed(checkpoint.list_checkpoints(self.config.checkpoint_dir)):
            try:
                model_state, server_state, meta = checkpoint.load_checkpoint(path)
                if meta.get("layout_hash") != self.layout.hash:
                    raise checkpoint.CheckpointError(
                        f"{path} holds a different model ({meta.get('model')}, {meta.get('num_classes')} classes, "
                        f"layout {str(meta.get('layout_hash'))[:12]}) than this server's ({self.config.model}, "
                        f"{self.config.num_classes} classes, layout {self.layout.hash[:12]})")
                regions = self.layout.flatten(model_state)
                if not all_finite([*regions, *server_state.values()]):
                    raise checkpoint.CheckpointError(f"{path} holds NaN or infinite values")
                if self.frozen_layout is not None:
                    self.frozen_regions = self.frozen_layout.flatten(model_state)
            except (checkpoint.CheckpointError, LayoutError) as exc:
                log.error("skipping checkpoint: %s", exc)
                continue
            rule_state = checkpoint.rule_state_of([region.name for region in self.layout.regions], server_state)
            log.info("resuming from %s at version %d", path, meta["version"])
            store = ParameterStore(self.layout, regions, version=meta["version"], rule_state=rule_state)
            return Resumed(store, server_state, meta.get("workers", []))
        log.warning("no usable checkpoint in %s: starting from scratch", self.config.checkpoint_dir)
        return None

    def start(self) -> int:
        """Binds and starts serving; returns the port (useful with port 0)."""
        address = f"{self.config.host}:{self.config.port}"
        check_listen_address(self.config.host, self.config.security, self.config.insecure)
        credentials = self.config.security.server_credentials()
        try:
            self.port = (self._grpc.add_secure_port(address, credentials) if credentials
                         else self._grpc.add_insecure_port(address))
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {address}: {exc}") from None
        self._serve_http()
        self._grpc.start()
        self._ticker.start()
        self._set_serving(True)
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

    def checkpoint(self) -> str | None:
        """Writes a checkpoint of the current version; returns its path (None without a directory)."""
        if not self.config.checkpoint_dir:
            return None
        if self.store.failure:  # the optimizer state may hold inf (screen.py, layer 2): keep the last good one
            log.error("no checkpoint written: %s", self.store.failure)
            return None
        with contextlib.ExitStack() as stack:
            with self.store.lock:  # one consistent cut: weights, optimizer, ledger, workers
                snap = stack.enter_context(self.store.reading())  # the weights stay untouched until written
                server_state = checkpoint.rule_state_tensors([region.name for region in self.layout.regions],
                                                             self.store.rule_state_copy())
                server_state.update(self.engine.ledger.to_tensors())
                workers = self.registry.export()
            path = checkpoint.save_checkpoint(
                self.config.checkpoint_dir, snap.version, self.model_state(snap.regions), server_state,
                metadata={"model": self.config.model, "num_classes": self.config.num_classes,
                          "layout_hash": self.layout.hash, "mode": self.config.mode, "update": self.config.update,
                          "workers": workers},
                keep_last=self.config.keep_checkpoints,
            )
        self.last_checkpoint = str(path)
        log.info("checkpoint v%d written to %s", snap.version, path)
        return self.last_checkpoint

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
            self.servicer.accepting = False
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
        self._grpc.stop(grace).wait(grace + 1)
        self._handlers.shutdown(wait=False, cancel_futures=True)  # grpc leaves the pool's threads alive
        self.request_waits.close()
        self._ticker.stop()
        self._close_http()
