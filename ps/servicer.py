"""The thin gRPC servicer: decode, validate, hand to the store and the engine.

A push's state (its dedup memory, its place among the pushes received at once,
its wait) is the engine's: the servicer asks ``engine.begin`` before it reads the
chunks and hands the received push to ``engine.submit``.

It never branches on the consistency mode or update rule: the engine it is given
decides. Errors are raised as ``PSError`` subclasses (or codec/layout errors) and
turned into status codes in one place, ``_abort_on_error``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import time
import uuid
from typing import Iterator

import grpc
import torch

from paramhub.common import codec, codecs
from paramhub.common.layout import PARAM, Layout, LayoutError
from paramhub.common.leases import spans_from_wire
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.consistency import ConsistencyEngine, PushResult, StagedPush
from paramhub.ps.errors import Busy, FailedPrecondition, InvalidArgument, NotFound, PSError, Unavailable, abort_rpc
from paramhub.ps.identity import check_join, printable
from paramhub.ps.intake import Ticket
from paramhub.ps.limits import StallGuard, StreamLimits, guarded_receives, guarded_sends, peer_host
from paramhub.ps.metrics import MetricsHook
from paramhub.ps.registry import WorkerRegistry
from paramhub.ps.pull_cache import PullCache
from paramhub.ps.screen import MAX_SAMPLES_PER_PUSH, UpdateScreen
from paramhub.ps.status import StatusView, server_status, to_response

log = logging.getLogger("paramhub.ps")
SERVICE = "paramhub.v1.ParameterServer"


def _abort_on_error(method):
    """Maps our exceptions to gRPC status codes; the single error table of the server."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except PSError as exc:
            abort_rpc(context, exc)
        except (codec.MalformedMessage, LayoutError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    @functools.wraps(method)
    def stream_wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except PSError as exc:
            abort_rpc(context, exc)
        except (codec.MalformedMessage, LayoutError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return stream_wrapper if inspect.isgeneratorfunction(method) else wrapper


class ParameterServerServicer:
    """Implements paramhub.v1.ParameterServer on top of an engine.

    Args:
        engine: the consistency engine (it holds the store, rule and registry).
        model_spec: what workers build.
        run_spec: the run settings workers follow.
        chunk_bytes: payload bytes per chunk sent, and the most accepted per chunk.
        pull_wait_s: the longest a Pull waits for a newer version.
        expected_kind: the PushKind this run's update rule takes.
        push_wait_s: the longest a retry waits for its original's reply.
        limits: how many Push and Pull streams may be open at once (in all, per peer); default unlimited.
        stall_s: a stream that makes no progress this long is cancelled (``StallGuard``).
        screen: what a push's values may be and how it counts (default: bounded values, no clipping).
        metrics: where events go (the server's ServerMetrics); default nowhere.
        role: primary or standby, and the term (ps/replication.py); default a primary of term 1.
        durability: the gate on what workers may see (``Replicator``); default: everything at once.
        durable_wait_s: the longest a pull or reply waits for its version to be replicated.
    """

    def __init__(self, engine: ConsistencyEngine, model_spec: pb.ModelSpec, run_spec: pb.RunSpec, *,
                 chunk_bytes: int, pull_wait_s: float, expected_kind: int, push_wait_s: float = 300.0,
                 frozen: tuple[Layout, list] | None = None, stall_s: float = 60.0,
                 wire_dtype: torch.dtype = torch.float32,
                 screen: UpdateScreen | None = None, limits: StreamLimits | None = None,
                 metrics: MetricsHook | None = None, role=None, durability=None, durable_wait_s: float = 30.0):
        from paramhub.ps.replication import NoReplication, Role

        self.role = role or Role(None)
        self.durability = durability or NoReplication()
        self.durable_wait_s = durable_wait_s
        self.follower = None  # a standby's Follower (for Status), set by the builder
        self.engine = engine
        self.store = engine.store
        self.registry: WorkerRegistry = engine.registry
        self.layout: Layout = engine.store.layout
        self.model_spec = model_spec
        self.run_spec = run_spec
        self.chunk_bytes = chunk_bytes
        self.pull_wait_s = pull_wait_s
        self.expected_kind = expected_kind
        self.push_wait_s = push_wait_s
        self.stall_s = stall_s
        self.epoch = uuid.uuid4().hex[:12]
        self.pushes_rejected = 0
        self._rejected_lock = threading.Lock()
        self.metrics = metrics or MetricsHook()
        self.accepting = True
        self._layout_proto = self.layout.to_proto()
        self._frozen = frozen
        self._frozen_proto = frozen[0].to_proto() if frozen else None
        self._all_regions = list(range(len(self.layout.regions)))
        self._param_regions = self.layout.region_indices(PARAM)
        self.wire_dtype = wire_dtype
        self.wire_layout = self.layout.on_wire(wire_dtype)
        # concurrent pulls share one encoding
        self._pull_cache = PullCache(self.wire_layout, self._all_regions, chunk_bytes)
        self.screen = screen or UpdateScreen(self._param_regions)
        self.limits = limits or StreamLimits(total=1 << 30, per_peer=1 << 30)
        self._busy_logged = 0.0  # when a refused stream was last logged (a flood of them is logged every 10 s)

    # -- unary RPCs -----------------------------------------------------------------

    @_abort_on_error
    def Join(self, request: pb.JoinRequest, context) -> pb.JoinResponse:
        if not self.accepting:
            raise Unavailable("server is shutting down")
        self.role.check_serving()
        check_join(request.worker_name, request.shard)
        record = self.registry.join(request.worker_name, request.incarnation, request.observer, request.shard)
        log.info("%s %s joined (id %d, incarnation %d, shard %d)", "observer" if record.observer else "worker",
                 printable(record.name), record.worker_id, record.incarnation, record.shard)
        return pb.JoinResponse(
            worker_id=record.worker_id, model=self.model_spec, layout=self._layout_proto,
            version=self.store.version, run=self.run_spec, server_epoch=self.epoch,
            max_chunk_bytes=self.chunk_bytes, frozen_layout=self._frozen_proto, term=self.role.term,
        )

    @_abort_on_error
    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        self.role.check_serving()
        self.registry.get(request.worker_id, request.incarnation)
        snap = self.store.snapshot()
        return pb.HeartbeatResponse(version=snap.version, done=snap.done, server_epoch=self.epoch,
                                    term=self.role.term)

    @_abort_on_error
    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveResponse:
        self.role.check_serving()
        record = self.registry.leave(request.worker_id, request.incarnation)
        log.info("worker %s (id %d) left", printable(record.name), record.worker_id)
        return pb.LeaveResponse()

    def status(self) -> StatusView:
        """The run's status now: what Status answers and the status page shows."""
        return server_status(self.engine, self.registry, self.run_spec, epoch=self.epoch,
                             pushes_rejected=self.pushes_rejected, role=self.role,
                             durability=self.follower if self.role.standby else self.durability)

    @_abort_on_error
    def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        return to_response(self.status(), self.chunk_bytes // 2)  # the rest of the reply is a few KB at most

    def stop_accepting(self) -> None:
        """Refuses new joins and pushes from now on (UNAVAILABLE: the server is shutting down)."""
        self.accepting = False

    # -- streaming RPCs -------------------------------------------------------------

    def _open_stream(self, context) -> None:
        """Takes a stream slot until the RPC ends; over a limit, Busy at once (nothing read, thread freed)."""
        try:
            lease = self.limits.acquire(peer_host(context.peer()))
        except Busy as exc:
            self.metrics.stream_refused(exc.limit)
            if time.monotonic() - self._busy_logged > 10.0:
                self._busy_logged = time.monotonic()
                log.warning("refused a stream from %s: %s (%s refused so far)", context.peer(), exc,
                            sum(self.limits.refused.values()))
            raise
        if not context.add_callback(lease.release):  # runs however the RPC ends, a cancel included
            lease.release()  # it has ended already

    @_abort_on_error
    def Pull(self, request: pb.PullRequest, context) -> Iterator[object]:
        self._open_stream(context)
        guard = StallGuard(context, self.stall_s, f"pull by {context.peer()}", watching=False)
        yield from guarded_sends(self._pull(request, context), guard)

    def _pull(self, request: pb.PullRequest, context) -> Iterator[object]:
        self.role.check_serving()
        if request.frozen:
            yield from self._pull_frozen()
            return
        if request.layout_hash and request.layout_hash != self.layout.hash:
            raise FailedPrecondition("layout hash differs from the server's; re-join to learn the layout")
        # a pull renews the lease like a heartbeat; an id this process never saw joined (it restarted)
        # is told at once, not after a pull wait that would end in a header from a new epoch anyway
        if request.worker_id and not self.registry.touch(request.worker_id):
            raise NotFound(f"unknown worker id {request.worker_id} (the server may have restarted); join again")
        remaining = context.time_remaining()
        wait = self.pull_wait_s if remaining is None else max(0.0, min(self.pull_wait_s, remaining - 1.0))
        with self.store.reading(request.min_version, wait) as snap:  # its memory is not reused while we stream
            leases = self._leases_for(request) if request.lease_samples_wanted and not snap.done else ()
            yield pb.PullMessage(header=pb.PullHeader(
                version=snap.version, layout_hash=self.layout.hash, done=snap.done, server_epoch=self.epoch,
                leases=[pb.DataRange(epoch=s.epoch, start=s.start, end=s.end) for s in leases],
                term=self.role.term))
            if snap.version < request.min_version:
                return  # header only: not there yet, ask again
            self.engine.on_pull(request.worker_id, snap.version)
            yield from self._durable_stream(snap)
        self.metrics.bytes_sent(self.wire_layout.nbytes)  # reached only once gRPC took the last chunk

    def _leases_for(self, request: pb.PullRequest) -> list:
        """The data leases a trainer's pull asks for (``engine.grant_leases``); refused for anyone else."""
        try:
            record = self.registry.trainer(request.worker_id)
        except KeyError:
            raise FailedPrecondition("data leases are for workers that joined to train (not anonymous, not "
                                     "observers)") from None
        if not record.joined or record.left:
            raise NotFound(f"worker {request.worker_id} has no session here; join again")
        return self.engine.grant_leases(request.worker_id, request.dataset_samples, request.dataset_fingerprint,
                                        request.lease_samples_wanted)

    def _durable_stream(self, snap) -> Iterator[object]:
        """The version's chunks, the last one held until the standby has the version.

        A worker has a version only with its last chunk, so it learns of none that a failover
        could lose; the rest streams while the standby receives it.
        """
        held = None
        for chunk in self._pull_cache.stream(snap.version, snap.regions):
            if held is not None:
                yield held
            held = chunk
        if not self.durability.wait_durable(snap.version, self.durable_wait_s):
            raise Unavailable(f"version {snap.version} is not replicated yet; retry")
        if held is not None:
            yield held

    def _pull_frozen(self) -> Iterator[object]:
        if self._frozen is None:
            raise FailedPrecondition("this run has no frozen tensors")
        layout, regions = self._frozen
        snap = self.store.snapshot()
        yield pb.PullMessage(header=pb.PullHeader(
            version=snap.version, layout_hash=layout.hash, done=snap.done, server_epoch=self.epoch,
            term=self.role.term))
        yield from codec.encoded_chunks(layout, regions, None, self.chunk_bytes)
        self.metrics.bytes_sent(layout.nbytes)

    @_abort_on_error
    def Push(self, messages: Iterator[object], context) -> pb.PushResponse:
        self._open_stream(context)
        guard = StallGuard(context, self.stall_s, f"push from {printable(context.peer())}")
        try:
            return self._push(guarded_receives(messages, guard))
        except (PSError, codec.MalformedMessage, LayoutError) as exc:
            with self._rejected_lock:
                self.pushes_rejected += 1
            code = exc.code if isinstance(exc, PSError) else grpc.StatusCode.INVALID_ARGUMENT  # as _abort_on_error
            self.metrics.push_rejected(code.name)
            log.warning("rejected push: %s", printable(exc))
            raise
        finally:
            guard.close()

    def _push(self, messages: Iterator[object]) -> pb.PushResponse:
        header = next(messages, None)
        if isinstance(header, Exception):
            raise InvalidArgument(str(header))
        if not isinstance(header, pb.PushHeader):
            raise InvalidArgument("a push must start with a PushHeader")
        if not self.accepting:
            raise Unavailable("server is shutting down; retry against the restarted server")
        self.role.check_serving()
        record = self.registry.get(header.worker_id, header.incarnation)
        if record.observer:
            raise FailedPrecondition(f"{record.name} joined as an observer, which only reads; join as a worker to push")
        self._check_header(header)
        admitted = self.engine.begin(header.worker_id, header.incarnation, header.sequence, wait_s=self.push_wait_s)
        if isinstance(admitted, PushResult):
            for _ in messages:  # a retry of an applied push: same reply, nothing applied
                pass
            return self._response(admitted)
        try:
            return self._receive_and_submit(header, record, messages, admitted)
        finally:
            self.engine.release(admitted)  # a no-op once the engine answered

    def _receive_and_submit(self, header: pb.PushHeader, record, messages: Iterator[object],
                            ticket: Ticket) -> pb.PushResponse:
        # The push is kept as views of the received messages, checked as they arrive.
        receiver = codecs.PushReceiver(self._codec_of(header), self.layout, self.wire_dtype,
                                       max_abs=self.screen.max_abs, chunk_bytes=self.chunk_bytes)

        def abandoned(how: str) -> None:
            expected = receiver.expected_bytes
            log.warning("push %d of %s %s after %d%s payload bytes: nothing applied",
                        header.sequence, printable(record.name), how, receiver.received_bytes,
                        f" of {expected}" if expected is not None else "",
                        extra={"event": "push_abandoned", "worker": record.name, "sequence": header.sequence,
                               "received_bytes": receiver.received_bytes, "expected_bytes": expected})

        try:
            for message in messages:
                if isinstance(message, Exception):
                    raise InvalidArgument(str(message))
                if not isinstance(message, codec.Chunk):
                    raise InvalidArgument("only chunks may follow the PushHeader")
                receiver.add(message)
                self.metrics.bytes_received(len(message.data))
        except grpc.RpcError:
            abandoned("abandoned midway")  # the client went away (crash, cancel, deadline) mid-stream
            raise
        try:
            receiver.finish(header.sparse_values)
        except codec.MalformedMessage:
            # A client killed mid-stream can look like this too: gRPC may end the stream before it
            # marks the call cancelled. Either way the push is incomplete and logged the same.
            abandoned("ended short")
            raise
        if header.dry_run:
            snap = self.store.snapshot()
            return pb.PushResponse(outcome=pb.PUSH_OUTCOME_VALIDATED, version=snap.version,
                                   next_version=snap.version, done=snap.done, server_epoch=self.epoch)
        pieces = receiver.pieces
        weighing = self.screen.weigh(pieces, header.num_samples)
        result = self.engine.submit(StagedPush(
            worker_id=header.worker_id, incarnation=header.incarnation, sequence=header.sequence,
            base_version=header.base_version, num_samples=weighing.num_samples,
            loss=header.loss, pieces=pieces, keeps_base=header.keeps_base, clip=weighing.clip,
            trained=tuple(spans_from_wire(header.trained)),
        ), ticket)
        return self._response(result)

    def _check_header(self, header: pb.PushHeader) -> None:
        if header.layout_hash != self.layout.hash:
            raise FailedPrecondition("push layout hash differs from the server's; re-join to learn the layout")
        if header.kind != self.expected_kind:
            raise FailedPrecondition(
                f"push kind {pb.PushKind.Name(header.kind) if header.kind in pb.PushKind.values() else header.kind}"
                f" does not match this run's update ({self.run_spec.update})")
        if not 1 <= header.num_samples <= MAX_SAMPLES_PER_PUSH:
            raise InvalidArgument(f"num_samples must be from 1 to {MAX_SAMPLES_PER_PUSH}, got {header.num_samples}")
        if not math.isfinite(header.loss):
            raise InvalidArgument("reported loss is NaN or infinite")
        if header.sequence < 1:
            raise InvalidArgument("sequence numbers start at 1")
        if header.sparse_values and not header.sparse:
            raise InvalidArgument("sparse_values is for sparse pushes; a dense one declares none")
        if header.trained and not self.run_spec.data_leases:
            raise InvalidArgument("this run has no data leases: a push names no trained positions")
        self._codec_of(header)

    @staticmethod
    def _codec_of(header: pb.PushHeader) -> codecs.UpdateCodec | None:
        """The codec the header names (None: dense in the wire dtype); InvalidArgument if unknown."""
        try:
            return codecs.for_header(header.codec, header.sparse)
        except codecs.CodecError as exc:
            raise InvalidArgument(printable(str(exc))) from None

    def _response(self, result) -> pb.PushResponse:
        # an applied push is answered once the standby has its version (async; sync rounds are seen by pulls)
        if result.outcome == pb.PUSH_OUTCOME_ACCEPTED and not self.durability.wait_durable(result.version,
                                                                                            self.durable_wait_s):
            raise Unavailable(f"version {result.version} is not replicated yet; retry the push")
        return pb.PushResponse(outcome=result.outcome, version=result.version, next_version=result.next_version,
                               done=result.done, server_epoch=self.epoch, base_kept=result.base_kept,
                               term=self.role.term)


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Registers the servicer with the hand-written codec on Push and Pull.

    The generated ``add_ParameterServerServicer_to_server`` would parse every chunk
    into a protobuf object; ours keeps the payload as a view of the received bytes.
    The bytes on the wire are the same.
    """
    unary = {
        "Join": (pb.JoinRequest, pb.JoinResponse),
        "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatResponse),
        "Leave": (pb.LeaveRequest, pb.LeaveResponse),
        "Status": (pb.StatusRequest, pb.StatusResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString)
        for name, (req, resp) in unary.items()
    }
    handlers["Pull"] = grpc.unary_stream_rpc_method_handler(
        servicer.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=codec.encode_message)
    handlers["Push"] = grpc.stream_unary_rpc_method_handler(
        servicer.Push, request_deserializer=codec.decode_push_message,
        response_serializer=pb.PushResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
