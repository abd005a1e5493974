"""Frozen configuration objects, built from click options (flag > PARAMHUB_* env var > default)."""

from __future__ import annotations

import dataclasses
import math

from paramhub.common.security import Security, check_listen_address

MODES = ("sync", "async")
UPDATES = ("grad", "avg")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")
OUTER_OPTIMIZERS = ("none", "nesterov")
MAX_UPDATE_ABS = 1e8  # --max-update-abs: the largest magnitude a pushed value may have (ps/screen.py)
PRECISE_BN_BATCHES = 20  # --precise-bn-batches: batches of training images to recompute BatchNorm statistics on
# Handler threads no Push or Pull stream may take: health checks, Status, Join, Heartbeat and Leave run there.
RESERVED_THREADS = 8


UNBOUNDED = -1  # RunSpec.staleness_bound of an async run without a bound (protobuf has no None)


def staleness_bound_on_wire(bound: int | None) -> int:
    """The staleness bound as RunSpec carries it: ``UNBOUNDED`` for None (async without a bound)."""
    return UNBOUNDED if bound is None else bound


def staleness_bound_from_wire(value: int) -> int | None:
    """RunSpec's staleness bound back as Python's: None when unbounded."""
    return None if value < 0 else value


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Every wait has a bound. Seconds."""

    rpc: float = 30.0  # deadline of one unary RPC
    transfer: float = 300.0  # deadline of one push or pull stream (102 MB on a slow link)
    connect: float = 60.0  # how long a worker keeps retrying to reach its server
    pull_wait: float = 20.0  # how long one Pull waits server-side for a new version
    lease: float = 30.0  # silence after which a worker is declared lost
    round: float | None = 300.0  # a sync round closes with what arrived after this
    heartbeat: float = 5.0  # interval between worker heartbeats
    stall: float = 60.0  # a push that sends nothing, or a pull whose client reads nothing, this long is cancelled
    request: float = 5.0  # a call whose request message has not arrived this long after it opened is cancelled


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything ``ps-server`` needs."""

    host: str = "127.0.0.1"
    port: int = 50051
    model: str = "resnet50"
    num_classes: int = 1000
    seed: int = 0
    mode: str = "sync"
    update: str = "grad"
    workers: int = 1
    backup_workers: int = 0
    # sync: "all" (a round waits for N - b pushes; late ones are dropped), or "auto" / a number Q: a
    # round closes after the quorum (auto: N - b if b else a majority) and an adaptive grace window
    # (median + grace_k MAD of recent arrival times), and late pushes are folded into the next update
    quorum: str | int = "all"
    grace_k: float = 3.0
    # async: the staleness bound s (None: unbounded); damping None means "on for async averaging".
    staleness: int | None = None
    staleness_damping: bool | None = None
    # async: scale each update by its share of the global batch, so --lr is the sync-equivalent rate
    # (None: on in gradient mode; sync rounds are the whole global batch already)
    batch_share: bool | None = None
    # async SGD: subtract the implicit momentum of asynchrony (1 - 1/N) from --momentum (None: on for async grad)
    momentum_correction: bool | None = None
    # gradient mode: the server's optimizer and its schedule by version
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    lr_schedule: str = "constant"
    warmup_versions: int = 0
    lr_step_size: int = 1000
    lr_gamma: float = 0.1
    # averaging mode: the workers' local steps and optimizer, and the server's outer step
    local_steps: int = 1
    local_lr: float = 0.05
    local_momentum: float = 0.9
    outer_optimizer: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.3  # with outer_lr 0.7: gain 0.7 / (1 - 0.3) = 1, measured best for short rounds
    max_steps: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume: bool = False  # continue from the newest valid checkpoint in checkpoint_dir
    # fine-tuning: start from a local state_dict, optionally with a fresh head and a frozen backbone
    init_from: str | None = None
    new_head: bool = False
    freeze_backbone: bool = False
    # the server evaluating itself every eval_every versions (0: never)
    eval_data: str | None = None
    eval_every: int = 0
    eval_image_size: int = 224
    eval_size: int = 1024
    # precise BN for the server's evaluation: recompute BatchNorm statistics on these training images first
    eval_precise_bn_data: str | None = None
    eval_precise_bn_batches: int = PRECISE_BN_BATCHES
    # TLS and/or a shared token; --insecure allows neither on a non-loopback address
    security: Security = Security()
    insecure: bool = False
    chunk_bytes: int = 2 << 20
    wire_dtype: str = "fp32"  # fp32, bf16 or fp16: how floats travel in pulls, and BUFFER regions in pushes
    partition: tuple[int, int] = (0, 1)  # this server holds partition k of m of the model's tensors
    # How pushes' PARAM regions travel (common/codecs): a spec NAME[:key=value,...]; "" means wire_dtype dense,
    # or top-k when topk_ratio is set (the shorthand for "topk:ratio=R")
    codec: str = ""
    topk_ratio: float = 0.0
    # The gRPC handler pool; every open Push or Pull holds one of its threads. Threads start only when needed.
    rpc_threads: int = 128
    # Push + Pull streams open at once, in all (None: all but RESERVED_THREADS of rpc_threads) and from one
    # client address (16 workers on one host, each with up to 2 pushes and 2 pulls open, need 64)
    max_open_streams: int | None = None
    max_streams_per_peer: int = 64
    # screening (ps/screen.py): the largest magnitude a pushed value may have, and robust clipping of each
    # push to clip_factor x the median norm of recent pushes (None: off)
    max_update_abs: float = MAX_UPDATE_ABS
    clip_factor: float | None = None
    # pushes received and held at once, each up to the model's wire size (more wait, at most a second)
    concurrent_pushes: int = 1
    # read-only HTTP endpoints on host: Prometheus /metrics and the status page (None: off; 0: a free port)
    metrics_port: int | None = None
    http_port: int | None = None
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    # After the run is done, keep answering this long so workers learn it.
    done_grace_s: float = 5.0
    linger: bool = False  # after the run completes, keep serving the final model until stopped
    # bounds on the worker registry: records with a live lease (further joins are refused with
    # RESOURCE_EXHAUSTED), and departed records remembered (older departures are only counted)
    max_live_workers: int = 1024
    keep_departed: int = 128
    # elastic membership: ``workers`` is the minimum the run starts with; at most this many trainers at once
    max_workers: int | None = None
    # data leases (ps/leases.py): the server hands out each epoch's samples in leases of lease_size positions
    # and counts each one trained exactly once; the run ends after ``epochs`` epochs (None: --max-steps decides)
    data_leases: bool = False
    lease_size: int = 256
    epochs: int | None = None
    # replication (ps/replication.py): follow this primary as its standby (None: start as a primary)
    standby_for: str | None = None
    # a standby takes over when the primary's stream is broken and it is unreachable this long
    failover_after: float = 3.0
    # a primary detaches a standby that acks nothing this long, and goes on unprotected
    replication_timeout: float = 5.0
    # round each averaged update to wire_dtype before applying it (here and on a standby): replication carries
    # the update in the wire dtype (half the bytes with bf16/fp16)
    replicate_in_wire_dtype: bool = False

    @property
    def stream_limit(self) -> int:
        """Push + Pull streams open at once: ``max_open_streams``, or all handler threads but the reserved ones."""
        return self.max_open_streams if self.max_open_streams is not None else self.rpc_threads - RESERVED_THREADS

    @property
    def request_wait_threads(self) -> int:
        """Handler threads that calls waiting for their request message and open streams may hold together:
        all but half of the reserved ones, which stay for calls that have their request (ps/request_gate.py)."""
        return self.rpc_threads - RESERVED_THREADS // 2

    @property
    def update_codec(self):
        """The run's ``UpdateCodec``: ``codec``, or what ``wire_dtype`` and ``topk_ratio`` stand for."""
        from paramhub.common import codecs

        return codecs.from_spec(self.codec or codecs.legacy_spec(self.wire_dtype, self.topk_ratio))

    @property
    def staleness_bound(self) -> int | None:
        """The bound the run keeps: --staleness in async mode (None: unbounded), 0 in sync mode (rounds)."""
        return self.staleness if self.mode == "async" else 0

    def __post_init__(self):
        """Cross-field checks (ValueError, naming the flags), so every way of building a config gets them.

        Raises:
            ValueError: settings that contradict each other, or an unknown codec or codec parameter.
            SecurityError: a non-loopback ``host`` with neither TLS nor a token, without ``insecure``.
        """
        if self.codec and self.topk_ratio:
            raise ValueError("--topk-ratio is a shorthand for --codec topk:ratio=R: give one of them")
        self.update_codec  # an unknown codec or a bad parameter: CodecError, a ValueError naming it
        if self.backup_workers >= self.workers:
            raise ValueError(f"--backup-workers ({self.backup_workers}) must be fewer than --workers ({self.workers})")
        if self.lr_schedule == "cosine" and not self.max_steps:
            raise ValueError("--lr-schedule cosine needs --max-steps")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.staleness is not None and self.mode != "async":
            raise ValueError("--staleness only applies to --mode async")
        if self.new_head and not self.init_from:
            raise ValueError("--new-head needs --init-from (a new head on what?)")
        if self.partition[1] > 1 and self.eval_data:
            raise ValueError("--eval-data: a partition holds part of the model; evaluate with ps-eval")
        if bool(self.eval_data) != bool(self.eval_every):
            raise ValueError("--eval-data and --eval-every go together")
        if self.eval_precise_bn_data and not self.eval_data:
            raise ValueError("--eval-precise-bn-data needs --eval-data (precise BN is part of the server's evaluation)")
        if self.rpc_threads <= RESERVED_THREADS:
            raise ValueError(f"--rpc-threads must be more than {RESERVED_THREADS} (the threads kept for health "
                             f"checks, Status, Join, Heartbeat and Leave), got {self.rpc_threads}")
        if not 1 <= self.stream_limit <= self.rpc_threads - RESERVED_THREADS:
            raise ValueError(
                f"--max-open-streams must be from 1 to --rpc-threads - {RESERVED_THREADS} "
                f"({self.rpc_threads - RESERVED_THREADS}), so that streams never take the threads of health "
                f"checks, Status, Join, Heartbeat and Leave; got {self.stream_limit}")
        if self.max_streams_per_peer < 1:
            raise ValueError(f"--max-streams-per-peer must be at least 1, got {self.max_streams_per_peer}")
        if not self.timeouts.stall > 0:
            raise ValueError(f"--stall-timeout must be positive, got {self.timeouts.stall}")
        if not self.timeouts.request > 0:
            raise ValueError(f"--request-timeout must be positive, got {self.timeouts.request}")
        quorum = self.quorum
        if isinstance(quorum, bool) or not (quorum in ("all", "auto") or isinstance(quorum, int)):
            raise ValueError(f"quorum must be 'all', 'auto' or a number of pushes, got {quorum!r}")
        if quorum != "all":
            if self.mode != "sync":
                raise ValueError("quorum only applies to --mode sync")
            if isinstance(quorum, int) and not 1 <= quorum <= self.workers:
                raise ValueError(f"quorum must be from 1 to --workers ({self.workers}), got {quorum}")
            if isinstance(quorum, int) and self.backup_workers:
                raise ValueError("give either a quorum Q or --backup-workers (auto uses N - b), not both")
        if not self.grace_k >= 0:
            raise ValueError(f"grace_k must be >= 0, got {self.grace_k}")
        if not (self.max_update_abs > 0 and math.isfinite(self.max_update_abs)):
            raise ValueError(f"max_update_abs must be a finite number > 0, got {self.max_update_abs}")
        if self.clip_factor is not None and not (self.clip_factor > 0 and math.isfinite(self.clip_factor)):
            raise ValueError(f"clip_factor must be a finite number > 0, got {self.clip_factor}")
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ValueError(f"--max-workers ({self.max_workers}) must be at least --workers ({self.workers}), "
                             "the minimum the run starts with")
        if self.data_leases and self.partition[1] > 1:
            raise ValueError("--data-leases with --partition: every partition would count the samples on its own; "
                             "lease data from an unpartitioned server")
        if self.epochs is not None and not self.data_leases:
            raise ValueError("--epochs counts epochs of leased data: it needs --data-leases (else use --max-steps)")
        if self.lease_size < 1:
            raise ValueError(f"--lease-size must be at least 1, got {self.lease_size}")
        if self.batch_share and self.mode != "async":
            raise ValueError("batch_share only applies to --mode async (a sync round is the whole global batch)")
        if not 0 < self.failover_after <= 60:
            raise ValueError(f"--failover-after must be from 0 to 60 seconds, got {self.failover_after}")
        if not 0 < self.replication_timeout <= 300:
            raise ValueError(f"--replication-timeout must be from 0 to 300 seconds, got {self.replication_timeout}")
        check_listen_address(self.host, self.security, self.insecure)


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything ``ps-worker`` needs."""

    server: str = "127.0.0.1:50051"
    # the standby's address (for a partitioned server: one per partition, comma-separated like ``server``);
    # the worker moves there when the server is gone or was replaced
    failover: str = ""
    shard: int = 0
    num_shards: int | None = None
    data: str = "synthetic"
    batch_size: int = 32
    image_size: int = 224
    augment: str = "auto"
    device: str = "auto"
    seed: int = 0
    synthetic_size: int = 4096
    loader_workers: int = 0
    name: str = ""
    log_every: int = 10
    epochs: int | None = None  # passes over the shard before the worker leaves (None: until the run is done)
    chunk_bytes: int = 2 << 20
    # async mode: push and prefetch the next pull while the next step computes; None: only on a GPU
    overlap: bool | None = None
    # data leases: append every push's (epoch, sample) pairs to this JSON-lines file (for checking exactly-once)
    sample_log: str | None = None
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    security: Security = Security()
