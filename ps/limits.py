"""What Push and Pull streams may hold: handler threads (stream slots) and time without progress.

gRPC's sync server runs every RPC on one thread of a fixed pool (``--rpc-threads``),
and a stream holds its thread until it ends: a push while its client sends, a pull
while it waits for a version (``--pull-wait``) and while its client reads. Clients
that open streams and then send or read nothing would take every thread, and health
checks, Status, Join, Heartbeat and Leave would queue behind them. Two bounds keep the
server reachable:

- ``StreamLimits``: at most ``total`` streams open at once, which leaves handler
  threads for the quick unary calls, and at most ``per_peer`` from one client address.
  A stream over a limit is refused at once (``Busy``, RESOURCE_EXHAUSTED with a
  pushback), before anything is read, so its thread is free again at once.
- ``StallGuard``: a push whose client stops sending, or a pull whose client stops
  reading (the server blocks sending into a full HTTP/2 flow-control window), is
  cancelled after ``stall_s``, which frees its thread and its slot.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import urllib.parse
from typing import Iterator

from paramhub.ps.errors import Busy

log = logging.getLogger("paramhub.ps")
RETRY_AFTER_S = 1.0  # the pushback of a refused stream: a legitimate one ends within seconds


def peer_host(peer: str) -> str:
    """The client's address without its port, from ``context.peer()``.

    ``ipv4:10.0.0.5:41234`` → ``10.0.0.5``; ``ipv6:%5B::1%5D:41234`` (or unquoted
    ``ipv6:[::1]:41234``) → ``::1``; anything else (``unix:/tmp/ps.sock``) as it is.
    """
    scheme, _, address = peer.partition(":")
    if scheme == "ipv4":
        return address.rpartition(":")[0] or address
    if scheme == "ipv6":
        host = urllib.parse.unquote(address).rpartition(":")[0]
        return host.strip("[]") or address
    return peer


class StreamLease:
    """One open stream's slot; ``release`` gives it back (idempotent, safe from any thread)."""

    def __init__(self, limits: "StreamLimits", peer: str):
        self._limits = limits
        self.peer = peer
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Gives the slot back; later calls do nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._limits._release(self.peer)

    def __enter__(self) -> "StreamLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StreamLimits:
    """Counts open streams, in all and per peer, and refuses those over a limit.

    Args:
        total: streams open at once from all peers (``--max-open-streams``).
        per_peer: streams open at once from one peer address (``--max-streams-per-peer``).
        retry_after_s: the pushback a refused client is given.
    """

    def __init__(self, total: int, per_peer: int, retry_after_s: float = RETRY_AFTER_S):
        if total < 1 or per_peer < 1:
            raise ValueError(f"need total >= 1 and per_peer >= 1, got {total} and {per_peer}")
        self.total = total
        self.per_peer = per_peer
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._open: collections.Counter[str] = collections.Counter()
        self._open_total = 0
        self.refused: collections.Counter[str] = collections.Counter()  # "total" / "per_peer" -> streams refused

    def acquire(self, peer: str) -> StreamLease:
        """Takes a slot for a stream from ``peer``.

        Raises:
            Busy: ``total`` streams are open, or ``per_peer`` from this peer; ``Busy.limit``
                says which ("total" or "per_peer").
        """
        with self._lock:
            if self._open_total >= self.total:
                limit, message = "total", (
                    f"server busy: all {self.total} stream slots are taken (--max-open-streams); retry shortly")
            elif self._open[peer] >= self.per_peer:
                limit, message = "per_peer", (
                    f"server busy: {self.per_peer} streams are open from {peer} (--max-streams-per-peer); "
                    "retry shortly")
            else:
                self._open[peer] += 1
                self._open_total += 1
                return StreamLease(self, peer)
            self.refused[limit] += 1
        raise Busy(message, self.retry_after_s, limit)

    def _release(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]  # the table holds only peers with streams open
            self._open_total -= 1

    @property
    def open(self) -> int:
        """Streams open now, from all peers."""
        with self._lock:
            return self._open_total

    def open_by_peer(self) -> dict[str, int]:
        """Peer -> streams open now (peers with none are absent)."""
        with self._lock:
            return dict(self._open)


class StallGuard:
    """Cancels a stream that makes no progress for ``stall_s`` seconds.

    A push makes progress when a message arrives (``touch``); it is watched from
    the start, so a client that opens a push and sends nothing is cancelled too. A
    pull makes progress when gRPC has sent a message: it is watched only while a
    message waits to be sent (``sending`` ... ``sent``), not while the pull waits
    for a new version (``--pull-wait`` bounds that). A client's own deadline ends a
    stalled stream on its side; this guard protects the server from clients that
    set none (or a very long one): the stream is cancelled, and its handler thread,
    its stream slot and the memory it held are freed.

    Args:
        context: the RPC's ``grpc.ServicerContext`` (``cancel()`` ends the RPC).
        stall_s: the longest time without progress.
        what: names the stream in the log line.
        watching: start watching at once (a push) or only from the first ``sending`` (a pull).
    """

    def __init__(self, context, stall_s: float, what: str, watching: bool = True):
        self._context = context
        self._stall_s = stall_s
        self._what = what
        self._since: float | None = time.monotonic() if watching else None  # waiting for progress since
        self._done = threading.Event()
        self.fired = False
        threading.Thread(target=self._watch, name="stall-guard", daemon=True).start()

    def touch(self) -> None:
        """Records progress (a message arrived); the wait for the next one starts now."""
        self._since = time.monotonic()

    sending = touch  # a message is handed to gRPC to send: progress is due from now

    def sent(self) -> None:
        """gRPC sent the message: nothing is due until the next ``sending``."""
        self._since = None

    def close(self) -> None:
        """Stops watching (the stream ended, or the rest is not the client's to hurry)."""
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self._stall_s / 4)):
            since = self._since
            if since is not None and time.monotonic() - since > self._stall_s:
                self.fired = True
                log.warning("%s made no progress for over %.0fs: cancelled (--stall-timeout)",
                            self._what, self._stall_s)
                self._context.cancel()
                return


def guarded_receives(messages: Iterator[object], guard: StallGuard) -> Iterator[object]:
    """Passes a push's messages through, telling the guard of each; the guard stops once the
    stream has ended (an SSP wait that follows is not a stall)."""
    try:
        for message in messages:
            guard.touch()
            yield message
    finally:
        guard.close()


def guarded_sends(messages: Iterator[object], guard: StallGuard) -> Iterator[object]:
    """Passes a pull's messages to gRPC, the guard watching while each waits to be sent.

    gRPC's sync server resumes a response generator only once the message it
    yielded has been sent, so the time spent at ``yield`` is the time the client
    took to make room for it.
    """
    try:
        for message in messages:
            guard.sending()
            yield message
            guard.sent()
    finally:
        guard.close()
