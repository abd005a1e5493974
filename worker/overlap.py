"""Overlapping transfers with computation (async mode): push in the background, prefetch the next pull.

``OverlappedClient`` wraps a client and keeps the trainer's loop unchanged:

- ``push`` copies the update into a private buffer, starts (push it, then pull the
  new weights into a spare buffer) on a background thread, and returns at once
  with the reply of the *previous* transfer (waiting for it first if it is still
  running: at most one transfer is in flight);
- ``wait_and_pull`` hands over the weights that a finished transfer prefetched, or,
  while one is still running, returns at once so the next step computes on the
  weights it has.

So step t+1 computes while update t travels: each push is based on weights one
exchange older than without overlap, which unbounded async mode accepts. The
trainer uses it only there: sync pushes must be based on the round's version,
and the SSP bound counts a worker's lag from its pulls, which overlap outruns
(measured: pushes dropped as too stale, their work wasted).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from paramhub.common.layout import Layout
from paramhub.common.pb import paramhub_pb2 as pb


class OverlappedClient:
    """A client whose pushes and pulls run behind the computation.

    Args:
        inner: the client that does the RPCs (PSClient or PartitionedClient).
        layout: the layout of the regions the trainer pushes and pulls.
    """

    def __init__(self, inner, layout: Layout):
        self.inner = inner
        self.layout = layout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap")
        self._outgoing = layout.empty_regions()  # the update being pushed
        self._incoming = [layout.empty_regions(), layout.empty_regions()]  # prefetched weights, double-buffered
        self._next_incoming = 0
        self._in_flight: Future | None = None
        self._ready: tuple[pb.PushResponse, pb.PullHeader, list[torch.Tensor]] | None = None
        self._version = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)  # join's info, heartbeat, status, pull_frozen, close, ...

    def join(self, *args, **kwargs):
        """Joins (again): anything in flight belonged to the old session and is dropped."""
        self._drop_in_flight()
        info = self.inner.join(*args, **kwargs)
        self._version = info.version
        return info

    def wait_and_pull(self, regions: list[torch.Tensor], min_version: int) -> pb.PullHeader:
        """Prefetched weights if a transfer finished; current weights if one is running; else a real pull."""
        if self._in_flight is not None and self._in_flight.done():
            self._collect()
        if self._ready is not None:
            _, header, weights = self._ready
            self._ready = None
            for dst, src in zip(regions, weights):
                dst.copy_(src)
            self._version = header.version
            return header
        if self._in_flight is not None:
            return pb.PullHeader(version=self._version)  # compute on what we have while the transfer runs
        header = self.inner.wait_and_pull(regions, min_version)
        self._version = header.version
        return header

    def push(self, kind: int, base_version: int, regions: list[torch.Tensor], num_samples: int, loss: float,
             dry_run: bool = False, sparse: dict | None = None) -> pb.PushResponse:
        """Starts this push in the background; returns the previous one's reply (or a provisional one)."""
        previous = self._collect() if self._in_flight is not None else None
        if previous is None and self._ready is not None:
            previous = self._ready[0]
        for dst, src in zip(self._outgoing, regions):
            dst.copy_(src)
        incoming = self._incoming[self._next_incoming]
        self._next_incoming ^= 1
        outgoing = self._outgoing

        def transfer():
            reply = self.inner.push(kind, base_version, outgoing, num_samples, loss, dry_run, sparse)
            if reply.done:
                return reply, pb.PullHeader(version=reply.version, done=True), incoming
            return reply, self.inner.wait_and_pull(incoming, reply.next_version), incoming

        self._in_flight = self._pool.submit(transfer)
        if previous is not None:
            return previous
        return pb.PushResponse(outcome=pb.PUSH_OUTCOME_ACCEPTED, version=base_version, next_version=base_version)

    def _collect(self) -> pb.PushResponse:
        """Waits for the transfer in flight; keeps its prefetched weights; returns its reply."""
        future, self._in_flight = self._in_flight, None
        reply, header, weights = future.result()  # its errors (ServerRestarted, ...) surface here
        self._ready = (reply, header, weights)
        return reply

    def _drop_in_flight(self) -> None:
        if self._in_flight is not None:
            try:
                self._in_flight.result()
            except Exception:  # the session it belonged to is over either way
                pass
        self._in_flight = None
        self._ready = None

    def leave(self) -> None:
        """Finishes the transfer in flight (so the last update is not lost), then leaves."""
        self._drop_in_flight()
        self.inner.leave()
        self._pool.shutdown(wait=False)
