"""One client interface: PSClient, PartitionedClient and OverlappedClient each implement every member of
ParameterClient with the same parameters, so the trainer never asks which one it has."""

from __future__ import annotations

import inspect

import pytest

from paramhub.common.layout import Layout
from paramhub.worker.client import PSClient
from paramhub.worker.interface import ParameterClient
from paramhub.worker.overlap import OverlappedClient
from paramhub.worker.partitions import PartitionedClient

pytestmark = pytest.mark.timeout(60)
METHODS = [name for name, member in vars(ParameterClient).items()
           if callable(member) and not name.startswith("_")]


def parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("cls", [PSClient, PartitionedClient, OverlappedClient])
def test_every_client_has_every_member_with_the_same_parameters(cls):
    assert METHODS == ["join", "pull", "pull_frozen", "wait_and_pull", "push", "heartbeat", "leave", "close"]
    for name in METHODS:
        assert parameters(getattr(cls, name)) == parameters(getattr(ParameterClient, name)), f"{cls.__name__}.{name}"
    assert hasattr(cls, "__enter__") and hasattr(cls, "__exit__")


def test_live_clients_are_parameter_clients_and_the_wrapper_forwards_nothing_implicitly():
    import torch

    plain = PSClient("127.0.0.1:1")
    partitioned = PartitionedClient([PSClient("127.0.0.1:1"), PSClient("127.0.0.1:2")])
    overlapped = OverlappedClient(plain, Layout.from_state({"w": torch.zeros(2)}, param_names={"w"}))
    try:
        for client in (plain, partitioned, overlapped):
            assert isinstance(client, ParameterClient)
        assert overlapped.address == plain.address and overlapped.info is None
        with pytest.raises(AttributeError):  # the negative control: no __getattr__ hands out the inner's internals
            overlapped.timeouts
        assert not isinstance(object(), ParameterClient)
    finally:
        overlapped.close()
        partitioned.close()
