"""Shared fixtures: an in-process parameter server on port 0, and clients for it."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from paramhub.common.config import ServerConfig, Timeouts


def wait_for(condition, timeout: float = 30.0, what: str = "condition", poll: float = 0.02):
    """Polls ``condition`` every ``poll`` s until it returns something truthy (and returns that); TimeoutError after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(poll)
    return value


def fast_timeouts(**overrides) -> Timeouts:
    """Short bounds so a broken test fails in seconds instead of hanging."""
    return dataclasses.replace(Timeouts(rpc=10, transfer=30, connect=5, pull_wait=2, lease=5, round=20,
                                        heartbeat=0.5), **overrides)


@pytest.fixture
def start_server():
    """Starts PSServers on port 0 (mlp model by default); all are shut down after the test."""
    from paramhub.ps.server import PSServer

    servers = []

    def start(**overrides) -> PSServer:
        fields = dict(host="127.0.0.1", port=0, model="mlp", num_classes=4, workers=1, lr=0.1, momentum=0.0,
                      timeouts=fast_timeouts(), done_grace_s=1.0)
        fields.update(overrides)
        server = PSServer(ServerConfig(**fields))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown(grace=0)


@pytest.fixture
def connect():
    """Creates PSClients for ``host:port``; all are closed after the test."""
    from paramhub.worker.client import PSClient

    clients = []

    def make(port: int, **timeout_overrides) -> PSClient:
        client = PSClient(f"127.0.0.1:{port}", fast_timeouts(**timeout_overrides))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def train_in_threads(config, workers: int, make_client=None, timeout: float = 150.0) -> dict:
    """Runs ``workers`` real Trainers (shards 0..workers-1), one thread each; returns their summaries.

    Raises the first worker's error, and fails if a worker is still running after ``timeout``.
    """
    from paramhub.worker.client import PSClient
    from paramhub.worker.trainer import Trainer

    make_client = make_client or (lambda: PSClient(config.server, config.timeouts))
    summaries, errors = {}, []

    def run(shard: int):
        try:
            with make_client() as client:
                summaries[shard] = Trainer(dataclasses.replace(config, shard=shard), client).run()
        except Exception as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a worker did not finish in time"
    return summaries
