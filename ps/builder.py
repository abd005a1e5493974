"""Builds a parameter server's parts from a validated ``ServerConfig``: model → layout → store, rule, engine, gRPC.

Each part is made once and given its collaborators when it is made; none is
rewired afterwards. ``build_server`` returns them together (``ServerParts``) and
``PSServer`` runs them. ``RULES`` and ``ENGINES`` are the only place that looks at
``--update`` and ``--mode``: everything below takes the result.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent import futures
from typing import TYPE_CHECKING, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramhub.common import checkpoint, codec
from paramhub.common.config import ServerConfig, staleness_bound_on_wire
from paramhub.common.layout import DTYPE_TO_WIRE, PARAM, Layout, LayoutError, partition_names
from paramhub.common.models import InitialState, initial_state
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.runtime import release_free_memory
from paramhub.ps.consistency import AsyncEngine, ConsistencyEngine, SyncRounds, Ticker
from paramhub.ps.grace import GraceWindow
from paramhub.ps.identity import printable
from paramhub.ps.leases import LeaseTable
from paramhub.ps.ledger import Ledger
from paramhub.ps.limits import StreamLimits
from paramhub.ps.metrics import MetricsHook, ServerMetrics
from paramhub.ps.registry import WorkerRecord, WorkerRegistry
from paramhub.ps import replication
from paramhub.ps.cut import state_cut
from paramhub.ps.request_gate import RequestGate, RequestWaits
from paramhub.ps.rules import AdamWRule, AveragingRule, LRSchedule, SGDRule, UpdateRule, async_momentum
from paramhub.ps.screen import NormClip, UpdateScreen, all_finite
from paramhub.ps.servicer import SERVICE, ParameterServerServicer, add_to_server
from paramhub.ps.status_page import StatusPage, page_status
from paramhub.ps.store import ParameterStore

if TYPE_CHECKING:
    from paramhub.ps.evaluation import ServerEvaluator  # needs torchvision: imported only with --eval-data

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


# -- the update rule and the engine ----------------------------------------------------


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
    return AsyncEngine(store, rule, registry, **parts, min_workers=config.workers, staleness_bound=config.staleness,
                       wait_timeout=config.timeouts.round or 300.0, max_versions=config.max_steps,
                       damping=_damping(config), batch_share=_batch_share(config))


RULES = {"grad": _gradient_rule, "avg": _averaging_rule}
ENGINES = {"sync": _sync_engine, "async": _async_engine}
PUSH_KINDS = {"grad": pb.PUSH_KIND_GRADIENT, "avg": pb.PUSH_KIND_DELTA}


def build_engine(config: ServerConfig, store: ParameterStore, registry: WorkerRegistry, *,
                 ledger: Ledger | None = None, metrics: MetricsHook | None = None,
                 leases: LeaseTable | None = None) -> ConsistencyEngine:
    """The consistency engine of ``--mode`` with the update rule of ``--update``, as ps-server runs them.

    The registry tells it of every departure (its data leases go back to the pool).
    """
    engine = ENGINES[config.mode](config, store, RULES[config.update](config), registry, ledger=ledger,
                                  metrics=metrics, concurrent_pushes=config.concurrent_pushes, leases=leases)
    registry.on_departure = engine.on_departure
    return engine


# -- the weights: initial or resumed ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layouts:
    """What travels (``layout``) and, with a frozen backbone, what is served once and never changes."""

    layout: Layout
    frozen: Layout | None


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What a checkpoint gives back on --resume."""

    regions: list[torch.Tensor]
    frozen_regions: list[torch.Tensor]
    version: int
    rule_state: dict
    server_state: dict
    workers: list[dict]
    leases: dict | None  # the lease table's export (None: the run had no data leases)


def _layouts(config: ServerConfig, initial: InitialState) -> Layouts:
    # With a frozen backbone only the head is laid out for the wire; the rest is served once
    # (Pull with frozen=true). A partition lays out its contiguous share of what travels.
    state = initial.state
    trainable = initial.head if config.freeze_backbone else list(state)
    frozen = [name for name in state if name not in trainable]
    k, m = config.partition
    if m > 1:
        trainable = partition_names(trainable, [state[n].numel() * state[n].element_size() for n in trainable], k, m)
    return Layouts(Layout.from_state(state, initial.param_names, trainable),
                   Layout.from_state(state, initial.param_names, frozen) if frozen else None)


def _resume(config: ServerConfig, layouts: Layouts) -> Resumed | None:
    """The state of the newest readable, matching checkpoint; None when there is none.

    A checkpoint that cannot be read, fails its checksum, or belongs to another
    model is reported and the previous one tried.
    """
    layout = layouts.layout
    for path in reversed(checkpoint.list_checkpoints(config.checkpoint_dir)):
        try:
            model_state, server_state, meta = checkpoint.load_checkpoint(path)
            if meta.get("layout_hash") != layout.hash:
                raise checkpoint.CheckpointError(
                    f"{path} holds a different model ({meta.get('model')}, {meta.get('num_classes')} classes, "
                    f"layout {str(meta.get('layout_hash'))[:12]}) than this server's ({config.model}, "
                    f"{config.num_classes} classes, layout {layout.hash[:12]})")
            regions = layout.flatten(model_state)
            if not all_finite([*regions, *server_state.values()]):
                raise checkpoint.CheckpointError(f"{path} holds NaN or infinite values")
            frozen_regions = layouts.frozen.flatten(model_state) if layouts.frozen is not None else []
        except (checkpoint.CheckpointError, LayoutError) as exc:
            log.error("skipping checkpoint: %s", exc)
            continue
        log.info("resuming from %s at version %d", path, meta["version"])
        return Resumed(regions, frozen_regions, meta["version"],
                       rule_state=checkpoint.rule_state_of([region.name for region in layout.regions], server_state),
                       server_state=server_state, workers=meta.get("workers", []), leases=meta.get("leases"))
    log.warning("no usable checkpoint in %s: starting from scratch", config.checkpoint_dir)
    return None


@dataclasses.dataclass(frozen=True)
class Weights:
    """The store the run starts from, the frozen tensors beside it, and what a resumed run brings along."""

    store: ParameterStore
    frozen_regions: list[torch.Tensor]
    ledger: Ledger
    workers: list[dict]  # a resumed run's exported worker records
    leases: dict | None = None  # a resumed run's lease table


def _weights(config: ServerConfig, layouts: Layouts, initial: InitialState) -> Weights:
    resumed = _resume(config, layouts) if config.resume else None
    if resumed is None:
        regions = layouts.layout.flatten(initial.state)
        if not all_finite(regions):
            raise RuntimeError("the initial weights hold NaN or infinite values (--init-from?): nothing to train")
        frozen_regions = layouts.frozen.flatten(initial.state) if layouts.frozen is not None else []
        return Weights(ParameterStore(layouts.layout, regions), frozen_regions, Ledger(), [])
    if config.data_leases and resumed.leases is None and resumed.version:
        raise RuntimeError(f"the checkpoint at version {resumed.version} is of a run without data leases: its samples "
                           "were trained on by shard, not counted; resume it without --data-leases")
    # a finished run stays finished: no worker will push again
    done = config.max_steps is not None and resumed.version >= config.max_steps
    store = ParameterStore(layouts.layout, resumed.regions, version=resumed.version, rule_state=resumed.rule_state,
                           done=done)
    return Weights(store, resumed.frozen_regions, Ledger.from_tensors(resumed.server_state), resumed.workers,
                   resumed.leases)


# -- the parts around the engine --------------------------------------------------------


def _registry(config: ServerConfig, weights: Weights) -> WorkerRegistry:
    lease = config.timeouts.lease

    def lost(record: WorkerRecord) -> None:
        log.warning("worker %s (id %d) lost: silent for over %.0fs", printable(record.name), record.worker_id, lease,
                    extra={"event": "worker_lost", "worker": record.name, "worker_id": record.worker_id,
                           "lease_s": lease})

    # ids of workers the old process forgot still hold ledger entries: never hand them out again
    return WorkerRegistry(lease, on_lost=lost, max_live=config.max_live_workers, keep_departed=config.keep_departed,
                          restored=weights.workers, max_trainers=config.max_workers,
                          first_free_id=max(weights.ledger.applied_per_worker, default=0) + 1)


def _leases(config: ServerConfig, weights: Weights) -> LeaseTable | None:
    """The data lease table (``--data-leases``), a resumed run's where it had one; None without leases."""
    if not config.data_leases:
        return None
    return LeaseTable(config.lease_size, seed=config.seed, epochs=config.epochs, state=weights.leases)


def _metrics(config: ServerConfig, registry: WorkerRegistry, store: ParameterStore) -> MetricsHook:
    # /metrics and the status page both read one ServerMetrics; with neither, events go to a no-op.
    if config.metrics_port is None and config.http_port is None:
        return MetricsHook()
    return ServerMetrics(registry, lambda: store.version)


def _run_spec(config: ServerConfig) -> pb.RunSpec:
    codec_spec = config.update_codec
    return pb.RunSpec(
        mode=config.mode, update=config.update, num_workers=config.workers,
        local_steps=config.local_steps if config.update == "avg" else 1,
        # three heartbeats per lease, so one lost packet does not cost a worker its lease
        heartbeat_interval_s=min(config.timeouts.heartbeat, config.timeouts.lease / 3),
        local_lr=config.local_lr, local_momentum=config.local_momentum,
        staleness_bound=staleness_bound_on_wire(config.staleness_bound),
        max_push_wait_s=config.timeouts.round or 300.0,
        wire_dtype=DTYPE_TO_WIRE[codec.WIRE_DTYPES[config.wire_dtype]],
        partition=config.partition[0], num_partitions=config.partition[1], codec=codec_spec.spec,
        topk_ratio=codec_spec.params["ratio"] if codec_spec.name == "topk" else 0.0,
        data_leases=config.data_leases, lease_seed=config.seed, max_workers=config.max_workers or 0)


def _servicer(config: ServerConfig, engine: ConsistencyEngine, layouts: Layouts, frozen_regions: list,
              limits: StreamLimits, metrics: MetricsHook, role: replication.Role,
              replicator: replication.Replicator) -> ParameterServerServicer:
    screen = UpdateScreen(layouts.layout.region_indices(PARAM), max_abs=config.max_update_abs,
                          clip=NormClip(config.clip_factor) if config.clip_factor else None)
    return ParameterServerServicer(
        engine, pb.ModelSpec(arch=config.model, num_classes=config.num_classes), _run_spec(config),
        chunk_bytes=config.chunk_bytes, pull_wait_s=config.timeouts.pull_wait,
        expected_kind=PUSH_KINDS[config.update], push_wait_s=config.timeouts.round or 300.0,
        frozen=(layouts.frozen, frozen_regions) if layouts.frozen else None,
        stall_s=config.timeouts.stall, wire_dtype=codec.WIRE_DTYPES[config.wire_dtype],
        screen=screen, limits=limits, metrics=metrics, role=role, durability=replicator,
        durable_wait_s=config.replication_timeout + 5.0,  # the ack bound releases every wait before this
    )


def _grpc_server(config: ServerConfig, handlers: futures.ThreadPoolExecutor, request_waits: RequestWaits,
                 servicer: ParameterServerServicer, health_servicer: health.HealthServicer,
                 replication_service: replication.ReplicationService) -> grpc.Server:
    server = grpc.server(
        handlers,  # the token check first: a call without the token is refused before it is counted
        interceptors=config.security.server_interceptors() + [RequestGate(request_waits)],
        options=KEEPALIVE_OPTIONS + receive_window_options(config.chunk_bytes) + [
            ("grpc.max_receive_message_length", config.chunk_bytes + codec.MESSAGE_OVERHEAD_BYTES),
            # replies are at most a chunk, or a Join/Status reply that may outgrow a tiny --chunk-bytes
            ("grpc.max_send_message_length", max(config.chunk_bytes + codec.MESSAGE_OVERHEAD_BYTES,
                                                 codec.MIN_REPLY_LIMIT_BYTES)),
        ],
    )
    add_to_server(servicer, server)
    replication.add_to_server(replication_service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server


def _evaluator(config: ServerConfig, layouts: Layouts):
    """The server's own evaluation (--eval-data), or None; imported only then (it needs torchvision)."""
    if not (config.eval_data and config.eval_every):
        return None
    from paramhub.ps.evaluation import ServerEvaluator

    return ServerEvaluator(
        config.model, config.num_classes, config.eval_data, config.eval_every, image_size=config.eval_image_size,
        size=config.eval_size, batch_size=64, out_dir=config.checkpoint_dir,
        facts={"model": config.model, "num_classes": config.num_classes, "layout_hash": layouts.layout.hash},
        precise_bn_data=config.eval_precise_bn_data, precise_bn_batches=config.eval_precise_bn_batches,
        frozen=[t.name for t in layouts.frozen.tensors] if layouts.frozen is not None else (),
    )


# -- all of them ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerParts:
    """Everything one parameter server is made of, built and connected; nothing bound or served yet."""

    layout: Layout
    frozen_layout: Layout | None
    frozen_regions: list[torch.Tensor]
    store: ParameterStore
    registry: WorkerRegistry
    metrics: MetricsHook  # a ServerMetrics when --metrics-port or --http-port is set
    engine: ConsistencyEngine
    servicer: ParameterServerServicer
    request_waits: RequestWaits
    health: health.HealthServicer
    handlers: futures.ThreadPoolExecutor
    grpc_server: grpc.Server
    ticker: Ticker
    evaluator: ServerEvaluator | None  # with --eval-data
    status_page: StatusPage | None
    role: replication.Role
    replicator: replication.Replicator  # streams to a standby when one follows (any primary may have one)
    follower: replication.Follower | None  # --standby-for: follows the primary (started by PSServer)


def build_server(config: ServerConfig, build: Callable[..., InitialState] = initial_state) -> ServerParts:
    """Makes every part of a server from ``config``, each given its collaborators; binds and serves nothing.

    Args:
        config: the server's settings (validated when it was made).
        build: makes the initial weights from (arch, num_classes, seed, init_from, new_head).

    Raises:
        RuntimeError: the initial weights are not finite.
        DataError: the evaluation data cannot be used (--eval-data).
    """
    initial = build(config.model, config.num_classes, config.seed, config.init_from, config.new_head)
    layouts = _layouts(config, initial)
    weights = _weights(config, layouts, initial)
    del initial
    release_free_memory()  # the initial tensors: freed, but resident while the allocator keeps them
    evaluator = _evaluator(config, layouts)  # before the parts that hold threads: its data may be unusable
    store = weights.store
    registry = _registry(config, weights)
    metrics = _metrics(config, registry, store)
    engine = build_engine(config, store, registry, ledger=weights.ledger, metrics=metrics,
                          leases=_leases(config, weights))
    if isinstance(metrics, ServerMetrics) and engine.leases is not None:
        metrics.leases = engine.lease_summary
    if engine.leases is not None and engine.leases.finished and not store.done:
        store.finish()  # resumed after its last epoch: nothing is left to train
    limits = StreamLimits(total=config.stream_limit, per_peer=config.max_streams_per_peer)
    role = replication.Role(config.checkpoint_dir, config.standby_for)
    frozen = (layouts.frozen, weights.frozen_regions) if layouts.frozen is not None else None
    replicator = replication.Replicator(
        engine, registry, role, lambda under_lock: state_cut(config, layouts.layout, frozen, engine, registry,
                                                             under_lock),
        chunk_bytes=config.chunk_bytes, ack_timeout=config.replication_timeout, metrics=metrics)
    follower = (replication.Follower(config.standby_for, engine, registry, role, own_address="",
                                     failover_after=config.failover_after, security=config.security, metrics=metrics)
                if config.standby_for else None)
    servicer = _servicer(config, engine, layouts, weights.frozen_regions, limits, metrics, role, replicator)
    servicer.follower = follower
    if config.replicate_in_wire_dtype and config.wire_dtype != "fp32":
        engine.update_dtype = codec.WIRE_DTYPES[config.wire_dtype]
    if isinstance(metrics, ServerMetrics):
        metrics.lag = lambda: replicator.lag
    # calls waiting for their request take the threads streams leave; one host at most half of them
    request_waits = RequestWaits(threads=config.request_wait_threads, per_peer=config.request_wait_threads // 2,
                                 timeout_s=config.timeouts.request, held_by_streams=lambda: limits.open)
    health_servicer = health.HealthServicer()
    handlers = futures.ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="ps-rpc")
    status_page = (StatusPage(lambda: page_status(servicer.status(), metrics))
                   if config.http_port is not None else None)
    return ServerParts(
        layout=layouts.layout, frozen_layout=layouts.frozen, frozen_regions=weights.frozen_regions,
        store=store, registry=registry, metrics=metrics, engine=engine, servicer=servicer,
        request_waits=request_waits, health=health_servicer, handlers=handlers,
        grpc_server=_grpc_server(config, handlers, request_waits, servicer, health_servicer,
                                 replication.ReplicationService(role, store, replicator, follower)),
        ticker=Ticker(engine), evaluator=evaluator, status_page=status_page,
        role=role, replicator=replicator, follower=follower,
    )
