"""Async workers overlap transfers with computation: push in the background, prefetch the next pull."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import fast_timeouts
from paramhub.common.config import WorkerConfig
from paramhub.worker.client import PSClient
from paramhub.worker.trainer import Trainer

pytestmark = pytest.mark.timeout(120)


def run_one_worker(start_server, overlap: bool):
    server = start_server(model="mlp", num_classes=4, workers=1, mode="async", lr=0.05, max_steps=20)
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data="synthetic", batch_size=8, image_size=8,
                          synthetic_size=256, log_every=0, overlap=overlap, timeouts=fast_timeouts())
    with PSClient(config.server, config.timeouts) as client:
        summary = Trainer(dataclasses.replace(config, shard=0), client).run()
    return server, summary


def test_a_lone_async_worker_computes_while_its_previous_update_travels(start_server):
    server, summary = run_one_worker(start_server, overlap=True)
    histogram = server.engine.ledger.staleness_histogram
    # Alone, a worker without overlap always pushes on the newest version (staleness 0);
    # with overlap each step computes on weights one exchange old.
    assert histogram.get(1, 0) >= 10, histogram
    assert max(histogram) <= 2 and server.store.version == 20  # at most one exchange in flight
    assert summary.final_version == 20


def test_without_overlap_a_lone_worker_is_never_stale(start_server):
    server, _ = run_one_worker(start_server, overlap=False)
    assert set(server.engine.ledger.staleness_histogram) == {0}
