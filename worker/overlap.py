"""Overlapping transfers with computation (async mode): push in the background, prefetch the next pull.

``OverlappedClient`` wraps a client and keeps the trainer's loop unchanged:

- ``push`` copies the update into a private buffer, starts (push it, then pull the
  new weights into a spare buffer) on a background thread, and returns at once
  with the reply of the *previous* transfer (waiting for it first if it is still
  running: at most one transfer is in flight);
- ``wait_and_pull`` hands over the weights that the transfer collected by the
  last ``push`` prefetched; right after the first push, while its transfer runs,
  it returns at once so the next step computes on the weights it has.

So step t+1 computes while update t travels, on the weights that came back with
update t-1: each push is based on weights one exchange older than without
overlap, which async mode accepts. The trainer uses it there, unbounded or with a
staleness bound of at least 1. The server counts a worker's lag from every version
it may still push from: each pull after a push, and the base of a push marked
``keeps_base`` (the first one, whose weights the next step reuses) while work on it
can still be applied, which its reply says (``base_kept``); when it cannot, the next
step waits for the new weights instead. So the bound holds by holding the others
back, and no work is computed only to be dropped as too stale. Sync pushes must be
based on the round's version, and so must every push under bound 0 (it behaves as
sync): no overlap there.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Sequence

import torch

from paramhub.common.layout import Layout
from paramhub.common.leases import Span
from paramhub.common.pb import paramhub_pb2 as pb


def overlap_refusal(run: pb.RunSpec) -> str:
    """Why a worker of this run may not overlap its transfers with its steps ("" if it may).

    Sync pushes, and every push under staleness bound 0, must be based on the newest
    version. Over several partitions under a bound, each partition holds pushes back
    on its own: a worker waiting in one while its prefetched weights hold the others
    back in another deadlocks until the wait times out (measured).
    """
    if run.mode != "async":
        return "the server runs sync mode"
    if run.staleness_bound == 0:
        return "the server runs with --staleness 0 (sync)"
    if run.staleness_bound > 0 and run.num_partitions > 1:
        return "the model is partitioned and the server runs with a staleness bound"
    if run.data_leases:
        return "the server leases the data (--data-leases): a push must be answered before the next pull's leases"
    return ""


class OverlappedClient:
    """A client whose pushes and pulls run behind the computation.

    Args:
        inner: the client that does the RPCs (PSClient or PartitionedClient).
        layout: the layout of the regions the trainer pushes and pulls.
        staleness_bound: the server's bound (SSP), or None when unbounded.
    """

    def __init__(self, inner, layout: Layout, staleness_bound: int | None = None):
        self.inner = inner
        self.layout = layout
        self.staleness_bound = staleness_bound
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap")
        self._outgoing = layout.empty_regions()  # the update being pushed
        self._incoming = [layout.empty_regions(), layout.empty_regions()]  # prefetched weights, double-buffered
        self._next_incoming = 0
        self._in_flight: Future | None = None  # the transfer: (reply, pull header, weights)
        self._pushed: Future | None = None  # its push's reply, when it asked to keep its base
        self._ready: tuple[pb.PullHeader, list[torch.Tensor]] | None = None  # prefetched, not handed over
        self._unreported: pb.PushResponse | None = None  # a collected reply the trainer has not seen
        self._version = 0

    # -- what passes straight through (ParameterClient) ---------------------------------

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def info(self):
        """The inner client's JoinInfo."""
        return self.inner.info

    def pull(self, regions: list[torch.Tensor], min_version: int = 0, leases: dict | None = None) -> pb.PullHeader:
        """A plain pull, outside the overlap (nothing prefetched is used or dropped)."""
        return self.inner.pull(regions, min_version, leases)

    def pull_frozen(self, regions: list[torch.Tensor]) -> pb.PullHeader:
        return self.inner.pull_frozen(regions)

    def heartbeat(self):
        return self.inner.heartbeat()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.inner.close()

    def __enter__(self) -> "OverlappedClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what overlaps -------------------------------------------------------------------

    def join(self, name: str = "", shard: int = -1, observer: bool = False, incarnation: int | None = None):
        """Joins (again): anything in flight belonged to the old session and is dropped."""
        self._drop_in_flight()
        info = self.inner.join(name, shard, observer, incarnation)
        self._version = info.version
        return info

    def wait_and_pull(self, regions: list[torch.Tensor], min_version: int) -> pb.PullHeader:
        """The weights the last collected transfer prefetched; those in hand after the first push; else a pull.

        The transfer started by the latest push is left running even if it has
        finished: handing its weights over now would leave the next push nothing
        to collect, and the step after it would compute on the same weights twice.
        So each step computes on weights exactly one exchange old, and only the
        step after the first push reuses weights: under a staleness bound, only
        if the server kept counting from them (``base_kept``); otherwise that step
        waits for the transfer.
        """
        if self._ready is None and self._in_flight is not None and not self._may_reuse():
            self._collect()
        if self._ready is not None:
            header, weights = self._ready
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

    def _may_reuse(self) -> bool:
        """Whether the next step may compute on the weights the running transfer's push was based on."""
        if self.staleness_bound is None:
            return True  # no bound: any staleness is accepted
        if self._pushed is None:
            return False
        wait([self._pushed, self._in_flight], return_when=FIRST_COMPLETED)  # both end: RPCs have deadlines
        if not self._pushed.done():
            return False  # the transfer failed before its push's reply: collecting it raises the error
        reply = self._pushed.result()
        return reply.outcome == pb.PUSH_OUTCOME_ACCEPTED and reply.base_kept

    def push(self, kind: int, base_version: int, regions: list[torch.Tensor], num_samples: int, loss: float,
             dry_run: bool = False, keeps_base: bool = False, trained: Sequence[Span] = (),
             announce: Callable[[pb.PushHeader], None] | None = None) -> pb.PushResponse:
        """Starts this push in the background; returns the previous one's reply (or a provisional one).

        ``keeps_base`` is decided here: it is asked when no prefetched weights wait
        to be handed over, so the next step would compute on these weights again.
        Not under data leases (``overlap_refusal``): the next pull's leases depend on this push's answer.
        """
        if trained:
            raise ValueError("overlapped pushes carry no data leases (overlap_refusal says why)")
        if self._in_flight is not None:
            self._collect()
        previous, self._unreported = self._unreported, None
        for dst, src in zip(self._outgoing, regions):
            dst.copy_(src)
        keeps_base = self._ready is None
        pushed = Future() if keeps_base else None
        incoming = self._incoming[self._next_incoming]
        self._next_incoming ^= 1
        outgoing = self._outgoing

        def transfer():
            reply = self.inner.push(kind, base_version, outgoing, num_samples, loss, dry_run, keeps_base=keeps_base)
            if pushed is not None:
                pushed.set_result(reply)
            if reply.done:
                return reply, pb.PullHeader(version=reply.version, done=True), incoming
            return reply, self.inner.wait_and_pull(incoming, reply.next_version), incoming

        self._in_flight, self._pushed = self._pool.submit(transfer), pushed
        if previous is not None:
            return previous
        return pb.PushResponse(outcome=pb.PUSH_OUTCOME_ACCEPTED, version=base_version, next_version=base_version)

    def _collect(self) -> None:
        """Waits for the transfer in flight; keeps its prefetched weights and its reply."""
        future, self._in_flight, self._pushed = self._in_flight, None, None
        reply, header, weights = future.result()  # its errors (ServerRestarted, ...) surface here
        self._ready = (header, weights)
        self._unreported = reply

    def _drop_in_flight(self) -> None:
        if self._in_flight is not None:
            try:
                self._in_flight.result()
            except Exception:  # the session it belonged to is over either way
                pass
        self._in_flight = self._pushed = self._ready = self._unreported = None

    def leave(self) -> None:
        """Finishes the transfer in flight (so the last update is not lost), then leaves."""
        self._drop_in_flight()
        self.inner.leave()
        self._pool.shutdown(wait=False)
