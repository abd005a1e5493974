"""Calls with a unary request read it under a bound, so that calls that never send one hold no thread for long.

gRPC's sync server reads the request message of a unary-request method (Join,
Heartbeat, Leave, Status, Pull, health's Check and Watch) on a handler thread
before the method runs, and waits for it without a bound: a client that opens such
calls and sends nothing would hold a thread each until its own deadline, and a
dozen of them would starve health checks and Status. ``RequestGate`` (a server
interceptor) serves these methods as request-streaming ones instead, with the same
wire bytes (a unary request is one message either way), so that our code runs at
once and reads the one message itself, counted and bounded by ``RequestWaits``:

- at most ``per_peer`` calls from one client address wait for their request at once,
  and in all no more than the handler threads that open streams leave (less a few kept
  for calls that have their request). A new call over a limit takes the place of the call that has
  waited longest, if that one has waited ``OUTWAITED_S`` already (a client sends its
  request at once; it arrives in microseconds): that call is cancelled. Otherwise the
  new call is refused at once as busy (RESOURCE_EXHAUSTED with a pushback). So the
  attacker's host keeps at most ``per_peer`` threads, and a legitimate call, from any
  host, gets in;
- a call whose request has not arrived ``timeout_s`` after it opened is cancelled
  (``--request-timeout``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import grpc

from paramhub.ps.errors import Busy, abort_rpc
from paramhub.ps.limits import RETRY_AFTER_S, peer_host

log = logging.getLogger("paramhub.ps")
OUTWAITED_S = 0.5  # a call waiting this long for its request may give its place to a new one
LOG_EVERY_S = 10.0  # a flood of refused or cancelled calls is logged once per this many seconds


class _Waiting:
    """One call waiting for its request message."""

    __slots__ = ("peer", "context", "since", "cancelled")

    def __init__(self, peer: str, context, since: float):
        self.peer = peer
        self.context = context
        self.since = since
        self.cancelled = ""  # why it was cancelled: "timeout" or "outwaited"; "" while it may still arrive


class RequestWaits:
    """The calls waiting for their request message: counted per peer and in all, each wait bounded.

    One thread cancels the calls whose wait outlasts ``timeout_s`` (all waits have the
    same bound, so the oldest is always due first).

    Args:
        threads: the handler threads that waiting calls and open streams may hold together (each holds one).
        per_peer: calls waiting at once from one client address.
        timeout_s: the longest a call may wait for its request (``--request-timeout``).
        held_by_streams: how many threads open Push and Pull streams hold now.
        retry_after_s: the pushback a refused client is given.
    """

    def __init__(self, threads: int, per_peer: int, timeout_s: float, held_by_streams: Callable[[], int] = lambda: 0,
                 retry_after_s: float = RETRY_AFTER_S):
        if not 1 <= per_peer <= threads:
            raise ValueError(f"need 1 <= per_peer <= threads, got {per_peer} and {threads}")
        self.threads = threads
        self.per_peer = per_peer
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._held_by_streams = held_by_streams
        self._waiting: list[_Waiting] = []  # oldest first
        self._changed = threading.Condition()
        self._closed = False
        self.refused: collections.Counter[str] = collections.Counter()  # "total" / "per_peer" -> calls refused
        self.cancelled: collections.Counter[str] = collections.Counter()  # "timeout" / "outwaited" -> calls
        self._logged = 0.0
        threading.Thread(target=self._cancel_overdue, name="request-waits", daemon=True).start()

    @property
    def total(self) -> int:
        """Calls that may wait at once now: the threads that open streams leave."""
        return max(1, self.threads - self._held_by_streams())

    def enter(self, peer: str, context) -> _Waiting:
        """Counts a call from ``peer`` as waiting for its request, making room if the oldest has outwaited.

        Raises:
            Busy: a limit is reached and every call counted against it arrived less than ``OUTWAITED_S`` ago.
        """
        now, total = time.monotonic(), self.total
        with self._changed:
            mine = [w for w in self._waiting if w.peer == peer]
            limit, full = (("per_peer", mine) if len(mine) >= self.per_peer else
                           ("total", self._waiting) if len(self._waiting) >= total else ("", []))
            outwaited = full[0] if full and now - full[0].since >= OUTWAITED_S else None
            if full and outwaited is None:
                self.refused[limit] += 1
                raise Busy(f"server busy: {len(full)} calls {'from ' + peer + ' ' if limit == 'per_peer' else ''}"
                           "are waiting for their request message; retry shortly", self.retry_after_s, limit)
            if outwaited is not None:
                self._drop(outwaited, "outwaited")
            entry = _Waiting(peer, context, now)
            self._waiting.append(entry)
            if len(self._waiting) == 1:
                self._changed.notify()
        if outwaited is not None:
            outwaited.context.cancel()  # its thread unwinds on its own; the place is the new call's already
        return entry

    def leave(self, entry: _Waiting) -> None:
        """The call's request arrived, or its wait ended otherwise (idempotent)."""
        with self._changed:
            if entry in self._waiting:
                self._waiting.remove(entry)

    @property
    def waiting(self) -> int:
        """Calls waiting for their request now."""
        with self._changed:
            return len(self._waiting)

    def close(self) -> None:
        """Stops the thread that cancels overdue calls."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _drop(self, entry: _Waiting, why: str) -> None:  # under the lock
        self._waiting.remove(entry)
        entry.cancelled = why
        self.cancelled[why] += 1
        if time.monotonic() - self._logged > LOG_EVERY_S:
            self._logged = time.monotonic()
            log.warning("cancelled a call from %s that sent no request message (%s; %s cancelled so far)",
                        entry.peer, f"none within {self.timeout_s:g}s, --request-timeout" if why == "timeout"
                        else "its place taken by a new call", sum(self.cancelled.values()))

    def _cancel_overdue(self) -> None:
        with self._changed:
            while not self._closed:
                if not self._waiting:
                    self._changed.wait()
                    continue
                oldest = self._waiting[0]
                due_in = oldest.since + self.timeout_s - time.monotonic()
                if due_in > 0:
                    self._changed.wait(due_in)
                    continue
                self._drop(oldest, "timeout")
                oldest.context.cancel()  # grpc's cancel only queues an operation: cheap under the lock


class RequestGate(grpc.ServerInterceptor):
    """Serves every unary-request method as a request-streaming one that reads its request under ``waits``.

    Placed after the token check, so that a call without the token is refused before it is counted.
    """

    def __init__(self, waits: RequestWaits):
        self.waits = waits

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # unknown methods, Push, reflection: nothing to wait for before our code runs
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        served = _reading_first(behavior, handler.request_deserializer, handler_call_details.method, self.waits)
        make = (grpc.stream_stream_rpc_method_handler if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler)
        # no request_deserializer: the request arrives as bytes and is parsed under our control (as grpc would)
        return make(served, response_serializer=handler.response_serializer)


def _reading_first(behavior, deserializer, method: str, waits: RequestWaits):
    def served(requests, context, *send_response_callback):
        request = _read_request(requests, context, deserializer, method, waits)
        return behavior(request, context, *send_response_callback)

    # health's Watch is "non-blocking" (it is handed a callback instead of returning a generator)
    for attribute in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, attribute):
            setattr(served, attribute, getattr(behavior, attribute))
    return served


def _read_request(requests, context, deserializer, method: str, waits: RequestWaits):
    """The one request message, read within the limits; failures end the RPC with grpc's own codes."""
    try:
        entry = waits.enter(peer_host(context.peer()), context)
    except Busy as exc:
        abort_rpc(context, exc)
    try:
        serialized = next(requests, None)  # a cancel (overdue, outwaited, the client's) raises grpc.RpcError
    finally:
        waits.leave(entry)
    if entry.cancelled:  # the cancel ended the read before grpc marked the call cancelled
        context.abort(grpc.StatusCode.CANCELLED, "no request message")
    if serialized is None:  # as gRPC answers a unary call closed without its request
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f'"{method}" requires exactly one request message.')
    try:
        return deserializer(serialized) if deserializer else serialized
    except Exception:  # noqa: BLE001 - whatever the parser raises, the request is malformed; as gRPC answers it
        context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
