"""Talking to a model split over several server partitions as if it were one server.

``PartitionedClient`` calls m partition servers in parallel and tracks each one's
version, so the trainer sees one client with one layout. Where each partition's
tensors sit in the whole model is a ``Slicer``'s business (ps-lite's name for it):
``RangeSlicer``, for ``ps-server --partition k/m``, which holds a contiguous range
of the model's tensors (state_dict order). Contiguous ranges make each
partition's share of every region a contiguous slice of the whole model's
region, so pulls land straight in views of one set of buffers (no gather copy)
and pushes send slices of them. Each partition's client encodes its slices in the
run's codec on its own.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence, TypeVar

import torch

from paramhub.common.layout import Layout
from paramhub.common.leases import Span
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.worker.client import JoinInfo, PSClient, RunFailed

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _Slices:
    """Where one partition's regions sit inside the combined regions: (region index, start, stop) each."""

    spans: tuple[tuple[int, int, int], ...]

    def of(self, regions: list[torch.Tensor]) -> list[torch.Tensor]:
        """This partition's slices of the whole model's ``regions`` (views: no copy)."""
        return [regions[r][start:stop] for r, start, stop in self.spans]


def combine_layouts(layouts: list[Layout]) -> tuple[Layout, list[_Slices]]:
    """The whole model's layout from its partitions' (in partition order), and each partition's slices of it.

    Raises:
        RunFailed: the partitions' tensors do not line up as contiguous ranges.
    """
    combined = Layout.from_entries((t.name, t.dtype, t.shape, t.role) for layout in layouts for t in layout.tensors)
    by_name = {t.name: t for t in combined.tensors}
    slices = []
    for layout in layouts:
        spans = []
        for region in range(len(layout.regions)):
            members = [t for t in layout.tensors if t.region == region]
            first, last = by_name[members[0].name], by_name[members[-1].name]
            start, stop = first.offset, last.offset + last.numel
            if stop - start != layout.regions[region].numel or first.region != last.region:
                raise RunFailed("the partitions do not hold contiguous ranges of the model")
            spans.append((first.region, start, stop))
        slices.append(_Slices(tuple(spans)))
    return combined, slices


class Slicer(Protocol):
    """How one model's regions are split over m partition servers."""

    def combine(self, layouts: list[Layout]) -> Layout:
        """The whole model's layout from the partitions' (in partition order); RunFailed if they do not fit."""

    def split(self, regions: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each partition's share of the whole model's ``regions`` (as views), after ``combine``."""


class RangeSlicer:
    """Partitions that hold contiguous ranges of the model's tensors (``ps-server --partition k/m``)."""

    def __init__(self):
        self._slices: list[_Slices] = []

    def combine(self, layouts: list[Layout]) -> Layout:
        combined, self._slices = combine_layouts(layouts)
        return combined

    def split(self, regions: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [part.of(regions) for part in self._slices]


class PartitionedClient:
    """The ParameterClient interface over m partition servers.

    Args:
        clients: one PSClient per partition address (any order; Join tells which is which).
        slicer: where each partition's tensors sit in the whole model (default: contiguous ranges).
    """

    def __init__(self, clients: list[PSClient], slicer: Slicer | None = None):
        self.clients = clients
        self.address = ",".join(c.address for c in clients)
        self._pool = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="partition")
        self.info: JoinInfo | None = None
        self._slicer = slicer or RangeSlicer()
        self._next: list[int] = []  # each partition's next version to pull
        self._pulled: list[int] = []

    def _each(self, call: Callable[[int, PSClient], T]) -> list[T]:
        """Runs ``call`` on every partition in parallel; the first failure is raised."""
        futures = [self._pool.submit(call, i, c) for i, c in enumerate(self.clients)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for client in self.clients:
            client.close()

    def __enter__(self) -> "PartitionedClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def join(self, name: str = "", shard: int = -1, observer: bool = False,
             incarnation: int | None = None) -> JoinInfo:
        """Joins every partition; checks they are partitions 0..m-1 of one model and run."""
        infos = self._each(lambda i, c: c.join(name, shard, observer, incarnation))
        order = sorted(range(len(infos)), key=lambda i: infos[i].run.partition)
        self.clients = [self.clients[i] for i in order]
        infos = [infos[i] for i in order]
        expected = list(range(len(infos)))
        if [i.run.partition for i in infos] != expected or any(i.run.num_partitions != len(infos) for i in infos):
            found = ", ".join(f"{i.run.partition}/{i.run.num_partitions}" for i in infos)
            raise RunFailed(f"--server lists {len(infos)} addresses, but they are partitions {found}")
        if len({(i.model.arch, i.model.num_classes, i.run.mode, i.run.update, i.run.codec) for i in infos}) != 1:
            raise RunFailed("the partition servers run different models, modes or codecs")
        combined = self._slicer.combine([i.layout for i in infos])
        self._next = [i.version for i in infos]
        self._pulled = list(self._next)  # the version each partition last sent us: the next push's base
        self.info = dataclasses.replace(infos[0], layout=combined, version=min(self._next))
        return self.info

    def pull(self, regions: list[torch.Tensor], min_version: int = 0, leases: dict | None = None) -> pb.PullHeader:
        """Pulls every partition into its share of ``regions``, each at ``min_version`` or newer.

        The header's version is the lowest of the partitions' (so at least
        ``min_version`` unless a partition's wait ended first, as with one server).
        Data leases need one server (a partitioned one refuses ``--data-leases``).
        """
        if leases:
            raise RunFailed("data leases come from an unpartitioned server")
        shares = self._slicer.split(regions)
        return self._combine_headers(self._each(lambda i, c: c.pull(shares[i], min_version)))

    def wait_and_pull(self, regions: list[torch.Tensor], min_version: int) -> pb.PullHeader:
        """Pulls every partition once its own next version is there (or the run is done).

        ``min_version`` is ignored: each partition has its own, from its last reply.
        """
        shares = self._slicer.split(regions)
        headers = self._each(lambda i, c: c.wait_and_pull(shares[i], self._next[i]))
        self._pulled = [h.version for h in headers]
        return self._combine_headers(headers)

    def pull_frozen(self, regions: list[torch.Tensor]) -> pb.PullHeader:
        """Frozen tensors are the same on every partition: pulled from the first."""
        return self.clients[0].pull_frozen(regions)

    def push(self, kind: int, base_version: int, regions: list[torch.Tensor], num_samples: int, loss: float,
             dry_run: bool = False, keeps_base: bool = False, trained: Sequence[Span] = (),
             announce: Callable[[pb.PushHeader], None] | None = None) -> pb.PushResponse:
        """Pushes each partition its slices, based on the version it last sent us.

        Each partition's client encodes its slices in the run's codec (a top-k
        codec picks its elements per partition region, with its own residual).
        """
        if trained:
            raise RunFailed("data leases come from an unpartitioned server")
        shares = self._slicer.split(regions)
        replies = self._each(lambda i, c: c.push(
            kind, self._pulled[i], shares[i], num_samples, loss, dry_run, keeps_base=keeps_base))
        self._next = [r.next_version for r in replies]
        accepted = all(r.outcome == pb.PUSH_OUTCOME_ACCEPTED for r in replies)
        return pb.PushResponse(
            outcome=pb.PUSH_OUTCOME_ACCEPTED if accepted else pb.PUSH_OUTCOME_DROPPED,
            version=min(r.version for r in replies), next_version=min(self._next),
            done=any(r.done for r in replies), server_epoch=replies[0].server_epoch,
            base_kept=all(r.base_kept for r in replies))

    @staticmethod
    def _combine_headers(headers: list[pb.PullHeader]) -> pb.PullHeader:
        return pb.PullHeader(version=min(h.version for h in headers), layout_hash=headers[0].layout_hash,
                             done=any(h.done for h in headers), server_epoch=headers[0].server_epoch)

    def heartbeat(self) -> None:
        """Renews the lease on every partition."""
        self._each(lambda i, c: c.heartbeat())

    def leave(self) -> None:
        """Leaves every partition (best effort)."""
        self._each(lambda i, c: c.leave())

    def partition_statuses(self) -> list[pb.StatusResponse]:
        """Every partition's own status, in partition order (each server counts its own versions)."""
        return self._each(lambda i, c: c.status())
