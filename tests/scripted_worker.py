"""A test-side worker that pushes known gradients, over the real wire, to a real server.

The gradient of worker ``i`` for the round that starts from version ``v`` is drawn from a
generator seeded by ``(i, v)``, so a test knows exactly what the server should have applied,
however often a round is sent again after a server restart.

Run as a script it is a worker that dies in the middle of a push (fault injection on the test
side, not in the production worker)::

    python scripted_worker.py HOST:PORT WORKER FULL_ROUNDS

pushes FULL_ROUNDS rounds, then sends the header and half the chunks of the next push, prints
``cut SENT TOTAL`` (payload bytes sent, and of the whole push) and waits, mid-stream, for the
test to SIGKILL it.
"""

from __future__ import annotations

import sys
import threading
from typing import Iterator

import grpc
import torch

from paramhub.common import codec
from paramhub.common.config import Timeouts
from paramhub.common.layout import Layout
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.worker.client import PSClient, ServerRestarted


def fixed_gradients(layout: Layout, worker: int, version: int) -> list[torch.Tensor]:
    """The gradient worker ``worker`` pushes for the round starting at ``version``, one tensor per region."""
    gen = torch.Generator().manual_seed(1_000_003 * (worker + 1) + version)
    return [torch.randn(region.numel, generator=gen).to(region.dtype) for region in layout.regions]


def run_round(client: PSClient, worker: int, version: int) -> tuple[int, bool]:
    """Pushes ``fixed_gradients`` for the round starting at ``version`` (one sample each, so the
    mean is exact), then pulls until that round has closed; returns (the version now, done)."""
    grads = fixed_gradients(client.info.layout, worker, version)
    reply = client.push(pb.PUSH_KIND_GRADIENT, version, grads, num_samples=1, loss=0.0)
    if reply.done:
        return reply.version, True
    header = client.wait_and_pull(client.info.layout.empty_regions(), reply.next_version)
    return header.version, header.done


class FixedGradientWorker(threading.Thread):
    """Pushes ``fixed_gradients`` round after round until the run is done, then leaves.

    A restarted server (NOT_FOUND, new epoch) is joined again, and the worker goes on from
    the version it reports: a round lost with the old process is sent again, identically.

    Args:
        address: the server's ``host:port``.
        worker: the worker's index (its name is ``w{worker}``; it seeds the gradients).
        timeouts: the client's bounds; ``connect`` must outlast a server restart.
        hold_at: once a push returns with this version, wait for ``release`` before going on.
    """

    def __init__(self, address: str, worker: int, timeouts: Timeouts, hold_at: int | None = None):
        super().__init__(name=f"w{worker}", daemon=True)
        self.address = address
        self.worker = worker
        self.timeouts = timeouts
        self.hold_at = hold_at
        self.release = threading.Event()
        self.joins: list[tuple[int, int]] = []  # (worker id, the server's version) at every join
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with PSClient(self.address, self.timeouts) as client:
                self._train(client)
        except BaseException as exc:  # re-raised by the test that joins this thread
            self.error = exc

    def _join(self, client: PSClient) -> int:
        info = client.join(f"w{self.worker}")
        self.joins.append((info.worker_id, info.version))
        return info.version

    def _train(self, client: PSClient) -> None:
        version = self._join(client)
        while True:
            try:
                version, done = run_round(client, self.worker, version)
            except ServerRestarted:
                version = self._join(client)
                continue
            if done:
                client.leave()
                return
            if version == self.hold_at and not self.release.wait(timeout=120):
                raise TimeoutError(f"w{self.worker} was not released within 120 s")


def _half_push(info, grads: list[torch.Tensor], sequence: int, base_version: int) -> tuple[list, int, int]:
    """The header and the first half of a push's chunks; and the payload bytes of that half and of the whole."""
    pieces = list(codec.iter_chunks(info.wire_layout, grads, None, info.max_chunk_bytes))
    half = pieces[: len(pieces) // 2]
    header = pb.PushMessage(header=pb.PushHeader(
        worker_id=info.worker_id, incarnation=info.incarnation, sequence=sequence, base_version=base_version,
        kind=pb.PUSH_KIND_GRADIENT, layout_hash=info.layout.hash, num_samples=1, loss=0.0))
    messages = [header] + [codec.encode_chunk(r, offset, data) for r, offset, data in half]
    return messages, sum(len(data) for _, _, data in half), sum(len(data) for _, _, data in pieces)


def die_mid_push(address: str, worker: int, full_rounds: int) -> None:
    """Pushes ``full_rounds`` rounds, then half of the next push, and waits mid-stream to be killed."""
    with PSClient(address, Timeouts(rpc=10, transfer=30, connect=30)) as client:
        version = client.join(f"w{worker}").version
        for _ in range(full_rounds):
            version, _ = run_round(client, worker, version)
        messages, sent, total = _half_push(client.info, fixed_gradients(client.info.layout, worker, version),
                                           sequence=full_rounds + 1, base_version=version)

        def stream() -> Iterator[object]:
            yield from messages
            # gRPC asks for the next message only once the previous one was handed to the transport
            print(f"cut {sent} {total}", flush=True)
            sys.stdin.read()  # the test never writes: we stay mid-stream until SIGKILLed

        with grpc.insecure_channel(address) as channel:
            push = channel.stream_unary("/paramhub.v1.ParameterServer/Push", request_serializer=codec.encode_message,
                                        response_deserializer=pb.PushResponse.FromString)
            push(stream(), timeout=120)


if __name__ == "__main__":
    die_mid_push(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
