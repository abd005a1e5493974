"""The one client interface the trainer and the evaluator talk to.

Three classes implement it: ``PSClient`` (one server), ``PartitionedClient`` (the same
calls over m partition servers) and ``OverlappedClient`` (a wrapper whose pushes and
pulls run behind the computation). Code that takes a client takes a
``ParameterClient`` and never asks which one it has; tests/test_client_interface.py
checks that each implements every member with the same parameters.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from paramhub.common.leases import Span
from paramhub.common.pb import paramhub_pb2 as pb


@runtime_checkable
class ParameterClient(Protocol):
    """Join, pull, push, heartbeat and leave against a parameter server (see ``PSClient`` for each call)."""

    address: str
    info: object  # the JoinInfo of the last join (None before)

    def join(self, name: str = "", shard: int = -1, observer: bool = False,
             incarnation: int | None = None) -> object: ...

    def pull(self, regions: list[torch.Tensor], min_version: int = 0, leases: dict | None = None) -> pb.PullHeader: ...

    def pull_frozen(self, regions: list[torch.Tensor]) -> pb.PullHeader: ...

    def wait_and_pull(self, regions: list[torch.Tensor], min_version: int) -> pb.PullHeader: ...

    def push(self, kind: int, base_version: int, regions: list[torch.Tensor], num_samples: int, loss: float,
             dry_run: bool = False, keeps_base: bool = False, trained: Sequence[Span] = (),
             announce: Callable[[pb.PushHeader], None] | None = None) -> pb.PushResponse: ...

    def heartbeat(self) -> object: ...

    def leave(self) -> None: ...

    def close(self) -> None: ...
