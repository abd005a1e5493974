"""ps-bench transport, end to end: the real console script with its two server subprocesses."""

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
