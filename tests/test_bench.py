"""ps-bench transport, round and aggregate, end to end: the real console script and its child processes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_transport_json_reports_positive_medians_and_ratio():
    exe = shutil.which("ps-bench")
    assert exe, "ps-bench is not installed (pip install -e .)"
    done = subprocess.run([exe, "transport", "--model", "mlp", "--repeats", "2", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("ratio", "paramhub_s", "socket_s"):
        assert isinstance(report[key], float) and report[key] > 0, (key, report)
    assert report["ratio"] == pytest.approx(report["paramhub_s"] / report["socket_s"])
    assert len(report["paramhub_samples_s"]) == len(report["socket_samples_s"]) == 2


def _bench_json(*args: str) -> dict:
    exe = shutil.which("ps-bench")
    assert exe, "ps-bench is not installed (pip install -e .)"
    done = subprocess.run([exe, *args, "--json"], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_round_json_reports_positive_times_ratio_and_server_memory():
    report = _bench_json("round", "--model", "mlp", "--workers", "2", "--repeats", "1", "--split-rounds", "1")
    for key in ("ratio", "round_s", "gloo_s", "server_peak_rss_mb", "rss_budget_mb"):
        assert isinstance(report[key], float) and report[key] > 0, (key, report)
    assert report["ratio"] == pytest.approx(report["round_s"] / report["gloo_s"])
    assert report["workers"] == 2 and report["wire_dtype"] == "fp32" and report["bytes"] > 0
    assert len(report["round_samples_s"]) == len(report["gloo_samples_s"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_round_with_a_standby_reports_the_paired_ratio_and_the_cpu():
    report = _bench_json("round", "--model", "mlp", "--workers", "2", "--repeats", "2", "--split-rounds", "0",
                         "--standby")
    assert report["standby_ratio"] == pytest.approx(report["standby_round_s"] / report["round_s"])
    assert len(report["standby_samples_s"]) == len(report["round_samples_s"]) == 2
    assert report["replication_bytes_per_round"] == report["bytes"] and report["cpu_model"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_aggregate_json_reports_positive_times_and_ratio():
    report = _bench_json("aggregate", "--model", "mlp", "--workers", "2", "--repeats", "1")
    for key in ("ratio", "aggregate_s", "copy_s"):
        assert isinstance(report[key], float) and report[key] > 0, (key, report)
    assert report["ratio"] == pytest.approx(report["aggregate_s"] / report["copy_s"])
    assert report["workers"] == 2 and report["bytes"] > 0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_codecs_json_reports_bytes_against_fp32_from_what_was_encoded():
    report = _bench_json("codecs", "--model", "mlp", "--image-size", "8", "--repeats", "1",
                         "--codecs", "fp32,bf16,int8,topk2bit:ratio=0.01")
    rows = {r["codec"]: r for r in report["rows"]}
    assert rows["fp32"]["fewer_bytes_than_fp32"] == 1.0
    assert 1.9 < rows["bf16"]["fewer_bytes_than_fp32"] <= 2.0  # half, plus the same framing
    assert 3.5 < rows["int8"]["fewer_bytes_than_fp32"] <= 4.0
    assert rows["topk2bit:ratio=0.01"]["pairs"] > 0 and rows["topk2bit:ratio=0.01"]["fewer_bytes_than_fp32"] > 10
    assert all(r["encode_s"] > 0 and r["receive_s"] > 0 for r in rows.values())
    with pytest.raises(AssertionError):  # an unknown codec is a usage error, not a traceback
        _bench_json("codecs", "--model", "mlp", "--codecs", "nope")
