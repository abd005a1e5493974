"""A standby server: state-machine replication of every published version, failover, terms and fencing.

- ``Role``: primary or standby, the term, the peer; persisted next to the checkpoints
  (``replication.json``, written atomically), so a restarted primary can learn it was replaced.
- ``Replicator`` (primary): streams a snapshot and then each ``AppliedUpdate`` to the standby
  that follows it, and keeps the durability gate: with a standby attached, a version is durable
  once the standby acked it (pulls and async replies wait for that). A standby that stops acking
  for ``ack_timeout`` is detached: the primary goes on alone, unprotected, and says so.
- ``Follower`` (standby): dials the primary, applies the snapshot and every update through the
  engine's own rule (``engine.apply_replicated``), acks each, and promotes itself under a higher
  term when the stream is broken and the primary unreachable for ``failover_after`` seconds.
- ``ReplicationService``: the gRPC service (Follow, Term) on the primary's and the standby's port.
"""

from __future__ import annotations

import contextlib
import collections
import json
import logging
import pathlib
import queue
import threading
import time
from typing import Callable, Iterator

import grpc

from paramhub.common import checkpoint, codec
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.security import Security, secure_channel
from paramhub.ps import replica_wire as wire
from paramhub.ps.consistency import AppliedUpdate, ConsistencyEngine
from paramhub.ps.cut import Cut
from paramhub.ps.errors import Unavailable
from paramhub.ps.identity import printable
from paramhub.ps.ledger import Ledger
from paramhub.ps.registry import WorkerRegistry

log = logging.getLogger("paramhub.ps")
STATE_FILE = "replication.json"
SERVICE = "paramhub.v1.Replication"
HEARTBEAT_S = 0.25  # the primary's heartbeats on an idle stream; the standby acks each
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]


class Fenced(RuntimeError):
    """This server was replaced by its standby (a higher term): it must not serve."""


# -- role and term -----------------------------------------------------------------------


class Role:
    """Primary or standby, the term, and the peer; thread-safe, persisted when a directory is given.

    Args:
        directory: where ``replication.json`` lives (the checkpoint directory), or None (memory only).
        standby_for: the primary's address when this server starts as its standby.
    """

    def __init__(self, directory: str | None, standby_for: str | None = None):
        self._lock = threading.Lock()
        self.path = pathlib.Path(directory) / STATE_FILE if directory else None
        saved = self.load()
        self.term = int(saved.get("term", 1))
        self.peer: str = saved.get("peer", "")
        self.role = "standby" if standby_for else "primary"
        if standby_for:
            self.peer = standby_for
        self.failovers = 0

    def load(self) -> dict:
        """What ``replication.json`` holds ({} when absent or unreadable)."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.error("cannot read %s: %s", self.path, exc)
            return {}

    def save(self) -> None:
        if self.path is not None:
            checkpoint.write_atomically(self.path, json.dumps(
                {"term": self.term, "role": self.role, "peer": self.peer}).encode())

    @property
    def standby(self) -> bool:
        with self._lock:
            return self.role == "standby"

    def check_serving(self) -> None:
        """Raises Unavailable while this server is a standby (workers go to the primary)."""
        if self.standby:
            raise Unavailable(f"this server is a standby following the primary at {self.peer}; "
                              "it serves workers only once it takes over")

    def set_peer(self, peer: str, term: int | None = None) -> None:
        """Remembers the peer (the standby that attached, or the primary followed) and persists it."""
        with self._lock:
            self.peer = peer
            if term is not None:
                self.term = term
            self.save()

    def promote(self) -> int:
        """Standby → primary under the next term (persisted); returns the new term."""
        with self._lock:
            self.role = "primary"
            self.term += 1
            self.failovers += 1
            self.save()
            return self.term


def check_not_replaced(role: Role, version: int, security: Security, timeout: float = 3.0) -> None:
    """A (re)starting primary asks the standby it last had: refuses to serve if that one took over.

    Raises:
        Fenced: the peer has a higher term, serves as primary, or holds newer state (it will take over).
    """
    if not role.peer:
        return
    channel = secure_channel(role.peer, security, options=CHANNEL_OPTIONS)
    try:
        call = channel.unary_unary(f"/{SERVICE}/Term", request_serializer=pb.TermRequest.SerializeToString,
                                   response_deserializer=pb.TermResponse.FromString)
        reply = call(pb.TermRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        log.info("former standby %s not reachable (%s): serving as primary, term %d", role.peer,
                 exc.code().name if hasattr(exc, "code") else exc, role.term)
        return
    finally:
        channel.close()
    if reply.term > role.term or reply.role == "primary" or reply.version > version:
        raise Fenced(f"refusing to serve: the standby at {role.peer} took over (its term {reply.term}, role "
                     f"{reply.role}, version {reply.version}; ours term {role.term}, version {version}). "
                     f"Restart this server as its standby (--standby-for {role.peer}) or discard {role.path}")
    log.info("former standby %s is at term %d, version %d: serving as primary", role.peer, reply.term, reply.version)


# -- the primary's side ------------------------------------------------------------------


class Replicator:
    """Streams each published version to the standby that follows, and gates what workers see on its acks.

    Args:
        engine: the engine whose ``on_published`` feeds this.
        registry: the workers (sent with each heartbeat, so the standby keeps their ids).
        role: this server's role and term.
        cut: ``cut(under_lock)``: a context manager giving the checkpoint's ``Cut``.
        chunk_bytes: payload bytes per chunk.
        ack_timeout: a standby silent this long (no ack) is detached; the primary goes on unprotected.
        metrics: where replication events go.
    """

    def __init__(self, engine: ConsistencyEngine, registry: WorkerRegistry, role: Role,
                 cut: Callable[..., contextlib.AbstractContextManager[Cut]], chunk_bytes: int, ack_timeout: float,
                 metrics=None):
        self.engine = engine
        self.registry = registry
        self.role = role
        self._cut = cut
        self.chunk_bytes = chunk_bytes
        self.ack_timeout = ack_timeout
        self.metrics = metrics
        self._cond = threading.Condition()
        self._session: object | None = None  # the attached standby's stream
        self._queue: collections.deque[AppliedUpdate] = collections.deque()
        self._last_ack = 0.0
        self.acked = 0  # the newest version the attached standby acked
        self._offered = 0  # the newest version whose stream to the standby has begun: no ack may pass it
        self.state = "none"  # none (never had a standby), attached, unprotected
        self.standby_address = ""
        self.bytes_sent = 0

    # -- the engine's hook, the gate ------------------------------------------------

    def on_published(self, update: AppliedUpdate) -> None:
        """Queues a published version for the standby (called under the store's lock)."""
        with self._cond:
            if self._session is not None:
                self._queue.append(update)
                self._cond.notify_all()

    def durable(self, version: int) -> bool:
        """Whether workers may learn of ``version``: no standby attached, or it acked the version."""
        with self._cond:
            return self._session is None or self.acked >= version

    def wait_durable(self, version: int, timeout: float) -> bool:
        """Waits up to ``timeout`` until ``version`` is durable; the ack bound ends every wait sooner."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._session is not None and self.acked < version:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, HEARTBEAT_S))
                self._check_acks()
            return True

    @property
    def lag(self) -> int:
        """Versions published and not yet acked by the attached standby."""
        with self._cond:
            return 0 if self._session is None else max(0, self.engine.store.version - self.acked)

    def _check_acks(self) -> None:
        """Detaches a standby silent past the bound (under ``_cond``)."""
        if self._session is not None and time.monotonic() - self._last_ack > self.ack_timeout:
            self._detach(self._session, f"no ack within {self.ack_timeout:g}s")

    def _detach(self, session: object, why: str) -> None:
        if self._session is not session:
            return
        self._session = None
        self.engine.on_published = None  # no copies of the update while nobody follows
        self._queue.clear()
        self.state = "unprotected"
        self._cond.notify_all()
        log.warning("standby %s detached (%s): running UNPROTECTED until it re-attaches", self.standby_address,
                    why, extra={"event": "standby_detached", "standby": self.standby_address, "reason": why})
        if self.metrics is not None:
            self.metrics.standby_changed(False)

    # -- the Follow stream ----------------------------------------------------------

    def follow(self, acks: Iterator[pb.ReplicaAck], context) -> Iterator[object]:
        """Serves one standby: the snapshot, then every version as it is published, heartbeats between."""
        first = next(acks, None)
        if first is None:
            return
        if first.term > self.role.term:
            raise Unavailable(f"a standby of term {first.term} follows a primary of term {self.role.term}")
        session = object()
        address = first.standby_address

        def attach(version: int) -> None:
            with self._cond:
                if self._session is not None:
                    self._detach(self._session, "replaced by a new stream")
                self._session, self.acked, self._last_ack = session, version, time.monotonic()
                self._offered = version
                self.engine.on_published = self.on_published  # under the store's lock: no version falls between
                self._queue.clear()
                self.state, self.standby_address = "attached", address
                self._cond.notify_all()
            snapshot_meta["dedup"] = [[w, inc, seq, wire.result_to_json(reply)]
                                      for w, (inc, seq, reply) in self.engine.intake.memory().items()]
            snapshot_meta["last_loss"] = self.engine.last_loss

        snapshot_meta: dict = {}
        context.add_callback(lambda: self._ended(session, "stream ended"))
        threading.Thread(target=self._read_acks, args=(session, acks), name="ps-replica-acks", daemon=True).start()
        with self._cut(attach) as cut:
            log.info("standby %s attached: snapshot at version %d", address, cut.version,
                     extra={"event": "standby_attached", "standby": address, "version": cut.version})
            if address:
                self.role.set_peer(address)
            tensors = {f"model.{k}": v for k, v in cut.model_state.items()}
            tensors.update({f"server.{k}": v for k, v in cut.server_state.items()})
            yield from self._sent(wire.encode(pb.REPLICA_KIND_SNAPSHOT, cut.version, self.role.term,
                                              dict(snapshot_meta, metadata=cut.metadata, done=cut.done),
                                              tensors, self.chunk_bytes))
        if self.metrics is not None:
            self.metrics.standby_changed(True)
        with self._cond:
            self._last_ack = max(self._last_ack, time.monotonic())  # the bound counts from the snapshot's end
        while True:
            with self._cond:
                if not self._queue and self._session is session:
                    self._cond.wait(HEARTBEAT_S)
                self._check_acks()
                if self._session is not session:
                    return
                update = self._queue.popleft() if self._queue else None
            if update is not None:
                with self._cond:
                    self._offered = update.version
                yield from self._sent(wire.encode(pb.REPLICA_KIND_UPDATE, update.version, self.role.term,
                                                  wire.update_meta(update), wire.update_tensors(update),
                                                  self.chunk_bytes))
            else:
                yield from wire.encode(pb.REPLICA_KIND_HEARTBEAT, self.engine.store.version, self.role.term,
                                       {"workers": self.registry.export()}, {}, self.chunk_bytes)

    def _sent(self, messages: Iterator[object]) -> Iterator[object]:
        for message in messages:
            if isinstance(message, bytes):
                self.bytes_sent += len(message)
                if self.metrics is not None:
                    self.metrics.replication_bytes(len(message))
            yield message

    def _read_acks(self, session: object, acks: Iterator[pb.ReplicaAck]) -> None:
        try:
            for ack in acks:
                with self._cond:
                    if self._session is not session:
                        return
                    if ack.version > self._offered:  # a version it was never sent: a broken or lying peer
                        log.warning("standby %s acked version %d, but was sent only up to %d: detached",
                                    printable(self.standby_address), ack.version, self._offered,
                                    extra={"event": "standby_ack_refused", "acked": ack.version,
                                           "offered": self._offered})
                        self._detach(session, "acked a version it was never sent")
                        return
                    self.acked = max(self.acked, ack.version)
                    self._last_ack = time.monotonic()
                    self._cond.notify_all()
        except grpc.RpcError:
            pass
        self._ended(session, "stream broken")

    def _ended(self, session: object, why: str) -> None:
        with self._cond:
            self._detach(session, why)

    def close(self) -> None:
        """Ends the stream of the attached standby (server shutdown)."""
        with self._cond:
            if self._session is not None:
                self._session = None
                self.engine.on_published = None
                self._cond.notify_all()


class NoReplication:
    """The gate of a server without a standby: every version is durable at once."""

    state = "none"
    acked = 0
    lag = 0
    standby_address = ""

    def durable(self, version: int) -> bool:
        return True

    def wait_durable(self, version: int, timeout: float) -> bool:
        return True


# -- the standby's side ------------------------------------------------------------------


class Follower:
    """Follows a primary on a daemon thread; promotes this server when the primary is gone.

    Args:
        primary: the primary's address.
        engine: this (standby) server's engine; its store takes the snapshot.
        registry: filled from the primary's workers at promotion.
        role: this server's role (promoted here).
        own_address: this server's address, told to the primary (workers fail over to it).
        failover_after: seconds without a message from the primary, stream broken, before promoting.
        security: TLS and token for the channel to the primary.
        metrics: where failovers go.
    """

    def __init__(self, primary: str, engine: ConsistencyEngine, registry: WorkerRegistry, role: Role,
                 own_address: str, failover_after: float, security: Security = Security(), metrics=None):
        self.primary = primary
        self.engine = engine
        self.store = engine.store
        self.registry = registry
        self.role = role
        self.own_address = own_address
        self.failover_after = failover_after
        self.security = security
        self.metrics = metrics
        self.promoted = threading.Event()
        self.finished = threading.Event()  # the primary's run completed and it went away: nothing to take over
        self.connected = False
        self.snapshot_version: int | None = None
        self.last_contact = time.monotonic()
        self._workers: list[dict] = []
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="ps-follower", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)

    def contact(self) -> None:
        """The primary called us (Term): it is alive, so the failover clock starts again."""
        self.last_contact = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception as exc:  # noqa: BLE001 - any failure of the stream is a broken stream
                log.debug("following %s: %s", self.primary, exc)
            self.connected = False
            if self._stop.is_set():
                return
            if self.snapshot_version is None:
                self._stop.wait(0.2)  # never had the primary's state: nothing to take over with
                continue
            if self.store.done:
                log.info("primary %s gone after its run completed: standby done", self.primary)
                self.finished.set()
                return
            if time.monotonic() - self.last_contact >= self.failover_after:
                self._promote()
                return
            self._stop.wait(0.1)

    def _follow(self) -> None:
        channel = secure_channel(self.primary, self.security, options=CHANNEL_OPTIONS)
        acks: queue.Queue = queue.Queue()
        acks.put(pb.ReplicaAck(version=self.store.version, standby_address=self.own_address, term=self.role.term))

        def requests() -> Iterator[pb.ReplicaAck]:
            while (ack := acks.get()) is not None:
                yield ack

        follow = channel.stream_stream(f"/{SERVICE}/Follow", request_serializer=pb.ReplicaAck.SerializeToString,
                                       response_deserializer=wire.decode_replica_message)
        call = self._call = follow(requests())
        received = [time.monotonic()]
        watchdog = threading.Thread(target=self._watch, args=(call, received), daemon=True)
        watchdog.start()
        assembler = None
        try:
            for message in call:
                received[0] = time.monotonic()
                if isinstance(message, Exception):
                    raise message
                if isinstance(message, pb.ReplicaHeader):
                    assembler = wire.Assembler(message)
                elif assembler is not None:
                    assembler.add(message)
                else:
                    raise codec.MalformedMessage("replica chunk without a header")
                if assembler.complete:
                    if assembler.header.kind == pb.REPLICA_KIND_UPDATE:
                        # held here, the update survives the primary: ack on receipt, apply while it goes on
                        acks.put(pb.ReplicaAck(version=assembler.header.version, term=self.role.term))
                    self._handle(assembler)
                    assembler = None
                    acks.put(pb.ReplicaAck(version=self.store.version, term=self.role.term))
        finally:
            acks.put(None)
            call.cancel()
            channel.close()

    def _watch(self, call, received: list) -> None:
        """Cancels a stream on which nothing arrived for ``failover_after`` (a hung primary)."""
        while call.is_active() if hasattr(call, "is_active") else True:
            if time.monotonic() - received[0] > self.failover_after:
                call.cancel()
                return
            time.sleep(0.1)

    def _handle(self, item: wire.Assembler) -> None:
        header = item.header
        if header.term < self.role.term and self.snapshot_version is not None:
            raise Unavailable(f"primary of term {header.term} is older than ours ({self.role.term})")
        if header.kind == pb.REPLICA_KIND_SNAPSHOT:
            self._take_snapshot(item)
        elif header.kind == pb.REPLICA_KIND_UPDATE:
            self.engine.apply_replicated(wire.update_from(item))
        elif header.kind == pb.REPLICA_KIND_HEARTBEAT:
            self._workers = item.meta["workers"]
        self.last_contact = time.monotonic()

    def _take_snapshot(self, item: wire.Assembler) -> None:
        version = item.header.version
        if self.snapshot_version is not None and version < self.store.version:
            raise Unavailable(f"the primary's snapshot (version {version}) is older than ours "
                              f"({self.store.version}): it restarted from an older state")
        tensors, meta = item.tensors(), item.meta
        layout = self.store.layout
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        server_state = {k[len("server."):]: v for k, v in tensors.items() if k.startswith("server.")}
        if meta["metadata"].get("layout_hash") != layout.hash:
            raise RuntimeError(f"the primary {self.primary} serves another model (layout "
                               f"{meta['metadata'].get('layout_hash', '')[:12]}, ours {layout.hash[:12]})")
        regions = layout.flatten(model_state)
        rule_state = checkpoint.rule_state_of([region.name for region in layout.regions], server_state)
        engine = self.engine
        with self.store.lock:
            self.store.replace_state(regions, version, rule_state, bool(meta["done"]))
            engine.ledger = Ledger.from_tensors(server_state)
            if engine.leases is not None:  # the primary's done positions (nothing is leased on a standby)
                engine.leases = engine.leases.restored(meta["metadata"].get("leases"))
            engine.last_loss = meta.get("last_loss", float("nan"))
            for worker_id, incarnation, sequence, reply in meta["dedup"]:
                engine.intake.remember(worker_id, incarnation, sequence, wire.result_from_json(reply))
        self._workers = meta["metadata"]["workers"]
        self.snapshot_version = version
        self.connected = True
        self.role.set_peer(self.primary, term=item.header.term)
        log.info("following %s: snapshot at version %d, term %d", self.primary, version, item.header.term,
                 extra={"event": "standby_following", "primary": self.primary, "version": version})

    def _promote(self) -> None:
        term = self.role.promote()
        ledger = self.engine.ledger
        self.registry.restore(self._workers, first_free_id=max(ledger.applied_per_worker, default=0) + 1)
        log.warning("primary %s unreachable for %.1fs: taking over at version %d under term %d",
                    self.primary, self.failover_after, self.store.version, term,
                    extra={"event": "failover", "primary": self.primary, "version": self.store.version,
                           "term": term})
        if self.metrics is not None:
            self.metrics.failover()
        self.promoted.set()


# -- the gRPC service --------------------------------------------------------------------


class ReplicationService:
    """Follow (a standby's stream) and Term (who is primary), on the server's own port."""

    def __init__(self, role: Role, store, replicator: Replicator | None, follower: Follower | None = None):
        self.role = role
        self.store = store
        self.replicator = replicator
        self.follower = follower

    def Follow(self, acks, context):
        if self.role.standby or self.replicator is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this server is a standby: follow its primary")
        try:
            yield from self.replicator.follow(acks, context)
        except Unavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def Term(self, request, context) -> pb.TermResponse:
        if self.follower is not None and not self.follower.promoted.is_set():
            self.follower.contact()
        return pb.TermResponse(term=self.role.term, role=self.role.role, version=self.store.version)


def add_to_server(service: ReplicationService, server: grpc.Server) -> None:
    handlers = {
        "Follow": grpc.stream_stream_rpc_method_handler(
            service.Follow, request_deserializer=pb.ReplicaAck.FromString, response_serializer=codec.encode_message),
        "Term": grpc.unary_unary_rpc_method_handler(
            service.Term, request_deserializer=pb.TermRequest.FromString,
            response_serializer=pb.TermResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
