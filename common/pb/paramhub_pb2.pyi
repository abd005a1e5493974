from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class TensorRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_ROLE_UNSPECIFIED: _ClassVar[TensorRole]
    TENSOR_ROLE_PARAM: _ClassVar[TensorRole]
    TENSOR_ROLE_BUFFER: _ClassVar[TensorRole]

class PushKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_KIND_UNSPECIFIED: _ClassVar[PushKind]
    PUSH_KIND_GRADIENT: _ClassVar[PushKind]
    PUSH_KIND_DELTA: _ClassVar[PushKind]

class PushOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_OUTCOME_UNSPECIFIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_ACCEPTED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_DROPPED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_VALIDATED: _ClassVar[PushOutcome]

class ReplicaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_KIND_UNSPECIFIED: _ClassVar[ReplicaKind]
    REPLICA_KIND_SNAPSHOT: _ClassVar[ReplicaKind]
    REPLICA_KIND_UPDATE: _ClassVar[ReplicaKind]
    REPLICA_KIND_HEARTBEAT: _ClassVar[ReplicaKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
TENSOR_ROLE_UNSPECIFIED: TensorRole
TENSOR_ROLE_PARAM: TensorRole
TENSOR_ROLE_BUFFER: TensorRole
PUSH_KIND_UNSPECIFIED: PushKind
PUSH_KIND_GRADIENT: PushKind
PUSH_KIND_DELTA: PushKind
PUSH_OUTCOME_UNSPECIFIED: PushOutcome
PUSH_OUTCOME_ACCEPTED: PushOutcome
PUSH_OUTCOME_DROPPED: PushOutcome
PUSH_OUTCOME_VALIDATED: PushOutcome
REPLICA_KIND_UNSPECIFIED: ReplicaKind
REPLICA_KIND_SNAPSHOT: ReplicaKind
REPLICA_KIND_UPDATE: ReplicaKind
REPLICA_KIND_HEARTBEAT: ReplicaKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "region", "offset", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    region: int
    offset: int
    role: TensorRole
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., region: _Optional[int] = ..., offset: _Optional[int] = ..., role: _Optional[_Union[TensorRole, str]] = ...) -> None: ...

class RegionSpec(_message.Message):
    __slots__ = ("name", "dtype", "role", "numel")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    role: TensorRole
    numel: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., role: _Optional[_Union[TensorRole, str]] = ..., numel: _Optional[int] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("regions", "tensors", "hash")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[RegionSpec]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    hash: str
    def __init__(self, regions: _Optional[_Iterable[_Union[RegionSpec, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., hash: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("arch", "num_classes")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    arch: str
    num_classes: int
    def __init__(self, arch: _Optional[str] = ..., num_classes: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("mode", "update", "num_workers", "local_steps", "heartbeat_interval_s", "local_lr", "local_momentum", "staleness_bound", "max_push_wait_s", "wire_dtype", "partition", "num_partitions", "topk_ratio", "codec", "data_leases", "lease_seed", "max_workers")
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    STALENESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_PUSH_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_LEASES_FIELD_NUMBER: _ClassVar[int]
    LEASE_SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    update: str
    num_workers: int
    local_steps: int
    heartbeat_interval_s: float
    local_lr: float
    local_momentum: float
    staleness_bound: int
    max_push_wait_s: float
    wire_dtype: DType
    partition: int
    num_partitions: int
    topk_ratio: float
    codec: str
    data_leases: bool
    lease_seed: int
    max_workers: int
    def __init__(self, mode: _Optional[str] = ..., update: _Optional[str] = ..., num_workers: _Optional[int] = ..., local_steps: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., local_lr: _Optional[float] = ..., local_momentum: _Optional[float] = ..., staleness_bound: _Optional[int] = ..., max_push_wait_s: _Optional[float] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., partition: _Optional[int] = ..., num_partitions: _Optional[int] = ..., topk_ratio: _Optional[float] = ..., codec: _Optional[str] = ..., data_leases: _Optional[bool] = ..., lease_seed: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("worker_name", "incarnation", "observer", "shard")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    OBSERVER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    incarnation: int
    observer: bool
    shard: int
    def __init__(self, worker_name: _Optional[str] = ..., incarnation: _Optional[int] = ..., observer: _Optional[bool] = ..., shard: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("worker_id", "model", "layout", "version", "run", "server_epoch", "max_chunk_bytes", "frozen_layout", "term")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    SERVER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FROZEN_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    model: ModelSpec
    layout: Layout
    version: int
    run: RunSpec
    server_epoch: str
    max_chunk_bytes: int
    frozen_layout: Layout
    term: int
    def __init__(self, worker_id: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., version: _Optional[int] = ..., run: _Optional[_Union[RunSpec, _Mapping]] = ..., server_epoch: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., frozen_layout: _Optional[_Union[Layout, _Mapping]] = ..., term: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "min_version", "layout_hash", "frozen", "dataset_samples", "dataset_fingerprint", "lease_samples_wanted")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    DATASET_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_SAMPLES_WANTED_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    min_version: int
    layout_hash: str
    frozen: bool
    dataset_samples: int
    dataset_fingerprint: str
    lease_samples_wanted: int
    def __init__(self, worker_id: _Optional[int] = ..., min_version: _Optional[int] = ..., layout_hash: _Optional[str] = ..., frozen: _Optional[bool] = ..., dataset_samples: _Optional[int] = ..., dataset_fingerprint: _Optional[str] = ..., lease_samples_wanted: _Optional[int] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "layout_hash", "done", "server_epoch", "leases", "term")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SERVER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    version: int
    layout_hash: str
    done: bool
    server_epoch: str
    leases: _containers.RepeatedCompositeFieldContainer[DataRange]
    term: int
    def __init__(self, version: _Optional[int] = ..., layout_hash: _Optional[str] = ..., done: _Optional[bool] = ..., server_epoch: _Optional[str] = ..., leases: _Optional[_Iterable[_Union[DataRange, _Mapping]]] = ..., term: _Optional[int] = ...) -> None: ...

class DataRange(_message.Message):
    __slots__ = ("epoch", "start", "end")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start: int
    end: int
    def __init__(self, epoch: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("region", "offset", "data", "indices")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    region: int
    offset: int
    data: bytes
    indices: bytes
    def __init__(self, region: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., indices: _Optional[bytes] = ...) -> None: ...

class PullMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "incarnation", "sequence", "base_version", "kind", "layout_hash", "num_samples", "loss", "dry_run", "sparse", "keeps_base", "sparse_values", "codec", "trained")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    KEEPS_BASE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_VALUES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    sequence: int
    base_version: int
    kind: PushKind
    layout_hash: str
    num_samples: int
    loss: float
    dry_run: bool
    sparse: bool
    keeps_base: bool
    sparse_values: int
    codec: str
    trained: _containers.RepeatedCompositeFieldContainer[DataRange]
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ..., sequence: _Optional[int] = ..., base_version: _Optional[int] = ..., kind: _Optional[_Union[PushKind, str]] = ..., layout_hash: _Optional[str] = ..., num_samples: _Optional[int] = ..., loss: _Optional[float] = ..., dry_run: _Optional[bool] = ..., sparse: _Optional[bool] = ..., keeps_base: _Optional[bool] = ..., sparse_values: _Optional[int] = ..., codec: _Optional[str] = ..., trained: _Optional[_Iterable[_Union[DataRange, _Mapping]]] = ...) -> None: ...

class PushMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("outcome", "version", "next_version", "done", "server_epoch", "base_kept", "term")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SERVER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BASE_KEPT_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    outcome: PushOutcome
    version: int
    next_version: int
    done: bool
    server_epoch: str
    base_kept: bool
    term: int
    def __init__(self, outcome: _Optional[_Union[PushOutcome, str]] = ..., version: _Optional[int] = ..., next_version: _Optional[int] = ..., done: _Optional[bool] = ..., server_epoch: _Optional[str] = ..., base_kept: _Optional[bool] = ..., term: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "incarnation")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("version", "done", "server_epoch", "term")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SERVER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    version: int
    done: bool
    server_epoch: str
    term: int
    def __init__(self, version: _Optional[int] = ..., done: _Optional[bool] = ..., server_epoch: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "incarnation")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    incarnation: int
    def __init__(self, worker_id: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "worker_name", "incarnation", "pushes_accepted", "pushes_dropped", "last_base_version", "seconds_since_seen", "alive", "last_loss", "updates_applied", "left")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PUSHES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    worker_name: str
    incarnation: int
    pushes_accepted: int
    pushes_dropped: int
    last_base_version: int
    seconds_since_seen: float
    alive: bool
    last_loss: float
    updates_applied: int
    left: bool
    def __init__(self, worker_id: _Optional[int] = ..., worker_name: _Optional[str] = ..., incarnation: _Optional[int] = ..., pushes_accepted: _Optional[int] = ..., pushes_dropped: _Optional[int] = ..., last_base_version: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ..., alive: _Optional[bool] = ..., last_loss: _Optional[float] = ..., updates_applied: _Optional[int] = ..., left: _Optional[bool] = ...) -> None: ...

class StalenessCount(_message.Message):
    __slots__ = ("staleness", "count")
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    staleness: int
    count: int
    def __init__(self, staleness: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "mode", "update", "done", "workers", "round_pushes", "pushes_rejected", "server_epoch", "last_loss", "staleness_histogram", "max_staleness", "staleness_bound", "pushes_applied", "live_workers", "departed_workers", "workers_not_listed", "min_workers", "max_workers", "round_members", "epochs", "epochs_completed", "joins", "departures", "leases_reassigned", "role", "term", "standby_state", "replicated_version", "primary", "failovers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_PUSHES_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    SERVER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    DEPARTED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_NOT_LISTED_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    JOINS_FIELD_NUMBER: _ClassVar[int]
    DEPARTURES_FIELD_NUMBER: _ClassVar[int]
    LEASES_REASSIGNED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    STANDBY_STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICATED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    mode: str
    update: str
    done: bool
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    round_pushes: int
    pushes_rejected: int
    server_epoch: str
    last_loss: float
    staleness_histogram: _containers.RepeatedCompositeFieldContainer[StalenessCount]
    max_staleness: int
    staleness_bound: int
    pushes_applied: int
    live_workers: int
    departed_workers: int
    workers_not_listed: int
    min_workers: int
    max_workers: int
    round_members: int
    epochs: _containers.RepeatedCompositeFieldContainer[EpochLeases]
    epochs_completed: int
    joins: int
    departures: int
    leases_reassigned: int
    role: str
    term: int
    standby_state: str
    replicated_version: int
    primary: str
    failovers: int
    def __init__(self, version: _Optional[int] = ..., mode: _Optional[str] = ..., update: _Optional[str] = ..., done: _Optional[bool] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., round_pushes: _Optional[int] = ..., pushes_rejected: _Optional[int] = ..., server_epoch: _Optional[str] = ..., last_loss: _Optional[float] = ..., staleness_histogram: _Optional[_Iterable[_Union[StalenessCount, _Mapping]]] = ..., max_staleness: _Optional[int] = ..., staleness_bound: _Optional[int] = ..., pushes_applied: _Optional[int] = ..., live_workers: _Optional[int] = ..., departed_workers: _Optional[int] = ..., workers_not_listed: _Optional[int] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., round_members: _Optional[int] = ..., epochs: _Optional[_Iterable[_Union[EpochLeases, _Mapping]]] = ..., epochs_completed: _Optional[int] = ..., joins: _Optional[int] = ..., departures: _Optional[int] = ..., leases_reassigned: _Optional[int] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., standby_state: _Optional[str] = ..., replicated_version: _Optional[int] = ..., primary: _Optional[str] = ..., failovers: _Optional[int] = ...) -> None: ...

class EpochLeases(_message.Message):
    __slots__ = ("epoch", "done", "in_pushes", "leased", "pending")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    IN_PUSHES_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    done: int
    in_pushes: int
    leased: int
    pending: int
    def __init__(self, epoch: _Optional[int] = ..., done: _Optional[int] = ..., in_pushes: _Optional[int] = ..., leased: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class ReplicaAck(_message.Message):
    __slots__ = ("version", "standby_address", "term")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STANDBY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    version: int
    standby_address: str
    term: int
    def __init__(self, version: _Optional[int] = ..., standby_address: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class ReplicaHeader(_message.Message):
    __slots__ = ("kind", "version", "term", "meta", "payload_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: ReplicaKind
    version: int
    term: int
    meta: str
    payload_bytes: int
    def __init__(self, kind: _Optional[_Union[ReplicaKind, str]] = ..., version: _Optional[int] = ..., term: _Optional[int] = ..., meta: _Optional[str] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class ReplicaMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ReplicaHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[ReplicaHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class TermRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TermResponse(_message.Message):
    __slots__ = ("term", "role", "version")
    TERM_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    term: int
    role: str
    version: int
    def __init__(self, term: _Optional[int] = ..., role: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
