"""PSClient: join, pull, push, heartbeat, leave, with deadlines and bounded retries.

Every call has a deadline. Only idempotent calls are retried, and only on
UNAVAILABLE (the server is not reachable yet, or restarting), CANCELLED (a server
shutting down, or cancelling a stalled stream) and RESOURCE_EXHAUSTED with a
pushback (too many streams open: the server says when to retry): Join, Pull,
Status, and Push, which the server deduplicates by (worker id, incarnation,
sequence) so a retry is applied at most once.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable, Iterator, Sequence, TypeVar

import grpc
import torch

from paramhub.common import codec, codecs
from paramhub.common.config import Timeouts
from paramhub.common.layout import WIRE_TO_DTYPE, Layout
from paramhub.common.leases import Span
from paramhub.common.pushback import pushback_seconds
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.pb import paramhub_pb2_grpc as pb_grpc
from paramhub.common.security import Security, secure_channel

log = logging.getLogger("paramhub.worker")
_WIRE_NAMES = {dtype: name for name, dtype in codec.WIRE_DTYPES.items()}
T = TypeVar("T")
_SERVICE = "/paramhub.v1.ParameterServer/"
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class ServerUnreachable(ConnectionError):
    """The server did not answer within the connect timeout."""


class ServerBusy(ServerUnreachable):
    """The server refused our streams as busy (too many open) for the whole connect timeout."""


class ServerRestarted(ConnectionError):
    """The server restarted (new epoch) or no longer knows this worker: join again."""


class Fenced(ConnectionError):
    """A reply of a lower term than one already seen: that server was replaced by its standby."""


class RunFailed(RuntimeError):
    """The server refused a call for a reason retrying cannot fix."""


@dataclasses.dataclass(frozen=True)
class JoinInfo:
    """What the server told us at Join."""

    worker_id: int
    incarnation: int
    model: pb.ModelSpec
    layout: Layout
    run: pb.RunSpec
    version: int
    server_epoch: str
    max_chunk_bytes: int
    name: str
    frozen_layout: Layout | None = None  # tensors pulled once and never pushed (a frozen backbone)

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype floats are pulled in (and BUFFER regions pushed in)."""
        return WIRE_TO_DTYPE.get(self.run.wire_dtype, torch.float32)

    @property
    def wire_layout(self) -> Layout:
        """The layout as pulls carry it (floats in the run's wire dtype)."""
        return self.layout.on_wire(self.wire_dtype)

    def update_codec(self) -> codecs.UpdateCodec:
        """The codec the server asks pushes to use; RunFailed when this installation lacks it."""
        legacy = codecs.legacy_spec(_WIRE_NAMES.get(self.wire_dtype, "fp32"), self.run.topk_ratio)
        try:
            return codecs.from_spec(self.run.codec or legacy)
        except codecs.CodecError as exc:
            raise RunFailed(f"the server's codec {self.run.codec!r} cannot be used here: {exc}") from None


class PSClient:
    """A connection to one parameter server.

    Args:
        address: ``host:port``.
        timeouts: deadlines and the retry budget (``timeouts.connect``).
        chunk_bytes: payload bytes per chunk pushed (capped by the server's limit).
        security: TLS files and/or the shared token.
        failover: the standby's ``host:port`` (ps-server --standby-for), or "" for none. With one, a
            server unreachable for ``switch_after`` seconds, a standby's refusal, or a reply of a lower
            term than one seen (a fenced server) moves the client to the other address: it joins there
            with the same incarnation and retries the call in flight (a push with its sequence, which
            the standby deduplicates), within the same ``timeouts.connect`` budget.
        switch_after: seconds of UNAVAILABLE from one address before trying the other.
    """

    def __init__(self, address: str, timeouts: Timeouts = Timeouts(), chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
                 security: Security = Security(), failover: str = "", switch_after: float = 2.0):
        self.address = address
        self.failover = failover
        self.switch_after = switch_after
        self.timeouts = timeouts
        self.chunk_bytes = chunk_bytes
        self._security = security
        self._connect(address)
        self.info: JoinInfo | None = None
        self.max_term = 0  # the highest term any server answered with
        self.failovers = 0  # address switches so far
        self._joined_address = ""  # where ``info`` was obtained
        self.last_min_version = 0  # the min_version the last pull asked, after a failover's resync
        self._shard, self._observer = -1, False  # as the last join gave them (a failover joins with them again)
        self._sequence = 0
        self._encoder: codecs.PushEncoder | None = None  # the run's codec, with its state (residuals)
        # The wire layout's buffer a bf16/fp16 pull lands in, reused: a fresh one per pull made the
        # kernel hand out and zero the pages again each time.
        self._pull_buffers: dict[str, list] = {}

    def _connect(self, address: str) -> None:
        max_message = 64 << 20
        self._channel = secure_channel(address, self._security, options=CHANNEL_OPTIONS + [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ])
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self._pull = self._channel.unary_stream(
            _SERVICE + "Pull", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=codec.decode_pull_message)
        self._push = self._channel.stream_unary(
            _SERVICE + "Push", request_serializer=codec.encode_message,
            response_deserializer=pb.PushResponse.FromString)

    def _switch(self, why: str) -> None:
        """Moves to the other address (the standby, or back); the next call joins there first."""
        old, self.address, self.failover = self.address, self.failover, self.address
        self._channel.close()
        self._connect(self.address)
        self.failovers += 1
        log.warning("server %s: %s; moving to %s", old, why, self.address,
                    extra={"event": "worker_failover", "from": old, "to": self.address})

    def _observe_term(self, term: int) -> None:
        """Raises Fenced for a reply of a term lower than one seen (its server was replaced)."""
        if term and term < self.max_term:
            raise Fenced(f"the server at {self.address} answers with term {term}, but term {self.max_term} was "
                         "seen: it was replaced by its standby")
        self.max_term = max(self.max_term, term)

    def _join_here(self) -> None:
        """After a switch: joins the new address with the same name and incarnation (one attempt).

        The sequence and the codec's state are kept: the push in flight is retried as it was.
        """
        if self.info is None or self._joined_address == self.address:
            return
        info = self.info
        request = pb.JoinRequest(worker_name=info.name, incarnation=info.incarnation, shard=self._shard,
                                 observer=self._observer)
        reply = self._stub.Join(request, timeout=self.timeouts.rpc)
        self._observe_term(reply.term)
        if Layout.from_proto(reply.layout).hash != info.layout.hash:
            raise RunFailed(f"the server at {self.address} has a different model layout")
        self.info = dataclasses.replace(info, worker_id=reply.worker_id, version=reply.version,
                                        server_epoch=reply.server_epoch, run=reply.run)
        self._joined_address = self.address
        log.warning("joined %s as id %d at version %d (term %d)", self.address, reply.worker_id, reply.version,
                    reply.term, extra={"event": "worker_rejoined", "server": self.address, "version": reply.version})

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- retries --------------------------------------------------------------------

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """Runs ``call``, retrying with exponential backoff for up to ``timeouts.connect`` s.

        Retried: UNAVAILABLE and CANCELLED, and RESOURCE_EXHAUSTED when the server
        sent a pushback (too many streams open), waiting at least as long as it asked.
        The waits are jittered, so workers refused together do not retry together.
        """
        deadline = time.monotonic() + self.timeouts.connect
        here_since = time.monotonic()
        delay = 0.1
        while True:
            try:
                self._join_here()
                return call()
            except Fenced as exc:
                if not self.failover or time.monotonic() > deadline:
                    raise RunFailed(str(exc)) from None
                self._switch(str(exc))
                here_since, delay = time.monotonic(), 0.1
                continue
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.NOT_FOUND and self.info is not None:
                    raise ServerRestarted(f"the server at {self.address} no longer knows this worker") from None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if self.failover and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and (
                        time.monotonic() - here_since >= self.switch_after or "is a standby" in (details or "")):
                    self._switch(f"unavailable for {time.monotonic() - here_since:.1f}s ({details})")
                    here_since, delay = time.monotonic(), 0.1
                # UNAVAILABLE: not reachable (yet, or restarting); CANCELLED: a server shutting down
                # cancels the calls still in flight. Both are safe to retry: these calls are idempotent
                # or deduplicated. RESOURCE_EXHAUSTED is final (a message too big) unless the server
                # asks us to come back later (it was busy).
                pushback = pushback_seconds(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and pushback is None:
                    raise
                wait = max(delay, pushback or 0.0) * random.uniform(0.8, 1.2)
                if time.monotonic() + wait > deadline:
                    error = ServerBusy if pushback is not None else ServerUnreachable
                    state = "busy" if pushback is not None else "unreachable"
                    raise error(
                        f"parameter server at {self.address} {state} for {self.timeouts.connect:.0f}s "
                        f"({what}): {exc.details() if hasattr(exc, 'details') else exc}") from None
                log.debug("%s: server %s, retrying in %.1fs", what, "busy" if pushback is not None else "unavailable",
                          wait)
                time.sleep(wait)
                delay = min(delay * 2, 2.0)

    # -- RPCs -----------------------------------------------------------------------

    def join(self, name: str = "", shard: int = -1, observer: bool = False, incarnation: int | None = None) -> JoinInfo:
        """Registers with the server and learns the model, layout and run settings."""
        incarnation = time.time_ns() if incarnation is None else incarnation
        request = pb.JoinRequest(worker_name=name, incarnation=incarnation, observer=observer, shard=shard)
        self._shard, self._observer = shard, observer

        def attempt() -> pb.JoinResponse:
            reply = self._stub.Join(request, timeout=self.timeouts.rpc)
            self._observe_term(reply.term)
            return reply

        reply = self._retrying("join", attempt)
        self._joined_address = self.address
        self.info = JoinInfo(
            worker_id=reply.worker_id, incarnation=incarnation, model=reply.model, name=name,
            layout=Layout.from_proto(reply.layout), run=reply.run, version=reply.version,
            server_epoch=reply.server_epoch, max_chunk_bytes=reply.max_chunk_bytes,
            frozen_layout=Layout.from_proto(reply.frozen_layout) if reply.frozen_layout.tensors else None,
        )
        self._sequence = 0
        self._encoder = self._new_encoder(self.info)
        return self.info

    def _new_encoder(self, info: JoinInfo) -> codecs.PushEncoder:
        chunk_bytes = min(self.chunk_bytes, info.max_chunk_bytes or self.chunk_bytes)
        return codecs.PushEncoder(info.update_codec(), info.layout, info.wire_dtype, chunk_bytes)

    def _check_epoch(self, epoch: str) -> None:
        """Raises ServerRestarted when a reply comes from a different server process than our Join."""
        if epoch and self.info is not None and epoch != self.info.server_epoch:
            raise ServerRestarted(f"the server at {self.address} restarted (epoch {epoch})")

    def _joined(self) -> JoinInfo:
        if self.info is None:
            raise RuntimeError("join first")
        return self.info

    def pull(self, regions: list, min_version: int = 0, leases: dict | None = None) -> pb.PullHeader:
        """Streams the global model into ``regions`` (CPU flat buffers of the layout).

        Returns the header. If its version is below ``min_version`` the server's wait
        ended first and ``regions`` are untouched: call again. ``leases``: the
        PullRequest fields that ask for data leases (``LeasedBatches.request``); the
        header then lists this worker's leases, header-only replies too.
        """
        info = self._joined()
        wire = info.wire_layout
        if wire is not info.layout and wire.hash not in self._pull_buffers:
            self._pull_buffers[wire.hash] = wire.empty_regions()
        received = regions if wire is info.layout else self._pull_buffers[wire.hash]
        asked = [min_version]
        failovers = self.failovers

        def attempt() -> pb.PullHeader:
            # after a failover during this pull the new server may never reach min_version (a round it
            # never saw): carry on from its version
            asked[0] = min_version if self.failovers == failovers else min(min_version, self.info.version)
            request = pb.PullRequest(worker_id=self.info.worker_id, min_version=asked[0],
                                     layout_hash=info.layout.hash, **(leases or {}))
            return self._pull_once(request, received, wire)

        header = self._retrying("pull", attempt)
        self.last_min_version = asked[0]
        if wire is not info.layout and header.version >= asked[0]:
            for dst, src in zip(regions, received):
                dst.copy_(src)  # back to the model's dtypes
        return header

    def pull_frozen(self, regions: list) -> pb.PullHeader:
        """Streams the frozen tensors (``info.frozen_layout``) into ``regions``; needed once per run."""
        info = self._joined()
        if info.frozen_layout is None:
            raise RunFailed("this run has no frozen tensors")
        request = pb.PullRequest(worker_id=info.worker_id, frozen=True)
        return self._retrying("pull", lambda: self._pull_once(request, regions, info.frozen_layout))

    def _pull_once(self, request: pb.PullRequest, regions: list, layout: Layout) -> pb.PullHeader:
        stream = self._pull(request, timeout=self.timeouts.transfer + self.timeouts.pull_wait)
        header = next(stream)
        if not isinstance(header, pb.PullHeader):
            raise RunFailed(f"server sent a malformed pull stream: {header}")
        self._check_epoch(header.server_epoch)
        self._observe_term(header.term)
        if header.version < request.min_version:
            stream.cancel()
            return header
        assembler = codec.RegionAssembler(layout, regions, list(range(len(layout.regions))))
        for message in stream:
            if not isinstance(message, codec.Chunk):
                raise RunFailed(f"server sent a malformed pull stream: {message}")
            assembler.add(message)
        assembler.finish()
        return header

    def wait_and_pull(self, regions: list, min_version: int) -> pb.PullHeader:
        """Pulls, polling until the version reaches ``min_version`` or the run is done."""
        while True:
            header = self.pull(regions, min_version)
            if header.version >= self.last_min_version or header.done:
                return header

    def push(self, kind: int, base_version: int, regions: list, num_samples: int, loss: float,
             dry_run: bool = False, keeps_base: bool = False, trained: Sequence[Span] = (),
             announce: Callable[[pb.PushHeader], None] | None = None) -> pb.PushResponse:
        """Sends one update (every region of the layout) in the run's codec; retried with the same sequence number.

        The codec keeps what it did not send (error feedback) for the next push; a
        dry run encodes without touching that. ``keeps_base`` tells the server the
        next update is computed on the same weights (overlapped transfers), so a
        staleness bound keeps counting from them. ``trained``: under data leases, the
        positions the update was computed on. ``announce`` is called with the header
        just before it is first sent.
        """
        info = self._joined()
        self._sequence += 1
        encoder = self._encoder if not dry_run else self._new_encoder(info)
        encoded = encoder.encode(regions)
        sequence = self._sequence
        trained_ranges = [pb.DataRange(epoch=s.epoch, start=s.start, end=s.end) for s in trained]

        def header() -> pb.PushHeader:
            # the worker id of this attempt's server (a failover may join under another id); the same sequence
            return pb.PushHeader(
                worker_id=self.info.worker_id, incarnation=info.incarnation, sequence=sequence,
                base_version=base_version, kind=kind, layout_hash=info.layout.hash, num_samples=num_samples,
                loss=loss, dry_run=dry_run, sparse=encoded.sparse, keeps_base=keeps_base,
                sparse_values=encoded.sparse_values, codec=encoded.codec, trained=trained_ranges,
            )

        def messages() -> Iterator[object]:
            yield pb.PushMessage(header=header())
            yield from encoded.messages()

        if announce is not None:
            announce(header())

        def attempt() -> pb.PushResponse:
            reply = self._push(messages(), timeout=deadline)
            self._observe_term(reply.term)
            return reply

        deadline = self.timeouts.transfer + info.run.max_push_wait_s  # SSP may hold a push back
        reply = self._retrying("push", attempt)
        self._check_epoch(reply.server_epoch)
        return reply

    def heartbeat(self) -> pb.HeartbeatResponse:
        """Renews the lease."""
        info = self._joined()
        request = pb.HeartbeatRequest(worker_id=info.worker_id, incarnation=info.incarnation)
        reply = self._stub.Heartbeat(request, timeout=self.timeouts.rpc)
        self._check_epoch(reply.server_epoch)
        self._observe_term(reply.term)
        return reply

    def leave(self) -> None:
        """Ends the lease (best effort: the server expires it anyway)."""
        info = self._joined()
        try:
            self._stub.Leave(pb.LeaveRequest(worker_id=info.worker_id, incarnation=info.incarnation),
                             timeout=min(5.0, self.timeouts.rpc))
        except grpc.RpcError as exc:
            log.debug("leave failed: %s", exc)

    def status(self) -> pb.StatusResponse:
        """The server's status."""
        return self._retrying("status", lambda: self._stub.Status(pb.StatusRequest(), timeout=self.timeouts.rpc))
