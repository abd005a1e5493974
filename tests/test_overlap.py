"""Async workers overlap transfers with computation: push in the background, prefetch the next pull."""

from __future__ import annotations

import pytest

from conftest import fast_timeouts, train_in_threads
from paramhub.common.config import WorkerConfig
from paramhub.worker.client import PSClient
from paramhub.worker.partitions import PartitionedClient

pytestmark = pytest.mark.timeout(120)


def run_workers(start_server, overlap: bool | None, workers: int = 1, steps: int = 20, **server_options):
    """Runs ``workers`` trainers against a fresh async server; returns it and worker 0's summary."""
    server = start_server(model="mlp", num_classes=4, workers=workers, mode="async", lr=0.05, max_steps=steps,
                          **server_options)
    # cpu: whether a worker overlaps by default follows its device (GPU: on), and these tests count on CPU workers
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", data="synthetic", batch_size=8, image_size=8,
                          synthetic_size=256, log_every=0, overlap=overlap, device="cpu", timeouts=fast_timeouts())
    return server, train_in_threads(config, workers, timeout=90)[0]


def test_a_lone_async_worker_computes_while_its_previous_update_travels(start_server):
    server, summary = run_workers(start_server, overlap=True)
    histogram = server.engine.ledger.staleness_histogram
    # Alone, a worker without overlap always pushes on the newest version (staleness 0);
    # with overlap each step computes on weights one exchange old.
    assert histogram.get(1, 0) >= 10, histogram
    assert max(histogram) <= 2 and server.store.version == 20  # at most one exchange in flight
    assert summary.final_version == 20


def test_without_overlap_a_lone_worker_is_never_stale(start_server):
    server, _ = run_workers(start_server, overlap=False)
    assert set(server.engine.ledger.staleness_histogram) == {0}


@pytest.mark.parametrize("workers, bound", [(1, 1), (3, 1), (3, 2)])
def test_under_a_staleness_bound_overlapped_workers_keep_it_and_lose_no_work(start_server, workers, bound):
    # Each overlapped push is based on weights one exchange old, so bound 1 is the tightest that admits it.
    server, _ = run_workers(start_server, overlap=True, workers=workers, steps=24, staleness=bound, metrics_port=0)
    histogram = server.engine.ledger.staleness_histogram
    assert server.store.version == 24 and max(histogram) <= bound, histogram
    # The server held the others back instead of dropping work (a step in flight when the run ends is lost).
    assert not server.metrics.prometheus.get_sample_value("paramhub_pushes_dropped_total", {"reason": "too_stale"})
    assert sum(n for staleness, n in histogram.items() if staleness >= 1) >= 20, histogram  # overlap at work


def test_a_staleness_bound_of_zero_is_sync_so_workers_do_not_overlap(start_server, caplog):
    server, _ = run_workers(start_server, overlap=True, staleness=0)
    assert set(server.engine.ledger.staleness_histogram) == {0} and server.engine.pushes_dropped == 0
    assert "--overlap has no effect" in caplog.text  # asked for explicitly: the worker says why not


def test_by_default_a_cpu_worker_does_not_overlap(start_server):
    # On the CPU the step and the transfer share the cores (measured slower): overlap is for GPU workers.
    server, _ = run_workers(start_server, overlap=None)
    assert set(server.engine.ledger.staleness_histogram) == {0}


def run_partitioned(start_server, **server_options):
    """Two overlapping workers over two partition servers (async); returns the servers."""
    servers = [start_server(model="mlp", num_classes=4, workers=2, mode="async", lr=0.05, max_steps=16,
                            partition=(k, 2), **server_options) for k in range(2)]
    config = WorkerConfig(data="synthetic", batch_size=8, image_size=8, synthetic_size=256, log_every=0, overlap=True,
                          device="cpu", timeouts=fast_timeouts(round=60))
    train_in_threads(config, 2, timeout=90, make_client=lambda: PartitionedClient(
        [PSClient(f"127.0.0.1:{s.port}", config.timeouts) for s in servers]))
    return servers


def test_unbounded_async_workers_overlap_over_partitions(start_server, caplog):
    servers = run_partitioned(start_server)
    assert "--overlap has no effect" not in caplog.text
    for server in servers:
        assert server.store.version == 16 and server.engine.ledger.total >= 16


def test_over_partitions_with_a_staleness_bound_workers_do_not_overlap(start_server, caplog):
    # Each partition holds pushes back on its own: overlapped workers could wait on each other across
    # partitions until the wait timed out (20 s here, seen in about one run in eight).
    servers = run_partitioned(start_server, staleness=1)
    assert "--overlap has no effect: the model is partitioned" in caplog.text
    assert "waited" not in caplog.text  # no push waited out its bound
    for server in servers:
        assert server.store.version == 16 and max(server.engine.ledger.staleness_histogram) <= 1
