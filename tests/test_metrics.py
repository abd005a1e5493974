"""Prometheus metrics (``--metrics-port``), JSON logs (``--log-format json``) and their CLI flags."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import types
import urllib.request

import grpc
import pytest
import torch
from click.testing import CliRunner

from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.runtime import JsonFormatter
from paramhub.ps.ledger import LedgerEntry
from paramhub.ps.metrics import MetricsHook, ServerMetrics
from paramhub.ps.registry import WorkerRegistry

pytestmark = pytest.mark.timeout(120)
GRAD = pb.PUSH_KIND_GRADIENT


def scrape(port: int) -> list:
    """Every sample ``/metrics`` serves, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list, name: str, **labels) -> float | None:
    """The value of the sample with this name and exactly these labels (None if absent)."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) <= 1, f"{name} {labels} appears {len(found)} times"
    return found[0] if found else None


def zeros(client) -> list[torch.Tensor]:
    return [torch.zeros(region.numel) for region in client.info.layout.regions]


def test_a_sync_run_shows_in_counters_histograms_and_worker_gauges(start_server, connect, caplog):
    caplog.set_level(logging.DEBUG, logger="paramhub.ps")
    server = start_server(metrics_port=0)
    client = connect(server.port)
    client.join("w0", shard=0)
    regions = client.info.layout.empty_regions()
    for version in range(3):
        client.pull(regions)
        client.push(GRAD, version, zeros(client), num_samples=8, loss=1.0)
    nbytes = client.info.layout.nbytes
    samples = scrape(server.metrics_port)
    assert value(samples, "paramhub_version") == 3
    assert value(samples, "paramhub_updates_applied_total") == 3
    assert value(samples, "paramhub_pushes_accepted_total") == 3
    # every push of a one-worker sync run is applied fresh: all staleness 0
    assert value(samples, "paramhub_push_staleness_bucket", le="0.0") == 3
    assert value(samples, "paramhub_push_staleness_bucket", le="16.0") == 3
    assert value(samples, "paramhub_push_staleness_bucket", le="+Inf") == 3
    assert (value(samples, "paramhub_push_staleness_count"), value(samples, "paramhub_push_staleness_sum")) == (3, 0)
    assert value(samples, "paramhub_round_wait_seconds_count") == 3  # one per closed round
    assert value(samples, "paramhub_received_bytes_total") == 3 * nbytes
    assert value(samples, "paramhub_sent_bytes_total") == 3 * nbytes
    assert value(samples, "paramhub_workers_alive") == 1
    assert 0 <= value(samples, "paramhub_worker_last_seen_seconds", worker="w0") < 5
    window = server.metrics.window_s  # 3 pushes of 8 samples, all inside the rate window
    assert value(samples, "paramhub_worker_pushes_per_second", worker="w0") == pytest.approx(3 / window)
    assert value(samples, "paramhub_worker_samples_per_second", worker="w0") == pytest.approx(24 / window)
    rounds = [(r.round, r.reason, r.pushes) for r in caplog.records if getattr(r, "event", None) == "round_closed"]
    assert rounds == [(0, "quorum", 1), (1, "quorum", 1), (2, "quorum", 1)]


def test_drops_and_rejections_are_counted_by_reason_and_logged_as_events(start_server, connect, caplog):
    caplog.set_level(logging.INFO, logger="paramhub.ps")
    json_lines = io.StringIO()
    handler = logging.StreamHandler(json_lines)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("paramhub.ps").addHandler(handler)
    try:
        server = start_server(metrics_port=0, workers=2, backup_workers=1)
        a, b = connect(server.port), connect(server.port)
        a.join("a"), b.join("b")
        a.push(GRAD, 0, zeros(a), num_samples=1, loss=0.5)  # N - b = 1 push closes round 0
        assert b.push(GRAD, 0, zeros(b), num_samples=1, loss=0.5).outcome == pb.PUSH_OUTCOME_DROPPED
        with pytest.raises(grpc.RpcError):
            a.push(GRAD, 1, [torch.full_like(t, float("nan")) for t in zeros(a)], num_samples=1, loss=0.5)
        with pytest.raises(grpc.RpcError):
            a.push(GRAD, 7, zeros(a), num_samples=1, loss=0.5)  # based on a version the server never had
    finally:
        logging.getLogger("paramhub.ps").removeHandler(handler)
    samples = scrape(server.metrics_port)
    assert value(samples, "paramhub_pushes_accepted_total") == 1
    assert value(samples, "paramhub_pushes_dropped_total", reason="closed_round") == 1
    assert value(samples, "paramhub_pushes_rejected_total", reason="INVALID_ARGUMENT") == 1
    assert value(samples, "paramhub_pushes_rejected_total", reason="FAILED_PRECONDITION") == 1
    # Dropped and rejected pushes count too, each up to where it was refused: the NaN push at its
    # first (and only) chunk, before counting it.
    assert value(samples, "paramhub_received_bytes_total") == 3 * a.info.layout.nbytes
    dropped = [r for r in caplog.records if getattr(r, "event", None) == "push_dropped"]
    assert [(r.reason, r.worker, r.base_version, r.version) for r in dropped] == [("closed_round", "b", 0, 1)]
    events = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    event = next(e for e in events if e.get("event") == "push_dropped")
    assert {k: event[k] for k in ("level", "logger", "reason", "worker")} == {
        "level": "INFO", "logger": "paramhub.ps", "reason": "closed_round", "worker": "b"}
    assert "dropped push of b" in event["message"] and event["time"].endswith("+00:00")


def test_async_drops_too_stale_pushes_and_those_after_the_run(start_server, connect):
    server = start_server(metrics_port=0, mode="async", staleness=1, max_steps=3)
    client = connect(server.port)
    client.join("w")
    outcomes = [client.push(GRAD, base, zeros(client), num_samples=1, loss=0.5).outcome for base in (0, 0, 0, 2, 3)]
    accepted, dropped = pb.PUSH_OUTCOME_ACCEPTED, pb.PUSH_OUTCOME_DROPPED
    assert outcomes == [accepted, accepted, dropped, accepted, dropped]  # staleness 0, 1, 2 (> bound), 0, done
    samples = scrape(server.metrics_port)
    assert value(samples, "paramhub_pushes_dropped_total", reason="too_stale") == 1
    assert value(samples, "paramhub_pushes_dropped_total", reason="run_done") == 1
    assert value(samples, "paramhub_push_staleness_bucket", le="0.0") == 2
    assert value(samples, "paramhub_push_staleness_bucket", le="1.0") == 3
    assert value(samples, "paramhub_push_staleness_sum") == 1
    assert value(samples, "paramhub_round_wait_seconds_count") == 3  # each applied push's wait under the bound


def test_metrics_are_off_by_default_and_two_servers_keep_their_own(start_server, connect):
    plain = start_server()
    assert plain.metrics_port is None and plain.http_port is None
    assert type(plain.metrics) is MetricsHook  # the no-op: nothing measured, nothing served
    first, second = start_server(metrics_port=0), start_server(metrics_port=0)
    assert first.metrics_port != second.metrics_port
    client = connect(first.port)
    client.join("w")
    client.push(GRAD, 0, zeros(client), num_samples=1, loss=0.5)
    assert value(scrape(first.metrics_port), "paramhub_version") == 1
    assert value(scrape(second.metrics_port), "paramhub_version") == 0


def test_history_and_rates_are_bounded():
    now = [100.0]
    metrics = ServerMetrics(WorkerRegistry(30.0), lambda: 0, window_s=10.0, history=5, clock=lambda: now[0])
    for version in range(1, 8):
        metrics.update_applied(version, 1.0 / version, [LedgerEntry(0, 1, version, version - 1, 0, 1.0, 4)])
        metrics.push_accepted(1, 4)
        metrics.evaluated({"version": version, "top1": 0.5})
    losses, evaluations = metrics.history()
    assert [v for v, _, _ in losses] == [3, 4, 5, 6, 7] and [e["version"] for e in evaluations] == [3, 4, 5, 6, 7]
    assert metrics.rates() == {1: (0.7, 2.8)}
    now[0] += 10.5  # every push is now older than the window
    assert metrics.rates() == {1: (0.0, 0.0)}


def test_json_log_lines_from_a_fresh_process():
    code = ("import logging; from paramhub.common.runtime import setup_logging; setup_logging('INFO', 'json'); "
            "logging.getLogger('paramhub.ps').warning('worker %s lost', 'w0', "
            "extra={'event': 'worker_lost', 'worker': 'w0', 'lease_s': 5.0})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert {k: v for k, v in record.items() if k != "time"} == {
        "level": "WARNING", "logger": "paramhub.ps", "message": "worker w0 lost", "event": "worker_lost",
        "worker": "w0", "lease_s": 5.0}


def test_cli_flags_reach_the_server_config_and_logging(monkeypatch):
    from paramhub.ps import cli, server

    made, logging_setup = [], []

    class FakeServer:
        def __init__(self, config, build):
            made.append(config)
            self.port, self.last_checkpoint, self.store = 1, None, types.SimpleNamespace(version=0, failure=None)

        def start(self):
            return self.port

        def run_until_done(self):
            pass

    monkeypatch.setattr(server, "PSServer", FakeServer)
    monkeypatch.setattr(cli, "setup_logging", lambda level, fmt: logging_setup.append((level, fmt)))
    monkeypatch.setattr(cli, "keep_freed_memory_resident", lambda: False)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    result = CliRunner().invoke(cli.main, ["--model", "mlp", "--metrics-port", "9100", "--log-format", "json"])
    assert result.exit_code == 0, result.output
    assert (made[0].metrics_port, made[0].http_port) == (9100, None)  # 0 on the command line is off
    assert logging_setup == [("INFO", "json")]


@pytest.mark.parametrize("module", ["paramhub.worker.cli", "paramhub.worker.eval_cli"])
def test_worker_and_eval_take_a_log_format(module):
    import importlib

    import click

    command = importlib.import_module(module).main
    extra = ["--data", "synthetic"] if module.endswith("eval_cli") else []
    ctx = command.make_context("prog", ["--log-format", "json"] + extra)
    assert ctx.params["log_format"] == "json"
    with pytest.raises(click.BadParameter):
        command.make_context("prog", ["--log-format", "xml"] + extra)
